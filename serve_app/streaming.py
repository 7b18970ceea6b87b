"""Server-Sent Events plumbing shared by /infer and /v1/*.

The first chunk is read before any header is sent, so a bad request still gets its real status
code; an error after streaming began becomes one SSE error event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse

from deployments.errors import APIError
from deployments.protocol import Chunk, LoadProgress
from serve_app.errors import unwrap_error

Item = Chunk | LoadProgress
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Characters Python's str.splitlines() (and so requests' iter_lines and many SSE clients) treat as
# line breaks, which json.dumps(ensure_ascii=False) leaves raw inside strings: escape them, so a
# token like U+2028 or U+0085 never splits an event.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def sse_event(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':')).translate(_LINE_BREAKS)}\n\n"


async def open_stream(chunks: AsyncIterator[Item]) -> tuple[Item, AsyncIterator[Item]]:
    """Wait for the first chunk: errors raised before it propagate (and become HTTP errors)."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise
    return first, chunks


async def _chain(first: Item, rest: AsyncIterator[Item]) -> AsyncIterator[Item]:
    yield first
    async for chunk in rest:
        yield chunk


def sse_response(first: Item, rest: AsyncIterator[Item], to_events: Callable[[Chunk], Iterable[Any]]) -> StreamingResponse:
    """Stream `to_events(chunk)` for every chunk as SSE; a client that leaves cancels generation."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in _chain(first, rest):
                if isinstance(chunk, LoadProgress):  # waiting for a load: a comment keeps the client informed
                    yield f": {chunk.message}\n\n"
                    continue
                for event in to_events(chunk):
                    yield sse_event(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - after headers, an error can only be an event
            error = unwrap_error(exc) or APIError(f"internal error: {type(exc).__name__}", code="internal_error")
            yield sse_event(error.to_dict())
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@dataclass
class Completion:
    """A whole (non-streamed) result: the concatenated deltas, why it ended, and token counts."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


async def collect(first: Item, rest: AsyncIterator[Item]) -> Completion:
    result = Completion()
    try:
        async for chunk in _chain(first, rest):
            if isinstance(chunk, LoadProgress):
                continue
            result.text += chunk.text
            if chunk.finish_reason:
                result.finish_reason = chunk.finish_reason
                result.usage = chunk.usage.to_dict() if chunk.usage else {}
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
    return result
