"""Every pydantic model that crosses the wire. `/v1/*` models use OpenAI's field names verbatim:
what clients send in `requests`, what the router answers in `responses`."""

from serve_app.schemas.requests import (
    MAX_STOP_STRINGS,
    MAX_TOKENS_LIMIT,
    MODEL_ID_PATTERN,
    SEED_RANGE,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    InferRequest,
    LoadRequest,
    SamplingFields,
    StreamOptions,
    TextPart,
    UnloadRequest,
    parse_duration,
)
from serve_app.schemas.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    InferResponse,
    ModelCard,
    ModelInfo,
    ModelInfoList,
    ModelList,
    Usage,
)

__all__ = [
    "MAX_STOP_STRINGS", "MAX_TOKENS_LIMIT", "MODEL_ID_PATTERN", "SEED_RANGE", "AssistantMessage", "ChatChoice",
    "ChatChunkChoice", "ChatCompletionChunk", "ChatCompletionRequest", "ChatCompletionResponse", "ChatDelta",
    "ChatMessage", "CompletionChoice", "CompletionRequest", "CompletionResponse", "ErrorBody", "ErrorResponse",
    "InferRequest", "InferResponse", "LoadRequest", "ModelCard", "ModelInfo", "ModelInfoList", "ModelList",
    "SamplingFields", "StreamOptions", "TextPart", "UnloadRequest", "Usage", "parse_duration",
]
