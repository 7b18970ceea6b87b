"""The ingress over in-process model servers (no Ray), for the integration tier's API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from deployments.server import ModelServer
from serve_app.api import create_api
from deployments.pool import PoolServer
from serve_app.clients import InProcessModelClient, InProcessPoolClient, ModelRegistry
from serve_app.config import PoolSettings, parse_app_settings


@asynccontextmanager
async def inprocess_api(args: dict[str, Any]) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, ModelServer]]]:
    """An HTTP client on `create_api` over one `ModelServer` per configured model (by id); the
    servers are unloaded afterwards. The base URL is loopback, as the Host allowlist wants."""
    settings = parse_app_settings(args)
    servers = {m.id: ModelServer(m.id, m.engine_config(), m.load_on_start) for m in settings.models}
    clients: dict[str, Any] = {model_id: InProcessModelClient(server) for model_id, server in servers.items()}
    pools = [in_process_pool(pool) for pool in settings.pools]
    for pool in pools:
        clients |= {model_id: InProcessPoolClient(pool, model_id) for model_id in pool.members}
    registry = ModelRegistry(clients)
    transport = httpx.ASGITransport(app=create_api(registry, settings))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
            yield http, servers
    finally:
        for server in servers.values():
            await server.unload()
        for pool in pools:
            for model_id in list(pool.resident):
                await pool.evict(model_id)


def in_process_pool(pool: PoolSettings) -> PoolServer:
    """The pool's catalogue in one `PoolServer` (one replica, no Ray)."""
    return PoolServer(pool.id, pool.pool_members(), pool.max_models_per_replica, pool.max_lora_rank)
