"""When models load and unload: on demand, after idling, and under a memory budget.

Ray Serve runs each model's replicas and delivers the wanted state to every one of them
(`user_config` -> `reconfigure`); what Ray cannot express lives here, split by concern:
- serve_app.transitions: one transition at a time per model, in call order (every caller: users,
  the idle loop, the memory budget);
- serve_app.control_store: keep-alive clocks, the loaded belief and release counts, written through
  to a store that outlives this router replica (a named Ray actor under Ray);
- serve_app.memory_budget: which idle models to release so a load fits (a pure decision), and
  releasing them one a round (a load that still does not fit is refused, never let through);
- serve_app.autoload: a request for an unloaded model loads it, streaming progress;
- this module: the manager tying them together, the idle-release loop and the status view.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from deployments.errors import DeadlineExceededError, OverloadedError
from deployments.protocol import Chunk, GenerateRequest, LoadProgress
from serve_app.autoload import stream_with_autoload
from serve_app.clients import ModelRegistry
from serve_app.config import AppSettings, ModelSettings
from serve_app.control_store import LocalRecordStore, ModelRecord, RecordStore, RecordWriter, fresh_records
from serve_app.memory_budget import make_room, plan_release
from serve_app.streaming import Deadline
from serve_app.transitions import TransitionQueue

logger = logging.getLogger(__name__)
# A request ending writes its model's clock to the shared store at most this often (a restarted router's is at
# most this far behind); loads, unloads, keep-alive changes and releases are written at once.
TOUCH_SAVE_EVERY_S = 1.0
Item = Chunk | LoadProgress


@dataclass
class ModelUsage:
    """This router replica's view of one model: the shared record, plus what is local to it."""

    record: ModelRecord
    in_flight: int = 0
    transitions: TransitionQueue = field(default_factory=TransitionQueue)


class LifecycleManager:
    """Loads, unloads and releases models over their `ModelClient`s."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: AppSettings,
        on_release: Callable[[str, str], None] | None = None,
        store: RecordStore | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.models: dict[str, ModelSettings] = {m.id: m for m in settings.members}
        self.on_release = on_release
        self.store = store or LocalRecordStore()
        self.writer = RecordWriter(self.store, TOUCH_SAVE_EVERY_S)
        self.usage = {model_id: ModelUsage(record) for model_id, record in fresh_records(self.settings.members).items()}
        self._budget_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle_task: asyncio.Task[None] | None = None
        self._restored = False
        self._last_status: dict[str, dict[str, Any]] = {}

    # --- start, stop, the shared records -------------------------------------------------------
    async def start(self) -> None:
        """Restore the shared records (a restarted router keeps the clocks) and start the idle loop."""
        await self._restore()
        if self._idle_task is None or self._idle_task.done():
            self._idle_task = asyncio.ensure_future(self._idle_loop())

    async def stop(self) -> None:
        """Write the deferred records; cancel the idle loop, every background release and every
        transition under way (each runs shielded from its callers, so cancelling them alone would
        leave it running). The wanted state already written to the config stays."""
        self.writer.flush()
        tasks = [t for t in [self._idle_task, *self._tasks] if t is not None]
        for usage in self.usage.values():
            tasks += usage.transitions.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _restore(self) -> None:
        if not self._restored:
            records = await self.store.restore(fresh_records(self.settings.members))
            for model_id, record in records.items():
                self.usage[model_id].record = record
            self._restored = True

    def _save(self, model_id: str, soon: bool = False) -> None:
        self.writer.save(model_id, self.usage[model_id].record, soon)

    def _touch(self, model_id: str, soon: bool = False) -> None:
        """The model was used now; `soon`: a request ending that changed nothing else (RecordWriter)."""
        self.usage[model_id].record.touch(time.time())
        self._save(model_id, soon)

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

    def _transition(self, model_id: str, action: str, **kwargs: Any) -> Coroutine[Any, Any, dict[str, Any]]:
        if action == "load":
            return self.usage[model_id].transitions.run("load", lambda: self._do_load(model_id))
        return self.usage[model_id].transitions.run("unload", lambda: self._do_unload(model_id, **kwargs))

    async def _do_load(self, model_id: str) -> dict[str, Any]:
        async with self._budget_lock:
            await self._make_room(model_id)
            status = await self.registry.get(model_id).load()
        self.usage[model_id].record.maybe_loaded = status.get("status") == "loaded"
        self._last_status[model_id] = status
        self._touch(model_id)
        return status

    async def _do_unload(self, model_id: str, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        record = self.usage[model_id].record
        was_loaded = record.maybe_loaded
        status = await self.registry.get(model_id).unload(force=force, reason=reason)
        record.maybe_loaded = False
        if was_loaded:
            record.releases[reason] = record.releases.get(reason, 0) + 1
            logger.info("model %s released: %s", model_id, reason)
            if self.on_release is not None:
                self.on_release(model_id, reason)
        self._save(model_id)
        return status

    # --- the memory budget -------------------------------------------------------------------
    async def _make_room(self, model_id: str) -> None:
        """Before a load: release what `plan_room` chose, least recently used first, each through its
        own model's transition queue (a user's load of it waits its turn, and vice versa)."""
        await make_room(
            model_id, self.plan_room, lambda mid: self.usage[mid].transitions.busy,
            lambda mid: self._transition(mid, "unload", reason="memory_pressure"), max_rounds=2 * len(self.models) + 2,
        )

    async def plan_room(self, model_id: str) -> list[tuple[str, int]]:
        """The idle unpinned models (and bytes they hold) to release so that `model_id` fits its
        device's budget; raises 507 when even releasing all of them would not do."""
        device = self.models[model_id].memory_device
        budget = self.settings.budget_bytes(device)
        if budget is None:
            return []
        peers = [m.id for m in self.models.values() if m.memory_device == device]
        statuses = dict(zip(peers, await asyncio.gather(*(self._status(mid) for mid in peers))))
        idle = sorted((mid for mid in peers if self._releasable(mid)), key=lambda mid: self.usage[mid].record.last_used)
        return plan_release(model_id, device, budget, statuses, idle)

    def _releasable(self, model_id: str) -> bool:
        usage, model = self.usage[model_id], self.models[model_id]
        return not model.pinned and usage.in_flight == 0 and not usage.transitions.busy

    # --- requests ----------------------------------------------------------------------------
    async def generate(
        self, model_id: str, request: GenerateRequest, keep_alive_s: float | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[Item]:
        """The model's chunks, loading it first if it is unloaded and may autoload; while it loads,
        `LoadProgress` items are yielded (SSE comments). Errors before any chunk raise.
        Past the deadline (`timeout_s`, else the server default), waiting or generating, the
        request is cancelled down to the engine and `DeadlineExceededError` is raised."""
        client = self.registry.get(model_id)
        usage = self.usage[model_id]
        await self.start()
        timeout_s = timeout_s or self.settings.request_timeout_s
        deadline = Deadline(asyncio.get_running_loop().time() + timeout_s)
        usage.in_flight += 1
        chunks = stream_with_autoload(self, model_id, client, request)
        try:
            while True:
                try:
                    chunk = await deadline.next(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:  # the wait was cancelled, and the stream with it: the replica aborts it
                    raise DeadlineExceededError(f"the request ran past its deadline of {timeout_s:g} s", param="timeout") from None
                yield chunk
        finally:
            deadline.cancel()
            await chunks.aclose()  # type: ignore[attr-defined]
            usage.in_flight -= 1
            if keep_alive_s is not None:
                self._set_keep_alive(model_id, keep_alive_s)  # a change: written at once
            else:
                self._touch(model_id, soon=True)
            expires_at = usage.record.expires_at
            if expires_at is not None and expires_at <= time.time() and usage.in_flight == 0:
                self._spawn(self._release_if_idle(model_id))  # keep_alive 0: unload after this request

    def start_load(self, model_id: str) -> asyncio.Task[dict[str, Any]]:
        """A load as a task of its own, through the model's queue (autoload waits on it)."""
        return asyncio.ensure_future(self._transition(model_id, "load"))

    # --- idle release ------------------------------------------------------------------------
    def _set_keep_alive(self, model_id: str, keep_alive_s: float) -> None:
        self.usage[model_id].record.keep_alive_s = None if keep_alive_s == float("inf") else keep_alive_s
        self._touch(model_id)

    async def release_idle(self) -> list[str]:
        """Unload every model whose keep-alive ran out; returns their ids."""
        now = time.time()
        expired = [
            mid for mid, u in self.usage.items()
            if u.record.maybe_loaded and u.record.expires_at is not None and u.record.expires_at <= now
            and not self.models[mid].scales_to_zero
        ]
        return [mid for mid in expired if await self._release_if_idle(mid)]

    async def _release_if_idle(self, model_id: str) -> bool:
        record = self.usage[model_id].record
        if not self._releasable(model_id) or not record.maybe_loaded:
            return False
        if record.expires_at is None or record.expires_at > time.time():
            return False
        await self._transition(model_id, "unload", reason="idle")
        return True

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.idle_check_interval_s)
            try:
                await self.release_idle()
            except Exception:  # noqa: BLE001 - one failed release must not stop the loop
                logger.exception("idle release failed")

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background release failed: %r", task.exception())

    # --- status ------------------------------------------------------------------------------
    async def _status(self, model_id: str) -> dict[str, Any]:
        client = self.registry.get(model_id)
        if not self.models[model_id].scales_to_zero:
            return await client.status()
        # Never ask a scale-to-zero model's replica: with none it would start one, and any call
        # counts as traffic to Ray's autoscaler, so polling GET /models would keep it from zero.
        # Ray's replica count, the router's view and the last status a load returned stand in.
        replicas = await client.num_replicas()
        state = "loaded" if replicas and self.usage[model_id].record.maybe_loaded else "unloaded"
        return self._last_status.get(model_id, {"id": model_id}) | {"status": state, "replicas": replicas}

    async def status(self, model_id: str) -> dict[str, Any]:
        """The replica's status plus the router's lifecycle view of the model. A status call counts
        against the replica's request limit like any call; when the model is at capacity, the last
        status seen is returned instead of an error (the model is busy, not broken)."""
        await self.start()
        try:
            status = await self._status(model_id)
            if not self.models[model_id].scales_to_zero:
                self._last_status[model_id] = status
        except OverloadedError:
            if model_id not in self._last_status:
                raise
            status = self._last_status[model_id]
        usage, model = self.usage[model_id], self.models[model_id]
        record = usage.record
        if status.get("status") in ("loaded", "unloaded"):
            loaded = status["status"] == "loaded" or record.maybe_loaded and usage.in_flight > 0
            if loaded != record.maybe_loaded:
                record.maybe_loaded = loaded
                self._save(model_id)
        return status | {
            "pinned": model.pinned,
            "autoload": model.autoload,
            "keep_alive_s": record.keep_alive_s,
            "keep_alive_expires_at": record.expires_at if status.get("status") == "loaded" and not model.pinned else None,
            "releases": dict(record.releases),
        }
