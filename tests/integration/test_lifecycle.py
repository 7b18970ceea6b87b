"""Model lifecycle through the real API, lifecycle manager and model servers (tiny models, no Ray):
shared concurrent loads, drain and force unloads, interleaving, autoload, keep-alive and pinning
(the memory budget and shutdown: test_lifecycle_budget.py)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from typing import Any

import pytest

from deployments.errors import ServiceUnavailableError
from deployments.protocol import Chunk
from deployments.server import ModelStatus
from tests.integration.lifecycle_app import A, B, wire


async def test_concurrent_loads_do_one_load(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A, "load_on_start": False}]) as app:
        responses = await asyncio.gather(*(app.http.post("/load", json={"model": A}) for _ in range(6)))
        assert [r.status_code for r in responses] == [200] * 6
        assert {r.json()["status"] for r in responses} == {"loaded"}
        assert app.servers[A].num_loads == 1
        assert (await app.http.post("/load", json={"model": A})).json()["num_loads"] == 1  # loaded: no new load


async def test_unload_drains_streams_and_refuses_new_requests_with_503(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A}]) as app:
        stream = app.lifecycle.generate(A, wire())
        first = await stream.__anext__()
        unloading = asyncio.ensure_future(app.lifecycle.unload(A))
        await asyncio.sleep(0.1)
        assert app.servers[A].state is ModelStatus.UNLOADING and not unloading.done()
        refused = await app.http.post("/v1/completions", json={"model": A, "prompt": "hi"})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "model_unloading"
        chunks = [first] + [c async for c in stream]
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 60
        assert (await unloading)["status"] == "unloaded"
        assert (await app.models())[A]["releases"] == {"manual": 1}


async def test_a_stream_closed_between_chunks_leaves_the_engine_at_once(make_app: Callable[..., Any]) -> None:
    """Closed at a yield (not mid-await), every generator down to the engine is closed now, not
    whenever the garbage collector finds it: the engine holds no request right after aclose()."""
    async with make_app([{"id": A}]) as app:
        gc.disable()  # a leaked inner generator would otherwise be closed by a collection at random
        try:
            stream = app.lifecycle.generate(A, wire())
            assert isinstance(await stream.__anext__(), Chunk)
            assert app.servers[A].engine.num_requests == 1  # type: ignore[union-attr]
            await stream.aclose()  # type: ignore[attr-defined]
            assert app.servers[A].engine.num_requests == 0  # type: ignore[union-attr]
        finally:
            gc.enable()


async def test_force_unload_ends_streams_with_an_error(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A}]) as app:
        stream = app.lifecycle.generate(A, wire(max_tokens=90, prompt="x"))
        await stream.__anext__()
        status = await app.lifecycle.unload(A, force=True)
        assert status["status"] == "unloaded"
        with pytest.raises(ServiceUnavailableError) as info:
            async for _ in stream:
                pass
        assert info.value.code == "model_unloaded"


@pytest.mark.parametrize("calls", [["load", "unload", "load", "unload", "load"], ["unload", "load", "unload", "load", "unload"]])
async def test_interleaved_load_unload_ends_in_the_last_calls_state(make_app: Callable[..., Any], calls: list[str]) -> None:
    async with make_app([{"id": A}]) as app:
        tasks = []
        for action in calls:  # several clients, each call issued before the previous one finished
            tasks.append(asyncio.ensure_future(app.http.post(f"/{action}", json={"model": A})))
            await asyncio.sleep(0.01)
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
        wanted = "loaded" if calls[-1] == "load" else "unloaded"
        assert (await app.models())[A]["status"] == wanted
        assert app.servers[A].state.value == wanted


async def test_autoload_streams_progress_comments_and_409_without_autoload(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A, "load_on_start": False}, {"id": B, "load_on_start": False, "autoload": False}]) as app:
        body = {"model": A, "prompt": "Hi", "max_tokens": 4, "stream": True}
        response = await app.http.post("/v1/completions", json=body)
        assert response.status_code == 200
        lines = [line for line in response.text.splitlines() if line]
        assert lines[0].startswith(": loading model model-a"), lines[:3]
        assert lines[-1] == "data: [DONE]" and any(json.loads(x[6:])["choices"] for x in lines if x.startswith("data: {"))
        assert (await app.models())[A]["status"] == "loaded"
        refused = await app.http.post("/infer", json={"model": B, "prompt": "Hi"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_not_loaded"


async def test_idle_release_after_keep_alive_and_pinned_stays(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A, "keep_alive": "300ms"}, {"id": B, "keep_alive": "300ms", "pinned": True}]) as app:
        for model in (A, B):
            assert (await app.http.post("/infer", json={"model": model, "prompt": "Hi", "max_tokens": 2})).status_code == 200
        info = await app.models()
        assert info[A]["keep_alive_expires_at"] is not None and info[B]["keep_alive_expires_at"] is None
        deadline = asyncio.get_running_loop().time() + 10.0  # released after 300 ms idle; unloading takes a moment on a busy host
        while (info := await app.models())[A]["status"] != "unloaded" and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert info[A]["status"] == "unloaded" and info[A]["releases"] == {"idle": 1}
        assert info[B]["status"] == "loaded" and info[B]["releases"] == {}
        ready = await app.http.get("/readyz")  # released by policy, loads on demand: still ready
        assert ready.status_code == 200, ready.text


async def test_requests_ending_save_the_clock_at_most_once_a_second_and_the_last_one_lands(make_app: Callable[..., Any]) -> None:
    """Each request that ends restarts its model's keep-alive clock; the shared store (an actor call per
    save behind Ray) gets that at most every TOUCH_SAVE_EVERY_S, and the last clock always reaches it."""
    from serve_app import lifecycle as lifecycle_module

    async with make_app([{"id": A, "keep_alive": "1h"}]) as app:
        saves: list[float] = []
        store_save = app.lifecycle.store.save

        def counting_save(model_id: str, record: Any) -> None:
            saves.append(record.last_used)
            store_save(model_id, record)

        app.lifecycle.store.save = counting_save  # type: ignore[method-assign]
        for _ in range(6):
            assert (await app.http.post("/infer", json={"model": A, "prompt": "Hi", "max_tokens": 1})).status_code == 200
        assert 1 <= len(saves) <= 2  # one at once, then at most one deferred within the interval
        await asyncio.sleep(lifecycle_module.TOUCH_SAVE_EVERY_S + 0.2)
        local = app.lifecycle.usage[A].record
        assert saves[-1] == local.last_used and app.lifecycle.store.store.records[A].expires_at == local.expires_at  # type: ignore[attr-defined]
        kept = await app.http.post("/infer", json={"model": A, "prompt": "Hi", "max_tokens": 1, "keep_alive": "2h"})
        assert kept.status_code == 200 and saves[-1] == app.lifecycle.usage[A].record.last_used  # a change: saved at once


async def test_per_request_keep_alive_zero_unloads_after_the_request(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A, "keep_alive": -1}]) as app:
        kept = await app.http.post("/infer", json={"model": A, "prompt": "Hi", "max_tokens": 2})
        assert kept.status_code == 200 and (await app.models())[A]["keep_alive_expires_at"] is None
        done = await app.http.post("/infer", json={"model": A, "prompt": "Hi", "max_tokens": 2, "keep_alive": 0})
        assert done.status_code == 200 and done.json()["text"] is not None
        for _ in range(50):
            if app.servers[A].state is ModelStatus.UNLOADED:
                break
            await asyncio.sleep(0.05)
        assert (await app.models())[A]["releases"] == {"idle": 1}
        bad = await app.http.post("/infer", json={"model": A, "prompt": "Hi", "keep_alive": "soon"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
