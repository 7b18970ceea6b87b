"""What the router answers: completions, chunks, model listings and errors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class InferResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-serve"
    root: str | None = None
    parent: str | None = Field(None, description="A LoRA adapter's base model (vLLM's field).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelInfo(BaseModel):
    """One entry of GET /models: the model's state and what it holds."""

    id: str
    object: Literal["model"] = "model"
    status: Literal["unloaded", "loading", "loaded", "unloading", "failed"]
    error: str | None = None
    architecture: str | None = None
    quantization: str | None = None
    weights: str | None = None
    weights_reason: str | None = None
    implementation: str | None = None
    kv_cache: dict[str, int] | None = None
    channels: dict[str, int] | None = Field(
        None, description="This router's channels to the model's replicas: open, batches received, requests running through them."
    )
    context_length: int | None = None
    replicas: int = 0
    has_chat_template: bool | None = None
    resident_memory_bytes: int = 0
    weights_bytes: int = 0
    process_rss_bytes: int | None = None
    load_time_s: float | None = None
    last_used: float | None = None
    num_running_requests: int = 0
    max_num_seqs: int | None = None
    stream_interval: int | str | None = Field(
        None, description="Engine steps whose tokens one streamed event carries (1: every token); auto: 1, or 2 while 8+ sequences run."
    )
    num_threads: int | None = None
    device: str | None = None
    memory_estimate: dict[str, int] | None = None
    measured_bytes: int | None = None
    gpu_memory: dict[str, int] | None = None
    pinned: bool = False
    autoload: bool = True
    keep_alive_s: float | None = None
    keep_alive_expires_at: float | None = None
    releases: dict[str, int] = Field(default_factory=dict)
    num_loads: int = 0
    pid: int | None = None
    allocator: str | None = None
    kind: Literal["model", "adapter"] = "model"
    base: str | None = Field(None, description="An adapter's base model.")
    pool: str | None = Field(None, description="The multiplexed pool serving it (none: its own deployment).")
    held_by: list[str] = Field(default_factory=list, description="Pool replicas holding it now.")


class ModelInfoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

