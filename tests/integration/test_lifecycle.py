"""Model lifecycle through the real API, lifecycle manager and model servers (tiny models, no Ray):
shared concurrent loads, drain and force unloads, interleaving, autoload, keep-alive, pinning, the
memory budget (release of idle models, 507 when nothing may go or a release frees nothing, in call
order with users' transitions of the released model), and shutdown cancelling background work."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from deployments.errors import InsufficientMemoryError, ServiceUnavailableError
from deployments.server import ModelServer, ModelStatus
from deployments.protocol import Chunk, GenerateRequest
from serve_app.api import create_api
from serve_app.clients import InProcessModelClient, ModelRegistry
from serve_app.config import parse_app_settings
from serve_app.lifecycle import LifecycleManager

A, B = "model-a", "model-b"
LONG = {"max_tokens": 60, "temperature": 0, "ignore_eos": True}


class App:
    def __init__(self, http: httpx.AsyncClient, lifecycle: LifecycleManager, servers: dict[str, ModelServer], api: FastAPI) -> None:
        self.http, self.lifecycle, self.servers, self.api = http, lifecycle, servers, api

    async def models(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in (await self.http.get("/models")).json()["data"]}


@pytest.fixture
def make_app(tiny_model_dir: Path) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(models: list[dict[str, Any]], **settings: Any) -> AsyncIterator[App]:
        defaults = {"source": str(tiny_model_dir), "max_model_len": 96, "max_num_seqs": 4}
        app_settings = parse_app_settings(
            {"models": [defaults | m for m in models], "idle_check_interval_s": 0.1, "load_progress_interval_s": 0.05} | settings
        )
        servers = {m.id: ModelServer(m.id, m.engine_config(), m.load_on_start, drain_timeout_s=30) for m in app_settings.models}
        registry = ModelRegistry({mid: InProcessModelClient(s) for mid, s in servers.items()})
        lifecycle = LifecycleManager(registry, app_settings)
        api = create_api(registry, app_settings, lifecycle)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://127.0.0.1", timeout=60) as http:
            yield App(http, lifecycle, servers, api)
        for server in servers.values():
            await server.unload(force=True)

    return make


def wire(prompt: str = "Hello there", **params: Any) -> GenerateRequest:
    return GenerateRequest("", LONG | params, prompt=prompt)


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


async def budget_between(app: App, low: str, high: str) -> int:
    """A budget that holds `low`'s footprint plus `high`'s need minus one byte: one must go."""
    info = await app.models()
    return int(info[low]["memory_estimate"]["need_bytes"] + info[high]["memory_estimate"]["need_bytes"] - 1)


async def test_load_over_budget_releases_the_least_recently_used_idle_model(make_app: Callable[..., Any]) -> None:
    models = [{"id": A}, {"id": B, "load_on_start": False}, {"id": "model-c"}]
    async with make_app(models) as app:
        await app.http.post("/infer", json={"model": "model-c", "prompt": "Hi", "max_tokens": 2})  # c used last: a is LRU
        info = await app.models()
        held = info[A]["memory_estimate"]["need_bytes"] + info["model-c"]["memory_estimate"]["need_bytes"]
        app.lifecycle.settings.memory_budget["cpu"] = held + info[B]["memory_estimate"]["need_bytes"] - 1
        loaded = await app.http.post("/load", json={"model": B})
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
        info = await app.models()
        assert info[A]["status"] == "unloaded" and info[A]["releases"] == {"memory_pressure": 1}
        assert info["model-c"]["status"] == "loaded"


async def test_load_that_cannot_fit_is_refused_with_507_and_nothing_is_lost(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A, "pinned": True}, {"id": B, "load_on_start": False}, {"id": "model-c"}]) as app:
        app.lifecycle.settings.memory_budget["cpu"] = await budget_between(app, A, B)
        stream = app.lifecycle.generate("model-c", wire())  # model-c is busy: it may not be released
        first = await stream.__anext__()
        refused = await app.http.post("/v1/completions", json={"model": B, "prompt": "Hi", "stream": True})
        assert refused.status_code == 507, refused.text
        error = refused.json()["error"]
        assert error["code"] == "memory_budget_exceeded" and "MiB" in error["message"] and "model-a" in error["message"]
        chunks = [first] + [c async for c in stream]  # the request in flight finished untouched
        assert chunks[-1].usage.completion_tokens == 60
        info = await app.models()
        assert info[A]["status"] == info["model-c"]["status"] == "loaded" and info[B]["status"] == "unloaded"
        assert info[A]["releases"] == info["model-c"]["releases"] == {}
        with pytest.raises(InsufficientMemoryError):
            await app.lifecycle.load(B)


async def test_stop_cancels_the_idle_loop_and_a_release_under_way(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A, "keep_alive": -1}], idle_check_interval_s=60) as app:
        started, cancelled = asyncio.Event(), []

        async def slow_unload(force: bool = False, reason: str = "manual") -> dict[str, Any]:  # a long drain
            started.set()
            try:
                return await asyncio.Event().wait()  # type: ignore[func-returns-value]
            except asyncio.CancelledError:
                cancelled.append(reason)
                raise

        app.lifecycle.registry.get(A).unload = slow_unload  # type: ignore[method-assign]
        async with app.api.router.lifespan_context(app.api):  # as the app's server runs it
            idle_loop = app.lifecycle._idle_task
            assert idle_loop is not None and not idle_loop.done()
            assert (await app.http.post("/infer", json={"model": A, "prompt": "Hi", "max_tokens": 2, "keep_alive": 0})).status_code == 200
            await asyncio.wait_for(started.wait(), 10)  # the release after it runs in the background
            background = set(app.lifecycle._tasks)
            assert background and app.lifecycle.usage[A].transitions.busy
        assert idle_loop.cancelled() and all(t.cancelled() for t in background) and not app.lifecycle._tasks
        assert cancelled == ["idle"] and not app.lifecycle.usage[A].transitions.busy  # the release itself stopped


def log_transitions(app: App, model_id: str, log: list[str], delay_s: float) -> None:
    """Wrap the model's client so its loads and unloads (each taking `delay_s` longer) are logged."""
    client = app.lifecycle.registry.get(model_id)
    load, unload = client.load, client.unload

    async def logged(name: str, call: Callable[[], Any]) -> dict[str, Any]:
        log.append(f"{name} start")
        await asyncio.sleep(delay_s)
        status: dict[str, Any] = await call()
        log.append(f"{name} end")
        return status

    client.load = lambda: logged("load", load)  # type: ignore[method-assign]
    client.unload = lambda force=False, reason="manual": logged(f"unload {reason}", lambda: unload(force, reason))  # type: ignore[method-assign]


# A user's load of A queues behind the release of A; an unload joins it (the same transition, under way).
@pytest.mark.parametrize(("action", "then"), [("load", ["load start", "load end"]), ("unload", [])])
async def test_a_memory_pressure_release_and_a_users_transition_of_one_model_run_in_call_order(
    make_app: Callable[..., Any], action: str, then: list[str]
) -> None:
    async with make_app([{"id": A}, {"id": B, "load_on_start": False}], idle_check_interval_s=60) as app:
        app.lifecycle.settings.memory_budget["cpu"] = await budget_between(app, A, B)
        log: list[str] = []
        log_transitions(app, A, log, delay_s=0.3)
        load_b = asyncio.ensure_future(app.http.post("/load", json={"model": B}))  # must release A first
        while not (log or load_b.done()):
            await asyncio.sleep(0.01)
        assert log == ["unload memory_pressure start"], (log, load_b.done() and load_b.result().text)
        user = asyncio.ensure_future(app.http.post(f"/{action}", json={"model": A}))  # while A is being released
        b, a = await asyncio.gather(load_b, user)
        assert log == ["unload memory_pressure start", "unload memory_pressure end", *then]
        wanted = "loaded" if action == "load" else "unloaded"  # the later call decides
        assert b.json()["status"] == "loaded" and a.json()["status"] == wanted, (b.text, a.text)
        info = await app.models()
        assert info[A]["status"] == wanted and info[A]["releases"] == {"memory_pressure": 1}
        assert info[B]["releases"] == ({"memory_pressure": 1} if info[B]["status"] == "unloaded" else {})  # if A needed room


async def test_a_load_whose_releases_free_nothing_is_refused_with_507(make_app: Callable[..., Any]) -> None:
    async with make_app([{"id": A}, {"id": B, "load_on_start": False}], idle_check_interval_s=60) as app:
        app.lifecycle.settings.memory_budget["cpu"] = await budget_between(app, A, B)
        client, reasons = app.lifecycle.registry.get(A), []

        async def unload_that_frees_nothing(force: bool = False, reason: str = "manual") -> dict[str, Any]:
            reasons.append(reason)  # as when another router replica loads it right back
            return await client.status()  # type: ignore[no-any-return]

        client.unload = unload_that_frees_nothing  # type: ignore[method-assign]
        refused = await app.http.post("/load", json={"model": B})
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "memory_budget_exceeded", refused.text
        assert reasons and set(reasons) == {"memory_pressure"} and app.servers[B].state is ModelStatus.UNLOADED
