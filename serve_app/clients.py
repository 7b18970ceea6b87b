"""The seam between the API and the models: a `ModelClient` per model.

In production each client wraps a Ray Serve deployment handle (see serve_app.app); for tests and
single-process use, `InProcessModelClient` wraps a `ModelServer` directly (`InProcessPoolClient`, a
member of a `PoolServer`). The API sees only this.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from deployments.errors import ModelNotLoadedError, NotFoundError
from deployments.pool import PoolServer
from deployments.protocol import Chunk, GenerateRequest
from deployments.server import ModelServer


class ModelClient(Protocol):
    model_id: str

    async def status(self) -> dict[str, Any]: ...

    async def load(self) -> dict[str, Any]:
        """Load on every replica; returns when they are loaded (or failed)."""
        ...

    async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        """Unload on every replica (draining unless `force`); returns when done."""
        ...

    async def num_replicas(self) -> int:
        """Replicas running now (0 for a model scaled to zero)."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]: ...


class InProcessModelClient:
    """A `ModelClient` over a `ModelServer` living in this process."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.model_id = server.model_id

    async def status(self) -> dict[str, Any]:
        return self.server.status().to_dict() | {"replicas": 1}

    async def load(self) -> dict[str, Any]:
        return (await self.server.load()).to_dict() | {"replicas": 1}

    async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        return (await self.server.unload(force=force, reason=reason)).to_dict() | {"replicas": 1}

    async def num_replicas(self) -> int:
        return 1

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self.server.generate(request)


def member_status(model_id: str, pool_id: str, base: str | None, adapter_path: str | None, reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A pool member's status from its pool replicas' reports (`PoolServer.status()` by replica):
    loaded where a replica holds it, else failed with a replica's last load error, else unloaded."""
    held_by = sorted(r for r, report in reports.items() if model_id in report.get("resident", {}))
    errors = [report["errors"][model_id] for report in reports.values() if model_id in report.get("errors", {})]
    state = "loaded" if held_by else ("failed" if errors else "unloaded")
    status: dict[str, Any] = {}
    for replica in held_by:  # a full model: its engine's facts from a replica holding it
        if model_id in reports[replica].get("servers", {}):
            status = dict(reports[replica]["servers"][model_id])
            break
    status |= {
        "id": model_id, "status": state, "error": errors[0] if errors and not held_by else None,
        "replicas": len(held_by), "pool": pool_id, "base": base, "held_by": held_by, "kind": "adapter" if base else "model",
    }
    if base:  # an adapter's weights are copied into slots its base preallocated
        status["memory_estimate"] = {"need_bytes": _adapter_bytes(adapter_path or "")}
    return status


def _adapter_bytes(path: str) -> int:
    try:
        return os.path.getsize(os.path.join(os.path.expanduser(path), "adapter_model.safetensors"))
    except OSError:
        return 0


class InProcessPoolClient:
    """A `ModelClient` for one member of a `PoolServer` living in this process (one "replica")."""

    def __init__(self, pool: PoolServer, model_id: str) -> None:
        self.pool, self.model_id, self.pool_id = pool, model_id, pool.pool_id
        self.member = pool.member(model_id)

    async def status(self) -> dict[str, Any]:
        return member_status(self.model_id, self.pool_id, self.member.base, self.member.adapter_path, await self._reports())

    async def load(self) -> dict[str, Any]:
        try:
            await self.pool.load(self.model_id)
        except ModelNotLoadedError:  # `failed`, with the reason, in the status
            pass
        return await self.status()

    async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        await self.pool.evict(self.model_id, reason)
        return await self.status()

    async def num_replicas(self) -> int:
        return int(self.model_id in self.pool.resident)

    def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        return self.pool.generate_for(self.model_id, request)

    async def _reports(self) -> dict[str, dict[str, Any]]:
        return {"local": self.pool.status()}


class ModelRegistry:
    """The configured models by id."""

    def __init__(self, clients: Mapping[str, ModelClient]) -> None:
        self.clients = dict(clients)

    def get(self, model_id: str) -> ModelClient:
        client = self.clients.get(model_id)
        if client is None:
            known = ", ".join(sorted(self.clients))
            raise NotFoundError(
                f"the model {model_id!r} does not exist; available: {known}", param="model", code="model_not_found"
            )
        return client

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.clients.values())
