"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming or not)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends

from deployments.protocol import Chunk, GenerateRequest
from serve_app.clients import ModelRegistry
from serve_app.lifecycle import LifecycleManager
from serve_app.routes import get_lifecycle, get_registry
from serve_app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from serve_app.streaming import EventTemplate, collect, deliver_directly, open_stream, sse_event, sse_response

router = APIRouter(prefix="/v1")


def model_card(model_id: str, lifecycle: LifecycleManager, created: int) -> ModelCard:
    """A model's OpenAI card; an adapter's `parent` is its base (vLLM's field)."""
    return ModelCard(id=model_id, created=created, root=model_id, parent=lifecycle.models[model_id].base)


@router.get("/models", response_model=ModelList)
async def list_models(registry: ModelRegistry = Depends(get_registry), lifecycle: LifecycleManager = Depends(get_lifecycle)) -> ModelList:
    now = int(time.time())
    return ModelList(data=[model_card(client.model_id, lifecycle, now) for client in registry])


@router.get("/models/{model}", response_model=ModelCard)
async def retrieve_model(model: str, registry: ModelRegistry = Depends(get_registry), lifecycle: LifecycleManager = Depends(get_lifecycle)) -> ModelCard:
    """OpenAI's retrieve: one card; 404 `model_not_found` for an unknown id."""
    return model_card(registry.get(model).model_id, lifecycle, int(time.time()))


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, lifecycle: LifecycleManager = Depends(get_lifecycle)) -> Any:
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    wire = GenerateRequest(request_id, body.engine_params(), prompt=str(body.prompt))  # one prompt: the schema made it a str
    direct = deliver_directly() if body.stream else None  # before the request is generated
    first, rest = await open_stream(lifecycle.generate(body.model, wire, body.keep_alive_s(), body.timeout))
    echo = body.prompt if body.echo else ""

    def response(text: str, finish_reason: str | None, usage: dict[str, int] | None) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return CompletionResponse(id=request_id, created=created, model=body.model, choices=[choice], usage=usage)  # type: ignore[arg-type]

    if body.stream:
        state = {"echo": echo}
        token_event = EventTemplate(response(EventTemplate.OPEN, None, None).model_dump())

        def to_events(chunk: Chunk) -> list[str]:
            text, state["echo"] = state["echo"] + chunk.text, ""
            events = []
            if chunk.finish_reason:
                events.append(sse_event(response(text, chunk.finish_reason, None).model_dump()))
            elif text:
                events.append(token_event.render(text))
            if chunk.finish_reason and body.include_usage and chunk.usage:
                events.append(sse_event(CompletionResponse(id=request_id, created=created, model=body.model, choices=[], usage=chunk.usage.to_dict()).model_dump()))  # type: ignore[arg-type]
            return events

        return sse_response(first, rest, to_events, direct, token_event)  # after the first: token_event.render(text)
    result = await collect(first, rest)
    return response(echo + result.text, result.finish_reason, result.usage)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, lifecycle: LifecycleManager = Depends(get_lifecycle)) -> Any:
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    wire = GenerateRequest(request_id, body.engine_params(), messages=messages)
    direct = deliver_directly() if body.stream else None  # before the request is generated
    first, rest = await open_stream(lifecycle.generate(body.model, wire, body.keep_alive_s(), body.timeout))
    if body.stream:
        state = {"sent_role": False}

        def chunk_event(delta: ChatDelta, finish_reason: str | None = None) -> dict[str, Any]:
            choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
            return ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=[choice]).model_dump()

        content_event = EventTemplate(chunk_event(ChatDelta(content=EventTemplate.OPEN)))

        def to_events(chunk: Chunk) -> list[str]:
            events = []
            if not state["sent_role"]:
                state["sent_role"] = True
                events.append(sse_event(chunk_event(ChatDelta(role="assistant", content=""))))
            if chunk.text:
                events.append(content_event.render(chunk.text))
            if chunk.finish_reason:
                events.append(sse_event(chunk_event(ChatDelta(), chunk.finish_reason)))
                if body.include_usage and chunk.usage:
                    events.append(sse_event(ChatCompletionChunk(id=request_id, created=created, model=body.model, choices=[], usage=chunk.usage.to_dict()).model_dump()))  # type: ignore[arg-type]
            return events

        return sse_response(first, rest, to_events, direct, content_event)  # after the first: content_event.render(text)
    result = await collect(first, rest)
    choice = ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
    return ChatCompletionResponse(id=request_id, created=created, model=body.model, choices=[choice], usage=result.usage)  # type: ignore[arg-type]
