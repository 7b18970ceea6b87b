"""A streamed response's chunks sent from the channel reader's turn (serve_app.streaming with a
channels.Direct): the events reach the client through the response's own ASGI `send`, whole and in
order, when some sends must wait (a client reading slowly) and others complete at once; the chunks
that arrive meanwhile take the inbox, and the last one always does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deployments.protocol import Chunk
from serve_app.channels import Direct
from serve_app.streaming import SSE_DONE, sse_response

SLOW_SENDS = {3, 4, 20, 21, 22, 40}  # the calls of send (body messages) that wait, as uvicorn's does when the transport is paused


def to_events(chunk: Chunk) -> list[str]:
    return [f"data: {chunk.text}{chunk.finish_reason or ''}\n\n"] if chunk.text or chunk.finish_reason else []


async def deliver_all(slow: set[int]) -> tuple[list[bytes], int, int]:
    chunks = [Chunk(f"t{i}", [i], None) for i in range(60)] + [Chunk("", [], "stop")]
    inbox: asyncio.Queue[Chunk] = asyncio.Queue()

    async def rest() -> AsyncIterator[Chunk]:  # the request's chunks from its inbox, as serve_app.channels.from_inbox
        while True:
            chunk = await inbox.get()
            yield chunk
            if chunk.finish_reason:
                return

    direct = Direct()
    response = sse_response(chunks[0], rest(), to_events, direct)
    bodies: list[bytes] = []
    calls = 0

    async def send(message: dict) -> None:
        nonlocal calls
        if message["type"] != "http.response.body":
            return
        calls += 1
        if calls in slow:
            await asyncio.sleep(0.02)
        bodies.append(message["body"])  # what the client reads, in the order the sends complete

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client never leaves
        return {}

    scope = {"type": "http", "asgi": {"spec_version": "2.3"}, "method": "POST", "path": "/"}
    task = asyncio.ensure_future(response(scope, receive, send))
    direct_count = inboxed = 0
    for chunk in chunks[1:]:  # as the channel reader hands them over (serve_app.channels.ChannelSet._read)
        await asyncio.sleep(0.003)
        deliver = direct.deliver
        if deliver is not None and chunk.finish_reason is None and inbox.empty() and deliver(chunk):
            direct_count += 1
            continue
        inbox.put_nowait(chunk)
        inboxed += 1
    await asyncio.wait_for(task, 10)
    return bodies, direct_count, inboxed


def expected_bodies() -> list[bytes]:
    return [f"data: t{i}\n\n".encode() for i in range(60)] + [b"data: stop\n\n", SSE_DONE.encode(), b""]


def test_direct_sends_keep_every_event_in_order() -> None:
    bodies, direct_count, inboxed = asyncio.run(deliver_all(set()))
    assert bodies == expected_bodies()
    assert direct_count == 59 and inboxed == 1  # every chunk but the last went straight out


def test_a_send_that_waits_hands_the_next_chunks_to_the_inbox_in_order() -> None:
    bodies, direct_count, inboxed = asyncio.run(deliver_all(SLOW_SENDS))
    assert bodies == expected_bodies()  # the client still reads every event once, in order
    assert direct_count > 0 and inboxed > 1
