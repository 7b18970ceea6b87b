"""The ingress over in-process model servers (no Ray), for the integration tier's API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from deployments.server import ModelServer
from serve_app.api import create_api
from serve_app.clients import InProcessModelClient, ModelRegistry
from serve_app.config import parse_app_settings


@asynccontextmanager
async def inprocess_api(args: dict[str, Any]) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, ModelServer]]]:
    """An HTTP client on `create_api` over one `ModelServer` per configured model (by id); the
    servers are unloaded afterwards. The base URL is loopback, as the Host allowlist wants."""
    settings = parse_app_settings(args)
    servers = {m.id: ModelServer(m.id, m.engine_config(), m.load_on_start) for m in settings.models}
    registry = ModelRegistry({model_id: InProcessModelClient(server) for model_id, server in servers.items()})
    transport = httpx.ASGITransport(app=create_api(registry, settings))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
            yield http, servers
    finally:
        for server in servers.values():
            await server.unload()
