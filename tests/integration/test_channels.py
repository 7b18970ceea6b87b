"""Channels on the model server (deployments.channel), the real engine on a tiny model, no Ray: a
request alone streams on its own stream; with another of its caller's requests running it sends its
chunks through the caller's channel, one message per step for all of them, with the same tokens; a channel that closes
under a request fails that request; a channel call reaching the wrong replica is refused."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.channel import Channel
from deployments.engine import EngineConfig
from deployments.errors import ChannelClosedError, ServiceUnavailableError
from deployments.protocol import Chunk, GenerateRequest, Routed
from deployments.server import ModelServer
from serve_app.channels import ChannelSet

PARAMS = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[ModelServer]:
    server = ModelServer("tiny", EngineConfig(model=str(tiny_model_dir), max_model_len=128, max_num_seqs=8))
    yield server
    server.channels.close_all()


def request(request_id: str, prompt: str, channels: tuple[str, ...] | None) -> GenerateRequest:
    return GenerateRequest(request_id, dict(PARAMS), prompt=prompt, channels=channels)


def routed_as(items: list[object]) -> tuple[str, bool]:
    """(replica, via_channel) of a request's first item, its `Routed` (which also names the replica's socket)."""
    first = items[0]
    assert isinstance(first, Routed)
    return first.replica, first.via_channel


async def collect(server: ModelServer, req: GenerateRequest) -> tuple[list[object], list[int]]:
    items = [item async for item in server.generate(req)]
    return items, [t for item in items if isinstance(item, Chunk) for t in item.token_ids]


def test_requests_share_the_callers_channel(server: ModelServer) -> None:
    async def run() -> None:
        _, alone = await collect(server, request("ref-a", "hello world", None))
        _, alone_b = await collect(server, request("ref-b", "the cat sat", None))
        channel = server.subscribe("ch-1", "local")
        assert await channel.__anext__() == Routed("local", True)
        batches: list[list[tuple[str, Chunk]]] = []

        async def read() -> None:
            async for batch in channel:
                batches.append(batch)  # type: ignore[arg-type]

        reader = asyncio.ensure_future(read())
        first = asyncio.ensure_future(collect(server, request("a", "hello world", ("ch-0", "ch-1"))))
        await asyncio.sleep(0)  # `a` is running when `b` starts
        (items_b, own_b), (items_c, _) = await asyncio.gather(
            collect(server, request("b", "the cat sat", ("ch-1",))), collect(server, request("c", "hello world", ("ch-1",)))
        )
        items_a, tokens_a = await first
        await asyncio.sleep(0.05)
        reader.cancel()  # the router closes its channel: the replica forgets it
        await asyncio.gather(reader, return_exceptions=True)
        # `a` ran alone when it started: its own stream; `b` went through the channel, its stream held only `Routed`.
        assert routed_as(items_a) == ("local", False) and tokens_a == alone
        assert routed_as(items_b) == routed_as(items_c) == ("local", True) and len(items_b) == len(items_c) == 1 and own_b == []
        for rid, reference in (("b", alone_b), ("c", alone)):
            via = [chunk for batch in batches for r, chunk in batch if r == rid]
            assert [t for c in via for t in c.token_ids] == reference
            assert via[-1].finish_reason == "length" and via[-1].usage is not None and via[-1].usage.completion_tokens == 12
        assert {r for batch in batches for r, _ in batch} == {"b", "c"}
        assert any({r for r, _ in batch} == {"b", "c"} for batch in batches)  # one message carries both requests' step
        assert len(server.channels) == 0

    asyncio.run(run())


def test_a_channel_closing_fails_its_requests(server: ModelServer) -> None:
    async def run() -> None:
        channel = server.subscribe("ch-2", "local")
        await channel.__anext__()
        first = asyncio.ensure_future(collect(server, request("c", "hello world", ("ch-2",))))
        await asyncio.sleep(0)
        second = server.generate(request("d", "the cat sat", ("ch-2",)))
        assert routed_as([await second.__anext__()]) == ("local", True)
        await channel.aclose()  # the router went away
        with pytest.raises(ChannelClosedError):
            await second.__anext__()
        await first  # the request on its own stream is unaffected
        assert server.engine is not None and server.engine.num_requests == 0

    asyncio.run(run())


def test_a_channel_call_for_another_replica_is_refused(server: ModelServer) -> None:
    async def run() -> None:
        with pytest.raises(ServiceUnavailableError, match="reached"):
            await server.subscribe("ch-3", "some-other-replica").__anext__()

    asyncio.run(run())


def test_an_idle_channel_ends_itself() -> None:
    """An open channel is an ongoing call (Ray Serve's graceful shutdown waits for those): it ends
    once none of its caller's requests has run for the idle time, and not while one runs."""

    async def run() -> None:
        channel = Channel()
        channel.num_running = 1
        task = asyncio.ensure_future(channel.batches(idle_close_s=0.05).__anext__())
        await asyncio.sleep(0.2)
        assert not task.done()  # a request is running (its tokens just have not come yet)
        channel.num_running = 0
        with pytest.raises(StopAsyncIteration):
            await task
        assert channel.closed

    asyncio.run(run())


def test_a_channel_through_the_replicas_socket_carries_even_a_request_alone(server: ModelServer) -> None:
    """The router's end opens the channel through the socket the replica's `Routed` names; the next
    request, alone, streams through it with the tokens it gets on its own stream; when the router
    closes it the replica forgets it."""

    server.channels.close_all()  # its socket was started on an earlier test's event loop, which is gone

    async def run() -> None:
        _, alone = await collect(server, request("ref-s", "hello world", None))
        channels = ChannelSet(None)  # type: ignore[arg-type] # no Ray: the socket needs no handle
        items, _ = await collect(server, request("s-1", "hello world", ()))
        routed = items[0]
        assert isinstance(routed, Routed) and not routed.via_channel and routed.channel_path is not None
        assert os.stat(os.path.dirname(routed.channel_path)).st_mode & 0o077 == 0  # only this user gets in
        channels.routed("s-1", routed)
        for _ in range(200):
            if channels.open:
                break
            await asyncio.sleep(0.01)
        assert list(channels.open) == ["local"] and len(server.channels) == 1
        request_id, inbox = channels.register("s-2")
        own, _ = await collect(server, request(request_id, "hello world", channels.channel_ids()))
        assert routed_as(own) == ("local", True) and len(own) == 1  # its own stream held only `Routed`
        channels.routed(request_id, own[0])  # type: ignore[arg-type]
        chunks = [await asyncio.wait_for(inbox.get(), 30)]
        while chunks[-1].finish_reason is None:  # type: ignore[union-attr]
            chunks.append(await asyncio.wait_for(inbox.get(), 30))
        assert [t for c in chunks for t in c.token_ids] == alone  # type: ignore[union-attr]
        channels.release(request_id)
        channels.readers["local"].cancel()  # the router closes its end: the replica forgets the channel
        await asyncio.sleep(0.2)
        assert len(server.channels) == 0 and not channels.open

    asyncio.run(run())


def test_socket_directories_of_killed_replicas_are_removed(server: ModelServer) -> None:
    stale = tempfile.mkdtemp(prefix="llm-serve-channel-999999999-")  # no such process
    live = tempfile.mkdtemp(prefix=f"llm-serve-channel-{os.getpid()}-")
    try:
        from deployments.channel_socket import ChannelListener

        listener = ChannelListener(server.channels.open, server.channels.close, "other")
        asyncio.run(listener.start())
        listener.close()
        assert not os.path.exists(stale) and os.path.isdir(live)
        assert listener.path is None
    finally:
        os.rmdir(live)
