"""The seam between the API and the models: a `ModelClient` per model.

In production each client wraps a Ray Serve deployment handle (see serve_app.app); for tests and
single-process use, `InProcessModelClient` wraps a `ModelServer` directly. The API sees only this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from deployments.errors import NotFoundError
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
