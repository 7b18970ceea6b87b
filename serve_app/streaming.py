"""Server-Sent Events plumbing shared by /infer and /v1/*.

The first chunk is read before any header is sent, so a bad request still gets its real status
code; an error after streaming began becomes one SSE error event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

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


_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # built once, not per event
T = TypeVar("T")


def _json(data: Any) -> str:
    """Compact JSON with the line breaks SSE clients split on escaped (one encoding for whole events and templates)."""
    return _encode(data).translate(_LINE_BREAKS)


def sse_event(data: Any) -> str:
    return f"data: {_json(data)}\n\n"


class EventTemplate:
    """An SSE event rendered once through its schema with one string field left open (`OPEN`), so a
    token's event costs one string encoding, not a pydantic model, a dump and a whole-event
    json.dumps (12 of the router's per-token microseconds; perf/README.md, session 14).
    `render(text)` equals `sse_event` of the same data with that field set to `text`, byte for byte."""

    OPEN = "\x00open\x00"  # no id or model name holds a NUL (model ids with one are refused)

    def __init__(self, data: Any) -> None:
        parts = sse_event(data).split(_json(self.OPEN))
        if len(parts) != 2:
            raise ValueError("an event template needs its open field exactly once")
        self.head, self.tail = parts

    def render(self, text: str) -> str:
        return self.head + _json(text) + self.tail


class Deadline:
    """One timer for a whole stream instead of a timeout armed and cancelled around every wait for
    a chunk (5 us per token in the router). `next(chunks)` raises TimeoutError when the deadline
    has passed, or passes while it waits; time spent between waits (the chunk being sent on) is
    not interrupted, as with `asyncio.timeout_at` around each wait."""

    def __init__(self, when: float) -> None:
        self.expired = False
        self._waiter: asyncio.Task[Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        if self._waiter is not None:
            self._waiter.cancel()

    async def next(self, chunks: AsyncIterator[T]) -> T:
        if self.expired:
            raise TimeoutError
        task = self._waiter = asyncio.current_task(self._loop)
        if task is None:  # not in a task: nothing for the timer to cancel
            return await chunks.__anext__()
        cancelling = task.cancelling()
        try:
            return await chunks.__anext__()
        except asyncio.CancelledError:
            if self.expired and task.uncancel() <= cancelling:  # our cancellation, not the caller's
                raise TimeoutError from None
            raise
        finally:
            self._waiter = None

    def cancel(self) -> None:
        self._handle.cancel()


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


def sse_response(first: Item, rest: AsyncIterator[Item], to_events: Callable[[Chunk], Iterable[str]]) -> StreamingResponse:
    """Stream the SSE events `to_events(chunk)` renders for every chunk; a client that leaves cancels generation."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in _chain(first, rest):
                if isinstance(chunk, LoadProgress):  # waiting for a load: a comment keeps the client informed
                    yield f": {chunk.message}\n\n"
                    continue
                for event in to_events(chunk):
                    yield event
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
