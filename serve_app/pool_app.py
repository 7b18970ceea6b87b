"""A pool as a Ray Serve deployment: `PoolServer` (deployments/pool.py) behind `@serve.multiplexed`.

Ray Serve routes each request to a replica already holding its multiplexed model id when one
exists, and evicts a replica's least recently used member past `max_models_per_replica` (it calls
the member's `__del__`, which evicts it from the pool). Each replica reports what it holds to the
application's `ControlPlane` actor every half second, and applies the evictions asked there (`/unload`
of a member evicts it everywhere), also dropping it from Ray's multiplexing cache so Ray stops
routing by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from deployments.memory import replica_allocator_env
from deployments.pool import PoolMember, PoolServer, Resident
from deployments.protocol import Chunk, GenerateRequest
from serve_app.config import PoolSettings
from serve_app.loopback import keep_serve_grpc_on_loopback
from serve_app.pool_client import pool_deployment_name
from serve_app.control_plane import call_control, control_plane

logger = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5
MULTIPLEX_CACHE = "__serve_multiplex_wrapper"  # where @serve.multiplexed keeps its per-replica cache


class PoolReplica(PoolServer):
    """One replica of a pool deployment."""

    def __init__(self, pool_id: str, members: list[PoolMember], max_models_per_replica: int, max_lora_rank: int) -> None:
        from serve_app.app import log_through_serve

        keep_serve_grpc_on_loopback()
        log_through_serve()
        super().__init__(pool_id, members, max_models_per_replica, max_lora_rank)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.control = control_plane(context.app_name)
        self._seen_evictions: dict[str, int] | None = None
        self._sync_task: asyncio.Task[None] | None = None

    def __del__(self) -> None:  # Ray Serve stopped this replica: its engines' channel sockets go with it
        for server in getattr(self, "servers", {}).values():
            server.channels.close_all()

    async def resident_member(self, model_id: str) -> Resident:
        """Ray's multiplexed loader (wrapped per pool by `pool_deployment`)."""
        await self.load(model_id)
        return Resident(self, model_id, asyncio.get_running_loop())

    async def _member(self) -> str:
        self._start_sync()
        model_id = serve.get_multiplexed_model_id()
        was_resident = model_id in self.resident
        self.count_request(model_id)
        try:
            await self.resident_member(model_id)  # the multiplexed wrapper: LRU bookkeeping, eviction
        except Exception:
            await self.sync()  # the reason reaches /models before the caller looks
            raise
        if not was_resident:
            await self.sync()  # a new member (and what LRU evicted for it) is visible at once
        return model_id

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        model_id = await self._member()
        async for chunk in self.generate_for(model_id, request):
            yield chunk

    async def warm(self) -> dict[str, Any]:
        """`/load` of a member: make it resident on this replica, report, return what we hold."""
        await self._member()
        await self.sync()
        return self.status()

    # --- the control plane -------------------------------------------------------------------
    def _start_sync(self) -> None:
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.ensure_future(self._sync_loop())

    async def _sync_loop(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - the control plane restarts; keep serving
                logger.warning("pool %s: report failed: %r", self.pool_id, exc)
            await asyncio.sleep(REPORT_EVERY_S)

    async def sync(self) -> None:
        """Report what this replica holds; evict what `/unload` asked since the last sync."""
        epochs: dict[str, int] = await call_control(self.control.pool_sync.remote(self.pool_id, self.replica, self.report()))
        if self._seen_evictions is None:  # a new replica holds nothing: older evictions are done
            self._seen_evictions = epochs
            return
        for model_id, epoch in epochs.items():
            if epoch > self._seen_evictions.get(model_id, 0):
                self._seen_evictions[model_id] = epoch
                self._forget_multiplexed(model_id)
                if await self.evict(model_id, reason="unload"):
                    await call_control(self.control.pool_sync.remote(self.pool_id, self.replica, self.report()))

    def report(self) -> dict[str, Any]:
        status = self.status()
        return {k: status[k] for k in ("resident", "errors", "servers", "num_loads", "num_evictions", "num_hits", "num_misses", "pid")}

    def _forget_multiplexed(self, model_id: str) -> None:
        cache = getattr(self, MULTIPLEX_CACHE, None)
        models = getattr(cache, "models", None)
        if models is not None and model_id in models:
            resident = models.pop(model_id)
            resident._evicted.set()  # we evict it ourselves, now
            cache._push_multiplexed_replica_info = True  # type: ignore[union-attr]


def pool_deployment(pool: PoolSettings) -> Any:
    """The pool's deployment, bound: a `PoolReplica` subclass whose `resident_member` is wrapped in
    `@serve.multiplexed` with this pool's `max_models_per_replica`."""
    from serve_app.app import OFFLINE_ENV

    wrapped = serve.multiplexed(max_num_models_per_replica=pool.max_models_per_replica)(PoolReplica.resident_member)
    cls = type(f"PoolReplica_{pool.id.replace('-', '_').replace('.', '_')}", (PoolReplica,), {"resident_member": wrapped})
    options: dict[str, Any] = {
        "name": pool_deployment_name(pool.id),
        "max_ongoing_requests": pool.max_ongoing_requests,
        "max_queued_requests": pool.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus,
            "runtime_env": {"env_vars": {**OFFLINE_ENV, **replica_allocator_env()}},
        },
        "graceful_shutdown_timeout_s": 30,
    }
    if pool.autoscaling is not None:
        options["autoscaling_config"] = pool.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = pool.num_replicas
    return serve.deployment(cls).options(**options).bind(pool.id, pool.pool_members(), pool.max_models_per_replica, pool.max_lora_rank)
