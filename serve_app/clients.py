"""The seam between the API and the models: a `ModelClient` per model.

In production each client wraps a Ray Serve deployment handle (see serve_app.app); for tests and
single-process use, `InProcessModelClient` wraps a `ModelServer` directly (`InProcessPoolClient`, a
member of a `PoolServer`). The API sees only this.
"""

from __future__ import annotations

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


class InProcessPoolClient:
    """A `ModelClient` for one member of a `PoolServer` living in this process (one "replica")."""

    def __init__(self, pool: PoolServer, model_id: str) -> None:
        self.pool, self.model_id, self.pool_id = pool, model_id, pool.pool_id
        self.base = pool.member(model_id).base

    async def status(self) -> dict[str, Any]:
        held = self.model_id in self.pool.resident
        error = None if held else self.pool.errors.get(self.model_id)
        server = self.pool.servers.get(self.model_id)
        status = server.status().to_dict() if server is not None and held else {}
        return status | {
            "id": self.model_id, "status": "loaded" if held else ("failed" if error else "unloaded"), "error": error,
            "replicas": int(held), "held_by": ["local"] if held else [], "pool": self.pool_id, "base": self.base,
            "kind": "adapter" if self.base else "model",
        }

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
