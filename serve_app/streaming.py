"""Server-Sent Events plumbing shared by /infer and /v1/*.

The first chunk is read before any header is sent, so a bad request still gets its real status
code; an error after streaming began becomes one SSE error event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from deployments.errors import APIError
from deployments.protocol import Chunk, LoadProgress, sse_json
from serve_app import handoff as connection_handoff
from serve_app.channels import DIRECT, Direct
from serve_app.errors import unwrap_error

Item = Chunk | LoadProgress
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


T = TypeVar("T")


def sse_event(data: Any) -> str:
    return f"data: {sse_json(data)}\n\n"


class EventTemplate:
    """An SSE event rendered once through its schema with one string field left open (`OPEN`), so a
    token's event costs one string encoding, not a pydantic model, a dump and a whole-event
    json.dumps (12 of the router's per-token microseconds; perf/README.md, session 14).
    `render(text)` equals `sse_event` of the same data with that field set to `text`, byte for byte."""

    OPEN = "\x00open\x00"  # no id or model name holds a NUL (model ids with one are refused)

    def __init__(self, data: Any) -> None:
        parts = sse_event(data).split(sse_json(self.OPEN))
        if len(parts) != 2:
            raise ValueError("an event template needs its open field exactly once")
        self.head, self.tail = parts

    def render(self, text: str) -> str:
        return self.head + sse_json(text) + self.tail


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


def deliver_directly() -> Direct:
    """Let this request's channel reader send its chunks' events itself (`sse_response(..., direct)`);
    call before the request is generated."""
    direct = Direct()
    DIRECT.set(direct)
    return direct


class _SSEResponse(StreamingResponse):
    """Keeps the ASGI `send` it streams through, for the channel reader's direct sends, and its scope (where
    the access log left uvicorn's cycle, for a connection handoff)."""

    send: Send | None = None
    scope: Scope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        self.send = send
        await super().stream_response(send)


class _Resume:
    """The rest of a coroutine that `send(None)` started and that suspended on `waiting`, to await in a task."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self) -> Generator[Any, Any, None]:
        waiting = self.waiting
        while True:
            try:
                value = yield waiting
            except BaseException as exc:  # noqa: BLE001 - the awaiting task's cancellation, passed in
                step, arg = self.coro.throw, exc
            else:
                step, arg = self.coro.send, value
            try:
                waiting = step(arg)
            except StopIteration:
                return


class _DirectSends:
    """Sends a chunk's events from the channel reader's turn (channels.Direct): on the loop's thread,
    through the same ASGI `send` and middlewares as the response's own, in order. A send that must wait
    (the client reads slowly) is finished by a task the response awaits before its own next send, and
    the chunks after it take the inbox again, merged there as for any slow consumer."""

    def __init__(self, response: _SSEResponse, to_events: Callable[[Chunk], Iterable[str]], direct: Direct,
                 template: EventTemplate | None) -> None:
        self.response, self.to_events, self.direct = response, to_events, direct
        self.pending: asyncio.Future[None] | None = None
        self.handoff: connection_handoff.Handoff | None = None
        if template is not None and connection_handoff.ENABLED and direct.handoff is not None and direct.reclaim is not None:
            self.handoff = connection_handoff.Handoff(response.scope or {}, template.head, template.tail, direct.handoff, direct.reclaim)
            direct.handback = self.handoff.handed_back

    def sent(self, chunk: Chunk) -> None:
        """All of `chunk`'s events are out (or with the pending send): count its tokens for a handoff."""
        if self.handoff is not None:
            self.handoff.tokens += len(chunk.token_ids)

    def deliver(self, chunk: Chunk) -> bool:
        try:
            events = [event.encode() for event in self.to_events(chunk)]
        except Exception:  # noqa: BLE001 - not the channel's error: the response's own path meets it
            self.direct.deliver = None
            return False
        send = self.response.send
        assert send is not None
        for i, body in enumerate(events):
            coro = send({"type": "http.response.body", "body": body, "more_body": True})
            try:
                waiting = coro.send(None)
            except StopIteration:
                continue
            except Exception:  # noqa: BLE001 - the response's own send meets it again, on the usual path
                self.direct.deliver = None
                if i > 0:
                    self.sent(chunk)
                return i > 0
            self.direct.deliver = None
            self.pending = asyncio.ensure_future(self._finish(_Resume(coro, waiting), events[i + 1:]))
            self.sent(chunk)
            return True
        self.sent(chunk)
        return True

    async def _finish(self, started: Awaitable[None], rest: list[bytes]) -> None:
        await started
        send = self.response.send
        assert send is not None
        for body in rest:
            await send({"type": "http.response.body", "body": body, "more_body": True})

    async def settle(self) -> None:
        """Before the response sends anything itself: take the direct path away and finish what it began."""
        self.direct.deliver = None
        if self.pending is not None:
            pending, self.pending = self.pending, None
            await pending


def sse_response(first: Item, rest: AsyncIterator[Item], to_events: Callable[[Chunk], Iterable[str]],
                 direct: Direct | None = None, template: EventTemplate | None = None) -> StreamingResponse:
    """Stream the SSE events `to_events(chunk)` renders for every chunk; a client that leaves cancels generation.
    With `direct` (from `deliver_directly()`), a chunk that arrives through a channel while the response
    waits is sent by the channel reader (no wakeup of this response's task and generators per token).
    With a `template` as well (`to_events` of every chunk after the first but the last is exactly
    `[template.render(chunk.text)]`, or nothing for no text), the connection may be handed to the replica
    after the first event (serve_app.handoff)."""
    response: _SSEResponse

    async def events() -> AsyncIterator[str]:
        sends = _DirectSends(response, to_events, direct, template) if direct is not None else None
        try:
            async for chunk in _chain(first, rest):
                if sends is not None:
                    await sends.settle()
                if isinstance(chunk, LoadProgress):  # waiting for a load: a comment keeps the client informed
                    yield f": {chunk.message}\n\n"
                    continue
                for event in to_events(chunk):
                    yield event
                if sends is not None:
                    sends.sent(chunk)
                if sends is not None and chunk.finish_reason is None:  # every send of it is done: wait
                    sends.direct.deliver = sends.deliver
                    if sends.handoff is not None:
                        sends.handoff.attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - after headers, an error can only be an event
            if sends is not None and sends.handoff is not None and not await sends.handoff.reclaim():
                return  # the replica kept the connection: closed, nothing more can be written into it
            if sends is not None:
                await sends.settle()
            error = unwrap_error(exc) or APIError(f"internal error: {type(exc).__name__}", code="internal_error")
            yield sse_event(error.to_dict())
        finally:
            if sends is not None:
                sends.direct.deliver = None
                if sends.pending is not None:
                    sends.pending.cancel()
            await rest.aclose()  # type: ignore[attr-defined]
        yield SSE_DONE

    response = _SSEResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
    return response


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
