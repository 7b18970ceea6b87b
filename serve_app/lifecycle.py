"""When models load and unload: on demand, after idling, and under a memory budget.

Ray Serve runs each model's replicas and delivers the wanted state to every one of them
(`user_config` -> `reconfigure`); what Ray cannot express lives here, in the router, small:
- one transition at a time per model, in call order; concurrent loads share one load;
- autoload on the first request (SSE progress comments while it waits), 409 when `autoload: false`;
- keep-alive idle release (config default, per-request override, 0 = after this request), `pinned`;
- a per-device memory budget: release least-recently-used idle models, else refuse with 507;
- why every release happened, counted per model and handed to `on_release` (a metric in Ray).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import ModelNotLoadedError, ServiceUnavailableError
from serve_app.clients import ModelClient, ModelRegistry
from serve_app.config import AppSettings, ModelSettings
from serve_app.memory_budget import MiB, plan_release

logger = logging.getLogger(__name__)
Chunk = dict[str, Any]


@dataclass
class ModelUsage:
    """The router's view of one model: requests in flight, last use, keep-alive, transitions."""

    in_flight: int = 0
    last_used: float = 0.0
    keep_alive_s: float | None = None  # None: forever
    expires_at: float | None = None
    maybe_loaded: bool = False
    releases: Counter[str] = field(default_factory=Counter)
    pending: tuple[str, asyncio.Task[dict[str, Any]]] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LifecycleManager:
    """Loads, unloads and releases models over their `ModelClient`s."""

    def __init__(
        self, registry: ModelRegistry, settings: AppSettings, on_release: Callable[[str, str], None] | None = None
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.models: dict[str, ModelSettings] = {m.id: m for m in settings.models}
        self.on_release = on_release
        now = time.time()
        self.usage = {
            m.id: ModelUsage(last_used=now, keep_alive_s=m.keep_alive_s, maybe_loaded=m.load_on_start) for m in settings.models
        }
        for usage in self.usage.values():
            usage.expires_at = None if usage.keep_alive_s is None else now + usage.keep_alive_s
        self._budget_lock = asyncio.Lock()
        self._idle_task: asyncio.Task[None] | None = None
        self._last_status: dict[str, dict[str, Any]] = {}

    # --- transitions -------------------------------------------------------------------------
    async def load(self, model_id: str, keep_alive_s: float | None = None) -> dict[str, Any]:
        """Load (idempotent: concurrent calls share one load); fits the budget first."""
        self.registry.get(model_id)
        if keep_alive_s is not None:
            self._set_keep_alive(model_id, keep_alive_s)
        return await self._transition(model_id, "load")

    async def unload(self, model_id: str, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        """Unload: drain requests in flight (or end them at once with `force`)."""
        self.registry.get(model_id)
        return await self._transition(model_id, "unload", force=force, reason=reason)

    async def _transition(self, model_id: str, action: str, **kwargs: Any) -> dict[str, Any]:
        """Run transitions of one model one at a time, in call order, so the last call decides the
        final state; a call equal to the latest pending one joins it instead of repeating it."""
        usage = self.usage[model_id]
        if usage.pending is not None and usage.pending[0] == action and not usage.pending[1].done():
            return await asyncio.shield(usage.pending[1])
        run = self._do_load(model_id) if action == "load" else self._do_unload(model_id, **kwargs)
        task = asyncio.ensure_future(self._locked(usage.lock, run))
        usage.pending = (action, task)
        return await asyncio.shield(task)

    @staticmethod
    async def _locked(lock: asyncio.Lock, run: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        async with lock:
            return await run

    async def _do_load(self, model_id: str) -> dict[str, Any]:
        async with self._budget_lock:
            await self._make_room(model_id)
            status = await self.registry.get(model_id).load()
        usage = self.usage[model_id]
        usage.maybe_loaded = status.get("status") == "loaded"
        self._last_status[model_id] = status
        self._touch(usage)
        return status

    async def _do_unload(self, model_id: str, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        usage = self.usage[model_id]
        was_loaded = usage.maybe_loaded
        status = await self.registry.get(model_id).unload(force=force, reason=reason)
        usage.maybe_loaded = False
        if was_loaded:
            self._count_release(model_id, reason)
        return status

    def _count_release(self, model_id: str, reason: str) -> None:
        self.usage[model_id].releases[reason] += 1
        logger.info("model %s released: %s", model_id, reason)
        if self.on_release is not None:
            self.on_release(model_id, reason)

    # --- the memory budget -------------------------------------------------------------------
    async def _make_room(self, model_id: str) -> None:
        """Before a load: release what `plan_room` chose, least recently used first."""
        for mid, held in await self.plan_room(model_id):
            logger.info("releasing %s (%.0f MiB) to make room for %s", mid, held / MiB, model_id)
            await self._do_unload(mid, reason="memory_pressure")

    async def plan_room(self, model_id: str) -> list[tuple[str, int]]:
        """The idle unpinned models (and bytes they hold) to release so that `model_id` fits its
        device's budget; raises 507 when even releasing all of them would not do."""
        device = self.models[model_id].memory_device
        budget = self.settings.budget_bytes(device)
        if budget is None:
            return []
        peers = [m.id for m in self.models.values() if m.memory_device == device]
        statuses = dict(zip(peers, await asyncio.gather(*(self._status(mid) for mid in peers))))
        idle = sorted((mid for mid in peers if self._releasable(mid)), key=lambda mid: self.usage[mid].last_used)
        return plan_release(model_id, device, budget, statuses, idle)

    def _releasable(self, model_id: str) -> bool:
        usage, model = self.usage[model_id], self.models[model_id]
        busy = usage.in_flight > 0 or (usage.pending is not None and not usage.pending[1].done())
        return not model.pinned and not busy

    # --- requests ----------------------------------------------------------------------------
    async def generate(self, model_id: str, request: dict[str, Any], keep_alive_s: float | None = None) -> AsyncIterator[Chunk]:
        """The model's chunks, loading it first if it is unloaded and may autoload; while it loads,
        chunks `{"progress": message}` are yielded (SSE comments). Errors before any chunk raise."""
        client = self.registry.get(model_id)
        usage = self.usage[model_id]
        self._start_idle_loop()
        if usage.pending is not None and usage.pending[0] == "unload" and not usage.pending[1].done():
            raise ServiceUnavailableError(f"model {model_id!r} is unloading; retry once it is loaded", code="model_unloading")
        usage.in_flight += 1
        try:
            if usage.pending is not None and not usage.pending[1].done():  # a load is under way: join it
                async for progress in self._wait_for_load(model_id, usage.pending[1]):
                    yield progress
            chunks = client.generate(request)
            try:
                first = await chunks.__anext__()
            except (ModelNotLoadedError, ServiceUnavailableError) as exc:
                await chunks.aclose()  # type: ignore[attr-defined]
                if not self._should_autoload(model_id, exc):
                    raise
                await self.plan_room(model_id)  # refuse with a real 507 before the stream starts
                loading = asyncio.ensure_future(self._transition(model_id, "load"))
                async for progress in self._wait_for_load(model_id, loading):
                    yield progress
                chunks = client.generate(request)
                first = await chunks.__anext__()
            usage.maybe_loaded = True
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            usage.in_flight -= 1
            if keep_alive_s is not None:
                usage.keep_alive_s = None if keep_alive_s == float("inf") else keep_alive_s
            self._touch(usage)
            if usage.expires_at is not None and usage.expires_at <= time.time() and usage.in_flight == 0:
                self._spawn(self._release_if_idle(model_id))  # keep_alive 0: unload after this request

    def _should_autoload(self, model_id: str, exc: Exception) -> bool:
        if isinstance(exc, ServiceUnavailableError) and exc.code != "model_loading":
            return False  # overloaded or unloading: the client retries
        if not self.models[model_id].autoload:
            return False
        return True

    async def _wait_for_load(self, model_id: str, task: asyncio.Future[dict[str, Any]]) -> AsyncIterator[Chunk]:
        started = time.monotonic()
        while True:
            yield {"progress": f"loading model {model_id} ({time.monotonic() - started:.0f} s)"}
            done, _ = await asyncio.wait({task}, timeout=self.settings.load_progress_interval_s)
            if done:
                break
        status = task.result()  # raises the load's error (e.g. 507)
        if status.get("status") != "loaded":
            raise ModelNotLoadedError(
                f"model {model_id!r} could not be loaded: {status.get('error') or status.get('status')}", param="model", code="model_load_failed"
            )

    # --- idle release ------------------------------------------------------------------------
    def _set_keep_alive(self, model_id: str, keep_alive_s: float) -> None:
        usage = self.usage[model_id]
        usage.keep_alive_s = None if keep_alive_s == float("inf") else keep_alive_s
        self._touch(usage)

    @staticmethod
    def _touch(usage: ModelUsage) -> None:
        usage.last_used = time.time()
        usage.expires_at = None if usage.keep_alive_s is None else usage.last_used + usage.keep_alive_s

    async def release_idle(self) -> list[str]:
        """Unload every model whose keep-alive ran out; returns their ids."""
        now = time.time()
        expired = [
            mid for mid, u in self.usage.items()
            if u.maybe_loaded and u.expires_at is not None and u.expires_at <= now and not self.models[mid].scales_to_zero
        ]
        released = [mid for mid in expired if await self._release_if_idle(mid)]
        return released

    async def _release_if_idle(self, model_id: str) -> bool:
        usage = self.usage[model_id]
        if not self._releasable(model_id) or not usage.maybe_loaded:
            return False
        if usage.expires_at is None or usage.expires_at > time.time():
            return False
        await self._transition(model_id, "unload", reason="idle")
        return True

    def start(self) -> None:
        """Start the idle-release loop (also started by the first request or status call)."""
        self._start_idle_loop()

    def _start_idle_loop(self) -> None:
        if self._idle_task is None or self._idle_task.done():
            self._idle_task = asyncio.ensure_future(self._idle_loop())

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_check_interval_s)
            try:
                await self.release_idle()
            except Exception:  # noqa: BLE001 - one failed release must not stop the loop
                logger.exception("idle release failed")

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        asyncio.ensure_future(coroutine).add_done_callback(_log_failure)

    # --- status ------------------------------------------------------------------------------
    async def _status(self, model_id: str) -> dict[str, Any]:
        client: ModelClient = self.registry.get(model_id)
        if not self.models[model_id].scales_to_zero:
            return await client.status()
        # Never ask a scale-to-zero model's replica: with none it would start one, and any call
        # counts as traffic to Ray's autoscaler, so polling GET /models would keep it from zero.
        # Ray's replica count, the router's view and the last status a load returned stand in.
        replicas = await client.num_replicas()
        state = "loaded" if replicas and self.usage[model_id].maybe_loaded else "unloaded"
        return self._last_status.get(model_id, {"id": model_id}) | {"status": state, "replicas": replicas}

    async def status(self, model_id: str) -> dict[str, Any]:
        """The replica's status plus the router's lifecycle view of the model. A status call counts
        against the replica's request limit like any call; when the model is at capacity, the last
        status seen is returned instead of an error (the model is busy, not broken)."""
        self._start_idle_loop()
        try:
            status = await self._status(model_id)
            if not self.models[model_id].scales_to_zero:
                self._last_status[model_id] = status
        except ServiceUnavailableError as exc:
            if exc.code != "overloaded" or model_id not in self._last_status:
                raise
            status = self._last_status[model_id]
        usage, model = self.usage[model_id], self.models[model_id]
        if status.get("status") in ("loaded", "unloaded"):
            usage.maybe_loaded = status["status"] == "loaded" or usage.maybe_loaded and usage.in_flight > 0
        return status | {
            "pinned": model.pinned,
            "autoload": model.autoload,
            "keep_alive_s": usage.keep_alive_s,
            "keep_alive_expires_at": usage.expires_at if status.get("status") == "loaded" and not model.pinned else None,
            "releases": dict(usage.releases),
        }


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background release failed: %r", task.exception())
