"""Retry-After of an overloaded model: the requests ahead over the measured service rate, through
`HandleModelClient` over a stand-in deployment handle whose queue fills as Ray Serve's does."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray.serve.exceptions import BackPressureError

from deployments.errors import OverloadedError
from deployments.protocol import Chunk, GenerateRequest, Usage
from serve_app.ray_client import HandleModelClient

FALLBACK_S, MAX_S = 5, 120  # ServiceRate.seconds_for's defaults: no rate measured yet, and the cap


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class QueueingHandle:
    """Stands in for a model deployment's `DeploymentHandle` (the dependency, not the client under
    test): each generation takes `service_s` on the clock and streams one chunk once `open` is set,
    and past `max_requests` at once `.remote()` raises Ray Serve's `BackPressureError`, as a handle
    whose queue is full does."""

    def __init__(self, max_requests: int, clock: Clock | None = None) -> None:
        self.max_requests = max_requests
        self.clock = clock
        self.service_s = 0.0
        self.num_active = 0
        self.open = asyncio.Event()
        self.open.set()

    def options(self, **_: Any) -> QueueingHandle:
        return self

    @property
    def generate(self) -> QueueingHandle:
        return self

    def remote(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        if self.num_active >= self.max_requests:
            raise BackPressureError(num_queued_requests=self.num_active, max_queued_requests=self.max_requests)
        self.num_active += 1
        return self._stream()

    async def _stream(self) -> AsyncIterator[Chunk]:
        try:
            await self.open.wait()
            if self.clock is not None:
                self.clock.now += self.service_s
            yield Chunk("done", [1], "stop", Usage(1, 1))
        finally:
            self.num_active -= 1


async def run_one(client: HandleModelClient) -> list[Chunk]:
    return [chunk async for chunk in client.generate(GenerateRequest("", {"max_tokens": 1}, prompt="hi"))]


async def complete_at_pace(client: HandleModelClient, handle: QueueingHandle, count: int, every_s: float) -> None:
    """`count` requests one after another, each served in `every_s`, then a minute idle (which must
    not count: the rate is per second of serving)."""
    handle.service_s = every_s
    for _ in range(count):
        assert (await run_one(client))[-1].finish_reason == "stop"
    handle.service_s = 0.0
    assert handle.clock is not None
    handle.clock.now += 50.0


async def refused(client: HandleModelClient, handle: QueueingHandle, num_ahead: int) -> OverloadedError:
    """Fill the queue with `num_ahead` held generations, then one more: the client's error for it."""
    handle.open.clear()
    held = [asyncio.ensure_future(run_one(client)) for _ in range(num_ahead)]
    await asyncio.sleep(0)  # each held generation reaches the handle
    assert handle.num_active == num_ahead == client.num_in_flight
    with pytest.raises(OverloadedError) as info:
        await run_one(client)
    handle.open.set()
    assert all(chunks[-1].finish_reason == "stop" for chunks in await asyncio.gather(*held))  # admitted ones complete
    assert client.num_in_flight == 0
    return info.value


def retry_after(error: OverloadedError) -> int:
    assert error.status_code == 503 and error.code == "overloaded"
    return int(error.headers["Retry-After"])


@pytest.mark.parametrize(("every_s", "num_ahead"), [(0.5, 6), (0.25, 9), (2.0, 7), (5.0, 30)])
async def test_retry_after_is_the_live_queue_over_the_measured_rate(every_s: float, num_ahead: int) -> None:
    clock = Clock()
    handle = QueueingHandle(max_requests=num_ahead, clock=clock)
    client = HandleModelClient("m", handle, "app", capacity=40, clock=clock)  # type: ignore[arg-type]
    await complete_at_pace(client, handle, count=11, every_s=every_s)
    rate = 10 / (10 * every_s)  # completions per second over the 11 measured ones
    error = await refused(client, handle, num_ahead)
    assert retry_after(error) == min(MAX_S, math.ceil(num_ahead / rate))  # the last case: capped
    assert retry_after(error) != FALLBACK_S
    if math.ceil(num_ahead / rate) < MAX_S:
        assert retry_after(error) != math.ceil(40 / rate)  # the requests ahead, not the configured capacity
    assert f"retry after {retry_after(error)}s" in str(error)


async def test_retry_after_is_the_fallback_before_any_completion() -> None:
    clock, handle = Clock(), QueueingHandle(max_requests=3)
    client = HandleModelClient("m", handle, "app", capacity=40, clock=clock)  # type: ignore[arg-type]
    assert retry_after(await refused(client, handle, num_ahead=3)) == FALLBACK_S


async def test_a_queue_filled_by_another_caller_counts_the_configured_capacity() -> None:
    clock = Clock()
    handle = QueueingHandle(max_requests=6, clock=clock)
    client = HandleModelClient("m", handle, "app", capacity=40, clock=clock)  # type: ignore[arg-type]
    await complete_at_pace(client, handle, count=11, every_s=0.5)  # 2 per second
    handle.max_requests = 0  # full, with none of this router's requests in it
    with pytest.raises(OverloadedError) as info:
        await run_one(client)
    assert retry_after(info.value) == math.ceil(40 / 2.0)
