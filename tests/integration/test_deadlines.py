"""Deadlines through the ingress over an in-process model server (tiny model, no Ray): the server's
default (`request_timeout_s`, no per-request `timeout`) ends a request with 504, and a request still
queued in the engine behind a full batch is ended by its deadline and leaves the engine's waiting
queue, while the running requests complete untouched. (tests/integration/test_faults.py covers a
per-request `timeout` on running work.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from deployments.server import ModelServer
from tests.inprocess import inprocess_api
from tests.integration.test_api import assert_error
from tests.integration.test_faults import LONG, engine_idle, slowed


@asynccontextmanager
async def tiny_app(model_dir: Path, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ModelServer]]:
    models = [{"id": "tiny", "source": str(model_dir), "max_model_len": 160, "max_num_seqs": 2}]
    async with inprocess_api({"models": models} | settings) as (http, servers):
        yield http, servers["tiny"]


@contextmanager
def slow_steps(server: ModelServer, delay_s: float = 0.02) -> Iterator[None]:
    """Each engine step `delay_s` longer, so that a 120-token request runs over two seconds."""
    runner = server.engine.engine.runner  # type: ignore[union-attr]
    runner.execute = slowed(runner.execute, delay_s)
    try:
        yield
    finally:
        del runner.execute


async def engine_counts(http: httpx.AsyncClient) -> tuple[int, int]:
    """(running, waiting) sequences in the model's engine, from its status."""
    kv_cache = (await http.get("/models/tiny")).json()["kv_cache"]
    return kv_cache["num_running"], kv_cache["num_waiting"]


async def until_counts(http: httpx.AsyncClient, wanted: tuple[int, int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while (counts := await engine_counts(http)) != wanted:
        assert time.monotonic() < deadline, f"engine (running, waiting) {counts}, wanted {wanted}"
        await asyncio.sleep(0.01)


def assert_deadline_error(response: httpx.Response, timeout_s: float) -> None:
    error = assert_error(response, 504, param="timeout")
    assert error["code"] == "deadline_exceeded" and error["type"] == "timeout_error"
    assert f"deadline of {timeout_s:g} s" in error["message"], error["message"]


async def test_the_server_default_deadline_ends_a_request_with_504_and_stops_the_engine(tiny_model_dir: Path) -> None:
    async with tiny_app(tiny_model_dir, request_timeout_s=0.4) as (http, server):
        with slow_steps(server):
            started = time.monotonic()
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", **LONG})  # no `timeout`
            elapsed = time.monotonic() - started
        assert_deadline_error(r, 0.4)
        assert 0.4 <= elapsed < 2.0  # ended at the deadline, not when the 120 tokens were done
        assert await engine_idle(server, within_s=1.0) < 1.0
        await until_counts(http, (0, 0), within_s=1.0)  # the scheduler let it go too
        ok = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3  # a short one fits the default


async def test_a_queued_request_past_its_deadline_leaves_the_engine_and_running_ones_complete(tiny_model_dir: Path) -> None:
    async with tiny_app(tiny_model_dir, request_timeout_s=60) as (http, server):
        with slow_steps(server):
            long = {"model": "tiny", "prompt": "hello", **LONG}
            running = [asyncio.ensure_future(http.post("/v1/completions", json=long)) for _ in range(2)]
            await until_counts(http, (2, 0), within_s=10)  # max_num_seqs=2: the batch is full
            queued = asyncio.ensure_future(http.post("/v1/completions", json=long | {"prompt": "queued", "timeout": 1.0}))
            await until_counts(http, (2, 1), within_s=1.0)  # it waits in the engine's queue
            assert_deadline_error(await queued, 1.0)
            await until_counts(http, (2, 0), within_s=1.0)  # gone from the waiting queue; the batch runs on
            assert server.engine.num_requests == 2  # type: ignore[union-attr]
            done = await asyncio.gather(*running)
        for r in done:  # the running requests were never touched by the other's deadline
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 120
        assert await engine_idle(server, within_s=1.0) < 1.0
