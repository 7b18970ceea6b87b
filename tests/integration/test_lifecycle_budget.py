"""The memory budget through the real API, lifecycle manager and model servers (tiny models, no Ray):
release of idle models, 507 when nothing may go or a release frees nothing, in call order with users'
transitions of the released model; and shutdown cancelling background work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from deployments.errors import InsufficientMemoryError
from deployments.server import ModelStatus
from tests.integration.lifecycle_app import A, B, App, wire


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
