"""The lifecycle tests' app: the real API, lifecycle manager and model servers over tiny models, no Ray
(tests/integration/test_lifecycle*.py), built by the `make_app` fixture of tests/integration/conftest.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from deployments.protocol import GenerateRequest
from deployments.server import ModelServer
from serve_app.api import create_api
from serve_app.clients import InProcessModelClient, ModelRegistry
from serve_app.config import parse_app_settings
from serve_app.lifecycle import LifecycleManager

A, B = "model-a", "model-b"
LONG = {"max_tokens": 60, "temperature": 0, "ignore_eos": True}


class App:
    def __init__(self, http: httpx.AsyncClient, lifecycle: LifecycleManager, servers: dict[str, ModelServer], api: FastAPI) -> None:
        self.http, self.lifecycle, self.servers, self.api = http, lifecycle, servers, api

    async def models(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in (await self.http.get("/models")).json()["data"]}


def app_factory(tiny_model_dir: Path) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(models: list[dict[str, Any]], **settings: Any) -> AsyncIterator[App]:
        defaults = {"source": str(tiny_model_dir), "max_model_len": 96, "max_num_seqs": 4}
        app_settings = parse_app_settings(
            {"models": [defaults | m for m in models], "idle_check_interval_s": 0.1, "load_progress_interval_s": 0.05} | settings
        )
        servers = {m.id: ModelServer(m.id, m.engine_config(), m.load_on_start, drain_timeout_s=30) for m in app_settings.models}
        registry = ModelRegistry({mid: InProcessModelClient(s) for mid, s in servers.items()})
        lifecycle = LifecycleManager(registry, app_settings)
        api = create_api(registry, app_settings, lifecycle)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://127.0.0.1", timeout=60) as http:
            yield App(http, lifecycle, servers, api)
        for server in servers.values():
            await server.unload(force=True)

    return make


def wire(prompt: str = "Hello there", **params: Any) -> GenerateRequest:
    return GenerateRequest("", LONG | params, prompt=prompt)
