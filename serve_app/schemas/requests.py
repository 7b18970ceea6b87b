"""What clients send: requests, their sampling fields and their rules (durations here; the sampling
ranges are the engine's, `deployments.engine.request.SAMPLING_BOUNDS`, turned into Field bounds)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deployments.engine.request import MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, SAMPLING_BOUNDS, SEED_RANGE  # the last two: re-exported by serve_app.schemas

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
"""A model id: never a path (no '/', no NUL), and what clients send is checked against it first."""
TOP_K_OFF = (-1, 0)
"""Wire-only top_k values meaning "no top-k cut" (the engine's None), as vLLM and Ollama take them."""
UNSUPPORTED_BUT_HARMLESS: dict[str, tuple[Any, ...]] = {"best_of": (1,), "response_format": ({"type": "text"},)}
"""Values of unsupported OpenAI fields that ask for nothing we lack (besides null, false, 0, [] and {})."""
REQUEST_CONFIG = ConfigDict(strict=True, allow_inf_nan=False)
"""Request bodies: JSON types as documented (no "0.5" for a number, no true for an integer), finite numbers."""
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | int | str | None) -> float | None:
    """Seconds from a number of seconds or an Ollama-style duration ("30s", "5m", "1h", "0");
    a negative value means forever (None)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            seconds = float(text[: len(text) - len(unit)]) * DURATION_UNITS.get(unit, 1.0)
        except ValueError:
            raise ValueError(f"{value!r} is not a duration (seconds, or e.g. '30s', '5m', '1h')") from None
    else:
        seconds = float(value)
    if math.isnan(seconds):
        raise ValueError(f"{value!r} is not a duration")
    return None if seconds < 0 else seconds


def _checked_duration(value: float | str | None) -> float | str | None:
    parse_duration(value)  # raises ValueError (a 400, or a config error naming the field) on a bad duration
    return value


Duration = Annotated[float | str | None, AfterValidator(_checked_duration)]
"""A duration as sent or configured (kept as given; `parse_duration` reads it): seconds, or an
Ollama-style string such as '30s', '5m', '1h'; negative: forever."""


def sampling_field(name: str, default: Any, **kwargs: Any) -> Any:
    """A Field bounded exactly as the engine bounds `SamplingParams.<name>` (so the OpenAPI schema
    shows the engine's range, and an out-of-range value is a 400 before it reaches a replica)."""
    rule = SAMPLING_BOUNDS[name]
    return Field(default, ge=rule.ge, gt=rule.gt, le=rule.le, **kwargs)


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] = Field(description="Text, or a non-empty list of text parts.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("content must not be an empty list")
            others = [str(p.get("type"))[:32] for p in value if isinstance(p, dict) and p.get("type") != "text"]
            if others:
                raise ValueError(f"only text content parts are supported, not {others[:4]}")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class KeepAliveField(BaseModel):
    """Ollama's `keep_alive`: how long the model stays loaded after this request."""

    model_config = REQUEST_CONFIG
    keep_alive: Duration = Field(None, description="Seconds or '30s'/'5m'/'1h'; 0: unload after this; -1: forever.")

    def keep_alive_s(self) -> float | None:
        """The requested keep-alive in seconds; -1 (forever) is `inf`; None: the model's default."""
        if self.keep_alive is None:
            return None
        seconds = parse_duration(self.keep_alive)
        return float("inf") if seconds is None else seconds


class TimeoutField(BaseModel):
    """A per-request deadline: queued or running work past it ends with a 504 (or, once streaming,
    an error event); without it, the server's `request_timeout_s` applies."""

    timeout: float | None = Field(None, gt=0, le=86400, allow_inf_nan=False, description="Seconds this request may take in all.")


class SamplingFields(KeepAliveField, TimeoutField):
    """Sampling settings shared by /infer and /v1/*; out-of-range values are a 400."""

    model_config = REQUEST_CONFIG | ConfigDict(extra="ignore")
    model: str = Field(pattern=MODEL_ID_PATTERN, description="A configured model id.")
    max_tokens: int | None = sampling_field("max_tokens", None)
    temperature: float = sampling_field("temperature", 1.0)
    top_p: float = sampling_field("top_p", 1.0)
    top_k: int | None = Field(None, ge=min(TOP_K_OFF), le=SAMPLING_BOUNDS["top_k"].le, description="-1, 0 or null: no top-k cut.")
    stop: str | list[str] | None = Field(None, description=f"At most {MAX_STOP_STRINGS} non-empty strings.")
    seed: int | None = sampling_field("seed", None)
    repetition_penalty: float = sampling_field("repetition_penalty", 1.0)
    frequency_penalty: float = sampling_field("frequency_penalty", 0.0)
    presence_penalty: float = sampling_field("presence_penalty", 0.0)
    min_tokens: int = sampling_field("min_tokens", 0, description="vLLM extension: EOS is suppressed until this many tokens.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS (fixed lengths).")

    @model_validator(mode="after")
    def _min_le_max(self) -> "SamplingFields":
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    def engine_params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None if self.top_k in TOP_K_OFF else self.top_k,
            "stop": list(self.stop or []),
            "seed": self.seed,
            "repetition_penalty": self.repetition_penalty,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
        }


class OpenAIFields(SamplingFields):
    """What /v1/completions and /v1/chat/completions add: n, streaming options, user; OpenAI
    features this server does not have are refused (400) rather than silently ignored."""

    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | int | None = Field(None, description="Not supported: null, false or 0 only.")
    top_logprobs: int | None = Field(None, description="Not supported: null or 0 only.")
    best_of: int | None = Field(None, description="Not supported beyond 1.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: null or {} only.")
    suffix: str | None = Field(None, description="Not supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: null or [] only.")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')

    @field_validator("logprobs", "top_logprobs", "logit_bias", "suffix", "tools", "best_of", "response_format")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if not value or value in UNSUPPORTED_BUT_HARMLESS.get(info.field_name or "", ()):
            return value
        raise ValueError(f"{info.field_name} is not supported by this server")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = False


class InferRequest(SamplingFields):
    """POST /infer: a prompt or chat messages, plus sampling settings; an unknown field is a 400."""

    model_config = REQUEST_CONFIG | ConfigDict(extra="forbid")

    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> "InferRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class CompletionRequest(OpenAIFields):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = sampling_field("max_tokens", 16)  # OpenAI's default for completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("only one prompt per request is supported (n=1)")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        return value


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = sampling_field("max_tokens", None)

    def engine_params(self) -> dict[str, Any]:
        params = super().engine_params()
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return params


class LoadRequest(KeepAliveField):
    model_config = REQUEST_CONFIG | ConfigDict(extra="forbid")
    model: str = Field(pattern=MODEL_ID_PATTERN, description="A configured model id.")


class UnloadRequest(BaseModel):
    model_config = REQUEST_CONFIG | ConfigDict(extra="forbid")
    model: str = Field(pattern=MODEL_ID_PATTERN, description="A configured model id.")
    force: bool = Field(False, description="End requests in flight at once (an error event) instead of draining them.")


OpenAIFields.model_rebuild()
