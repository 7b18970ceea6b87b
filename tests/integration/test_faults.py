"""Faults through the ingress over in-process model servers: deadlines end queued and running work
down to the engine, and a load that fails (missing or corrupt weights, not enough memory) is a
`failed` state with its reason that touches no other model."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.server import ModelServer
from tests.inprocess import inprocess_api
from tests.integration.test_api import assert_error, parse_sse

LONG = {"max_tokens": 120, "min_tokens": 120, "ignore_eos": True}
TOO_BIG = "too-big"  # the tiny model with a 1 TiB KV pool: more than any host running this has


@pytest.fixture(scope="module")
def broken_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    missing = tmp_path_factory.mktemp("missing")  # a config, no weights
    shutil.copy(tiny_model_dir / "config.json", missing / "config.json")
    corrupt = tmp_path_factory.mktemp("corrupt")
    for item in tiny_model_dir.iterdir():
        if item.is_file():
            shutil.copy(item, corrupt / item.name)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated: the header promises more
    return {"missing": missing, "corrupt": corrupt}


@pytest.fixture(scope="module")
async def app(tiny_model_dir: Path, broken_dirs: dict[str, Path]) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, ModelServer]]]:
    models = [{"id": "tiny", "source": str(tiny_model_dir), "max_model_len": 128, "max_num_seqs": 2}]
    models += [{"id": name, "source": str(path), "load_on_start": False, "autoload": False} for name, path in broken_dirs.items()]
    models += [{"id": TOO_BIG, "source": str(tiny_model_dir), "kv_cache_bytes": "1TiB", "load_on_start": False, "autoload": False}]
    # A budget the router lets the 1 TiB load through (else it refuses with 507 before the replica
    # tries): what stops it is the replica finding the memory is not there.
    async with inprocess_api({"models": models, "request_timeout_s": 30, "memory_budget": {"cpu": "4TiB"}}) as (http, servers):
        yield http, servers


async def engine_idle(server: ModelServer, within_s: float) -> float:
    """Seconds until the model's engine holds no request; fails after `within_s`."""
    start = time.monotonic()
    while server.engine is not None and server.engine.num_requests:
        assert time.monotonic() - start < within_s, "the engine still runs the request"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_a_deadline_ends_a_whole_request_with_504_and_stops_the_engine(app) -> None:  # type: ignore[no-untyped-def]
    http, servers = app
    r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "timeout": 0.02, **LONG})
    error = assert_error(r, 504, param="timeout")
    assert error["code"] == "deadline_exceeded" and error["type"] == "timeout_error"
    assert await engine_idle(servers["tiny"], within_s=1.0) < 1.0


async def test_a_deadline_mid_stream_is_an_error_event_then_done(app) -> None:  # type: ignore[no-untyped-def]
    http, servers = app
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "timeout": 0.3, **LONG, "max_tokens": 90, "min_tokens": 90}
    servers["tiny"].engine.engine.runner.execute = slowed(servers["tiny"].engine.engine.runner.execute, 0.01)  # type: ignore[union-attr]
    try:
        r = await http.post("/v1/chat/completions", json=body)
    finally:
        del servers["tiny"].engine.engine.runner.execute  # type: ignore[union-attr]
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "deadline_exceeded"  # type: ignore[index]
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-2] if isinstance(e, dict))
    assert await engine_idle(servers["tiny"], within_s=1.0) < 1.0


def slowed(step, delay_s: float):  # type: ignore[no-untyped-def]
    """The runner's step taking `delay_s` longer, so that a 120-token stream outlasts a short deadline."""
    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(delay_s)
        return step(*args, **kwargs)
    return run


async def assert_failed_alone(http: httpx.AsyncClient, servers: dict[str, ModelServer], broken: str) -> str:
    """`/load` of `broken` ends `failed` with a reason, once, while `tiny` keeps serving; the reason."""
    r = await http.post("/load", json={"model": broken})
    assert r.status_code == 200 and r.json()["status"] == "failed", r.text
    info = (await http.get("/models")).json()["data"]
    status = {m["id"]: m for m in info}
    assert status[broken]["status"] == "failed" and status[broken]["error"]
    assert "Traceback" not in status[broken]["error"]
    assert status["tiny"]["status"] == "loaded"
    again = await http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert again.status_code == 200
    refused = await http.post("/v1/completions", json={"model": broken, "prompt": "x"})
    assert_error(refused, 409)
    assert servers[broken].num_loads == 1  # no retry loop
    return str(status[broken]["error"])


@pytest.mark.parametrize("broken", ["missing", "corrupt"])
async def test_a_failed_load_reports_why_and_touches_no_other_model(app, broken: str) -> None:  # type: ignore[no-untyped-def]
    http, servers = app
    await assert_failed_alone(http, servers, broken)


async def test_a_load_that_cannot_fit_in_memory_fails_before_allocating(app) -> None:  # type: ignore[no-untyped-def]
    http, servers = app
    rss_before = psutil.Process().memory_info().rss
    reason = await assert_failed_alone(http, servers, TOO_BIG)
    assert psutil.Process().memory_info().rss - rss_before < 1 << 30  # refused before the KV pool (or weights) was allocated
    assert servers[TOO_BIG].engine is None and servers[TOO_BIG].resident_bytes == 0
    numbers = re.search(r"not enough memory .* needs (\d+) bytes .* on cpu, (\d+) bytes \([\d.]+ GiB\) are available", reason)
    assert numbers is not None, reason
    need, available = int(numbers[1]), int(numbers[2])
    assert need >= 1 << 40 and available < need and available <= psutil.virtual_memory().total
