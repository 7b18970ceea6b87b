"""A request for a model that is not loaded: join a load under way, or start one, streaming
`LoadProgress` items (SSE comments) while it waits; then the model's own chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from deployments.errors import ModelLoadingError, ModelNotLoadedError, ModelUnloadingError
from deployments.protocol import Chunk, GenerateRequest, LoadProgress
from serve_app.clients import ModelClient

if TYPE_CHECKING:
    from serve_app.lifecycle import LifecycleManager

Item = Chunk | LoadProgress


async def stream_with_autoload(
    manager: "LifecycleManager", model_id: str, client: ModelClient, request: GenerateRequest
) -> AsyncIterator[Item]:
    usage = manager.usage[model_id]
    if usage.transitions.pending("unload") is not None:
        raise ModelUnloadingError(f"model {model_id!r} is unloading; retry once it is loaded")
    loading = usage.transitions.pending("load")
    if loading is not None:  # a load is under way: join it
        async for progress in wait_for_load(manager, model_id, loading):
            yield progress
    chunks = client.generate(request)
    try:
        first = await chunks.__anext__()
    except (ModelNotLoadedError, ModelLoadingError):
        await chunks.aclose()  # type: ignore[attr-defined]
        if not manager.models[model_id].autoload:
            raise
        await manager.plan_room(model_id)  # refuse with a real 507 before the stream starts
        async for progress in wait_for_load(manager, model_id, manager.start_load(model_id)):
            yield progress
        chunks = client.generate(request)
        first = await chunks.__anext__()
    usage.record.maybe_loaded = True
    async with aclosing(chunks):  # left at a yield, the stream is closed now, not when GC finds it
        yield first
        async for chunk in chunks:
            yield chunk


async def wait_for_load(manager: "LifecycleManager", model_id: str, task: asyncio.Future[dict[str, Any]]) -> AsyncIterator[LoadProgress]:
    started = time.monotonic()
    while True:
        yield LoadProgress(f"loading model {model_id} ({time.monotonic() - started:.0f} s)")
        done, _ = await asyncio.wait({task}, timeout=manager.settings.load_progress_interval_s)
        if done:
            break
    status = task.result()  # raises the load's error (e.g. 507)
    if status.get("status") != "loaded":
        raise ModelNotLoadedError(
            f"model {model_id!r} could not be loaded: {status.get('error') or status.get('status')}", param="model", code="model_load_failed"
        )
