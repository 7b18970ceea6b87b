"""A pool replica: a catalogue of full models and LoRA adapters, any few of them resident at once.

Ray Serve's model multiplexing decides *which* members a replica holds (serve_app/app.py wraps
`resident()` in `@serve.multiplexed`: it routes a request to a replica already holding its model id
and evicts the least recently used member past `max_models_per_replica`); this class does the
holding. A full model is a `ModelServer` (its own engine); an adapter goes into a slot of its base's
engine, so requests for several adapters of one base, and for the base itself, share every engine
step (deployments.engine.lora). A base stays loaded while it or any of its adapters is resident.
No Ray import here: the pool runs and is tested without it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from deployments.engine import EngineConfig
from deployments.engine.adapter_loader import AdapterError, load_adapter
from deployments.errors import ModelNotLoadedError, NotFoundError
from deployments.protocol import Chunk, GenerateRequest
from deployments.server import ModelServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolMember:
    """One catalogue entry: a full model (`config`) or an adapter (`base` + `adapter_path`)."""

    id: str
    config: EngineConfig | None = None
    base: str | None = None
    adapter_path: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def engine_id(self) -> str:
        """The full model whose engine serves it (itself, or an adapter's base)."""
        return self.base or self.id


class Resident:
    """What Ray's multiplexer caches per model id. Ray calls `__del__` when it evicts the member
    (in a worker thread); we evict it from the pool then, once."""

    def __init__(self, pool: PoolServer, model_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.model_id, self.loop = pool, model_id, loop
        self._evicted = threading.Event()

    def __del__(self) -> None:
        if self._evicted.is_set():
            return
        self._evicted.set()
        future = asyncio.run_coroutine_threadsafe(self.pool.evict(self.model_id, reason="lru"), self.loop)
        try:
            in_loop_thread = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            in_loop_thread = False
        if not in_loop_thread:  # Ray's eviction: wait, so the next load finds the slot free
            try:
                future.result(timeout=120)
            except Exception:  # noqa: BLE001 - the loop is gone (shutdown) or eviction failed: logged there
                pass


class PoolServer:
    """Holds the resident members of one pool replica and generates for any of them."""

    def __init__(self, pool_id: str, members: list[PoolMember], max_models_per_replica: int, max_lora_rank: int = 16) -> None:
        self.pool_id = pool_id
        self.members = {m.id: m for m in members}
        self.max_models_per_replica, self.max_lora_rank = max_models_per_replica, max_lora_rank
        self.servers: dict[str, ModelServer] = {}  # loaded full models (bases) by id
        self._server_ids = itertools.count()
        self.resident: dict[str, float] = {}  # member id -> when it became resident
        self.errors: dict[str, str] = {}  # member id -> why its last load failed
        self.num_loads = self.num_evictions = 0
        self.num_hits = self.num_misses = 0  # requests that found their member resident here, or not
        self._lock: asyncio.Lock | None = None

    def count_request(self, model_id: str) -> None:
        """Before a request's member is made resident: was it already here (a routing hit)?"""
        if model_id in self.resident:
            self.num_hits += 1
        else:
            self.num_misses += 1

    def member(self, model_id: str) -> PoolMember:
        member = self.members.get(model_id)
        if member is None:
            raise NotFoundError(f"the model {model_id!r} is not in pool {self.pool_id!r}", param="model", code="model_not_found")
        return member

    # --- residency ---------------------------------------------------------------------------
    async def load(self, model_id: str) -> None:
        """Make `model_id` resident (its base first, for an adapter). A member that cannot load
        raises `ModelNotLoadedError` (409, code `model_load_failed`) with the reason; nothing else
        is touched."""
        member = self.member(model_id)
        async with self._get_lock():
            if model_id in self.resident:
                return
            started = time.monotonic()
            try:
                server = await self._base_server(member.engine_id)
                if member.is_adapter:
                    weights = await asyncio.to_thread(load_adapter, member.adapter_path or "", member.id, self.max_lora_rank)
                    engine = server.engine
                    assert engine is not None
                    await engine.call(engine.engine.add_adapter, weights)
            except (AdapterError, ModelNotLoadedError) as exc:
                self.errors[model_id] = str(getattr(exc, "message", exc))
                await self._release_unused_bases()
                raise ModelNotLoadedError(
                    f"model {model_id!r} could not be loaded: {self.errors[model_id]}", param="model", code="model_load_failed"
                ) from None
            self.errors.pop(model_id, None)
            self.resident[model_id] = time.time()
            self.num_loads += 1
            logger.info("pool %s: %s resident in %.3f s", self.pool_id, model_id, time.monotonic() - started)

    async def _base_server(self, base_id: str) -> ModelServer:
        server = self.servers.get(base_id)
        if server is None:
            base = self.member(base_id)
            if base.config is None:
                raise ModelNotLoadedError(f"{base_id!r} is not a full model of pool {self.pool_id!r}")
            # One adapter slot more than members per replica: a switch never waits for an evicted
            # adapter's last requests to end.
            config = dataclasses.replace(base.config, max_loras=self.max_models_per_replica + 1, max_lora_rank=self.max_lora_rank)
            server = self.servers[base_id] = ModelServer(base_id, config, load_on_start=False)
            server.replica_name = f"{os.getpid()}-{base_id}-{next(self._server_ids)}"  # one per engine: what its channels name
        if server.engine is None:
            status = await server.load()
            if status.status != "loaded":
                self.servers.pop(base_id).channels.close_all()
                raise ModelNotLoadedError(f"base {base_id!r} failed to load: {status.error}")
        return server

    async def evict(self, model_id: str, reason: str = "manual") -> bool:
        """No longer resident here (an adapter's running requests finish first); a base nobody
        uses any more is unloaded. False if it was not resident."""
        async with self._get_lock():
            if self.resident.pop(model_id, None) is None:
                return False
            self.num_evictions += 1
            member = self.members[model_id]
            server = self.servers.get(member.engine_id)
            if member.is_adapter and server is not None and server.engine is not None:
                engine = server.engine
                await engine.call(engine.engine.remove_adapter, model_id)
            await self._release_unused_bases()
            logger.info("pool %s: evicted %s (%s)", self.pool_id, model_id, reason)
            return True

    async def _release_unused_bases(self) -> None:
        for base_id in list(self.servers):
            in_use = base_id in self.resident or any(self.members[m].base == base_id for m in self.resident)
            if not in_use:
                server = self.servers.pop(base_id)
                await server.unload(reason="pool")  # its running requests finish first, their channels with them
                server.channels.close_all()

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    # --- generation --------------------------------------------------------------------------
    async def generate_for(self, model_id: str, request: GenerateRequest) -> AsyncIterator[Chunk]:
        """The member's chunks; it is loaded first if it is not resident (evicted meanwhile)."""
        member = self.member(model_id)
        for attempt in (1, 2):
            await self.load(model_id)
            server = self.servers[member.engine_id]
            chunks = server.generate(request, member.id if member.is_adapter else None)
            try:
                first = await chunks.__anext__()
            except ModelNotLoadedError:  # evicted between load() and the engine: load again, once
                await chunks.aclose()  # type: ignore[attr-defined]
                if attempt == 2:
                    raise
                continue
            break
        async with aclosing(chunks):
            yield first
            async for chunk in chunks:
                yield chunk

    # --- what it holds -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Resident members, their bases' engines, counters and load errors (a plain dict)."""
        return {
            "pool": self.pool_id,
            "pid": os.getpid(),
            "resident": dict(self.resident),
            "errors": dict(self.errors),
            "num_loads": self.num_loads,
            "num_evictions": self.num_evictions,
            "num_hits": self.num_hits,
            "num_misses": self.num_misses,
            "servers": {base_id: server.status().to_dict() for base_id, server in self.servers.items()},
        }
