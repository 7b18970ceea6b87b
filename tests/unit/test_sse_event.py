"""SSE events: they survive clients that split lines as str.splitlines() does; a templated token event
equals the schema's; one deadline timer per stream ends waits, not the sending between them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from serve_app.streaming import Deadline, EventTemplate, sse_event


def test_unicode_line_breaks_in_text_never_split_an_event() -> None:
    text = "a\u2028b\u2029c\x85d\ne\rf"
    event = sse_event({"text": text})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: ") :]) == {"text": text}


TRICKY = ["", " hello", 'say "hi"\\', "a\u2028b\u2029c\x85d\ne\rf\x0b\x1c", "\x00\x01\x1f", "é中文🙂", "\ud800"]


def test_a_templated_event_is_the_schemas_event_byte_for_byte() -> None:
    """EventTemplate (a token's event from a pre-rendered head and tail) renders exactly what the
    pydantic model, dumped and encoded whole, renders, for texts JSON must escape."""
    from serve_app.schemas import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionResponse

    def completion(text: str) -> dict:
        return CompletionResponse(id="cmpl-1", created=7, model="m/x", choices=[CompletionChoice(text=text)]).model_dump()

    def chat(text: str) -> dict:
        choice = ChatChunkChoice(delta=ChatDelta(content=text))
        return ChatCompletionChunk(id="chatcmpl-1", created=7, model="m", choices=[choice]).model_dump()

    for build in (completion, chat, lambda text: {"id": "infer-1", "model": "m", "text": text}):
        template = EventTemplate(build(EventTemplate.OPEN))
        for text in TRICKY:
            assert template.render(text) == sse_event(build(text)), (build, text)


def test_a_template_needs_its_open_field_exactly_once() -> None:
    with pytest.raises(ValueError):
        EventTemplate({"a": "x"})
    with pytest.raises(ValueError):
        EventTemplate({"a": EventTemplate.OPEN, "b": EventTemplate.OPEN})


async def _chunks(delays: list[float]) -> AsyncIterator[int]:
    for i, delay in enumerate(delays):
        await asyncio.sleep(delay)
        yield i


def test_deadline_ends_a_wait_that_outlasts_it_and_nothing_between_waits() -> None:
    async def consume(delays: list[float], work_s: float, timeout_s: float) -> tuple[list[int], bool]:
        deadline = Deadline(asyncio.get_running_loop().time() + timeout_s)
        chunks, got = _chunks(delays), []
        try:
            while True:
                try:
                    got.append(await deadline.next(chunks))
                except StopAsyncIteration:
                    return got, False
                except TimeoutError:
                    return got, True
                await asyncio.sleep(work_s)  # sending the chunk on: the deadline never interrupts this
        finally:
            deadline.cancel()
            await chunks.aclose()

    assert asyncio.run(consume([0, 0, 0], 0, 1.0)) == ([0, 1, 2], False)
    assert asyncio.run(consume([0, 0, 0.5], 0, 0.1)) == ([0, 1], True)  # expires while waiting
    assert asyncio.run(consume([0, 0, 0], 0.2, 0.1)) == ([0], True)  # expired during the work: the next wait refuses


def test_deadline_lets_the_callers_own_cancellation_through() -> None:
    async def main() -> None:
        deadline = Deadline(asyncio.get_running_loop().time() + 0.05)
        chunks = _chunks([1.0])
        task = asyncio.ensure_future(deadline.next(chunks))
        await asyncio.sleep(0.01)
        task.cancel()  # the client left before the deadline
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline.cancel()
        await chunks.aclose()

    asyncio.run(main())
