"""Builds the FastAPI app over a model registry. Knows nothing of Ray: tests drive it in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from serve_app import openai_routes, routes
from serve_app.clients import ModelRegistry
from serve_app.config import AppSettings
from serve_app.errors import BodySizeLimit, StrictJSONBody, install_error_handlers
from serve_app.lifecycle import LifecycleManager
from serve_app.metrics import install_metrics
from serve_app.security import install_security


def create_api(registry: ModelRegistry, settings: AppSettings, lifecycle: LifecycleManager | None = None) -> FastAPI:
    manager = lifecycle or LifecycleManager(registry, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await manager.start()  # shared records restored, idle release running from startup
        yield
        await manager.stop()  # no background release outlives the app

    app = FastAPI(title="llm-serve", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.settings = settings
    app.state.lifecycle = manager
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(openai_routes.router)
    app.mount("/ui", StaticFiles(directory=routes.UI_DIR), name="ui")
    app.add_middleware(StrictJSONBody)  # inside BodySizeLimit: the bodies it reads are bounded
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    install_metrics(app, [m.id for m in settings.members], settings.max_request_bytes)  # around the routes and body limits
    install_security(app, settings)  # API keys, CORS, Host allowlist, access log: around the rest
    return app
