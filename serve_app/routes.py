"""The seed REST API: /models, /load, /unload, /infer (+ SSE), health checks and the chat page."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from deployments.protocol import Chunk, GenerateRequest
from serve_app.clients import ModelRegistry
from serve_app.config import AppSettings
from serve_app.lifecycle import LifecycleManager
from serve_app.schemas import InferRequest, InferResponse, LoadRequest, ModelInfo, ModelInfoList, UnloadRequest
from serve_app.streaming import EventTemplate, collect, deliver_directly, open_stream, sse_event, sse_response

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
router = APIRouter()


# The dependencies are `async def`: FastAPI runs a plain `def` one in its thread pool, a thread hop per
# request (with the thread pool's own threads started and stopped: ~5% of the router's CPU at 10 streams
# of 1-token requests, session 15).
async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def get_settings(request: Request) -> AppSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_lifecycle(request: Request) -> LifecycleManager:
    return request.app.state.lifecycle  # type: ignore[no-any-return]


async def model_info(lifecycle: LifecycleManager, model_id: str, timeout_s: float) -> ModelInfo:
    """A model's status; a replica that does not answer in time is still starting (loading)."""
    try:
        status = await asyncio.wait_for(lifecycle.status(model_id), timeout_s)
    except asyncio.TimeoutError:
        status = {"id": model_id, "status": "loading"}
    return ModelInfo.model_validate(status)


@router.get("/pools")
async def pools(registry: ModelRegistry = Depends(get_registry)) -> dict[str, Any]:
    """Per pool, per replica: the members it holds, its loads and evictions, and its requests that
    found their member already there (routing hits) or not."""
    first_client_of: dict[str, Any] = {}
    for client in registry:
        pool_id = getattr(client, "pool_id", None)
        if pool_id:
            first_client_of.setdefault(pool_id, client)
    reports = await asyncio.gather(*(client._reports() for client in first_client_of.values()))
    return {"object": "pools", "data": {
        pool_id: {replica: {k: v for k, v in report.items() if k != "servers"} | {"engines": sorted(report.get("servers", {}))}
                  for replica, report in replicas.items()}
        for pool_id, replicas in zip(first_client_of, reports)
    }}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(lifecycle: LifecycleManager = Depends(get_lifecycle), settings: AppSettings = Depends(get_settings)) -> JSONResponse:
    """Ready when every model configured to load on start is loaded, or was released by the
    lifecycle (idle or memory pressure) and loads again on demand."""
    wanted = {m.id for m in settings.members if m.load_on_start and not m.scales_to_zero}
    infos = await asyncio.gather(*(model_info(lifecycle, i, settings.status_timeout_s) for i in sorted(wanted)))
    not_ready = {
        info.id: info.status for info in infos
        if info.status != "loaded" and not (info.status == "unloaded" and info.autoload and info.releases)
    }
    body = {"status": "ready" if not not_ready else "not_ready", "not_ready": not_ready}
    return JSONResponse(body, status_code=200 if not not_ready else 503)


@router.get("/models", response_model=ModelInfoList)
async def list_models(
    registry: ModelRegistry = Depends(get_registry),
    lifecycle: LifecycleManager = Depends(get_lifecycle),
    settings: AppSettings = Depends(get_settings),
) -> ModelInfoList:
    infos = await asyncio.gather(*(model_info(lifecycle, c.model_id, settings.status_timeout_s) for c in registry))
    return ModelInfoList(data=list(infos))


@router.get("/models/{model_id}", response_model=ModelInfo)
async def get_model(
    model_id: str, lifecycle: LifecycleManager = Depends(get_lifecycle), settings: AppSettings = Depends(get_settings)
) -> ModelInfo:
    """One model's status, as in GET /models (which asks every model: slower with many); 404 for an
    id the config does not name (the lifecycle's registry lookup raises it)."""
    return await model_info(lifecycle, model_id, settings.status_timeout_s)


@router.post("/load", response_model=ModelInfo)
async def load(body: LoadRequest, lifecycle: LifecycleManager = Depends(get_lifecycle)) -> ModelInfo:
    """Load on every replica (idempotent; concurrent calls share one load); 507 if over budget."""
    await lifecycle.load(body.model, body.keep_alive_s())
    return await model_info(lifecycle, body.model, timeout_s=60)


@router.post("/unload", response_model=ModelInfo)
async def unload(body: UnloadRequest, lifecycle: LifecycleManager = Depends(get_lifecycle)) -> ModelInfo:
    """Unload on every replica: requests in flight finish first unless `force`."""
    await lifecycle.unload(body.model, force=body.force)
    return await model_info(lifecycle, body.model, timeout_s=60)


@router.post("/infer", response_model=InferResponse)
async def infer(body: InferRequest, stream: bool = False, lifecycle: LifecycleManager = Depends(get_lifecycle)) -> Any:
    request_id = f"infer-{uuid.uuid4().hex}"
    messages = None if body.messages is None else [{"role": m.role, "content": m.text()} for m in body.messages]
    wire = GenerateRequest(request_id, body.engine_params(), prompt=None if messages is not None else body.prompt, messages=messages)
    direct = deliver_directly() if stream else None  # before the request is generated
    first, rest = await open_stream(lifecycle.generate(body.model, wire, body.keep_alive_s(), body.timeout))
    if stream:
        def event(text: str) -> dict[str, Any]:
            return {"id": request_id, "model": body.model, "text": text}

        token_event = EventTemplate(event(EventTemplate.OPEN))

        def to_events(chunk: Chunk) -> list[str]:
            if chunk.finish_reason:
                usage = chunk.usage.to_dict() if chunk.usage else None
                return [sse_event(event(chunk.text) | {"finish_reason": chunk.finish_reason, "usage": usage})]
            return [token_event.render(chunk.text)] if chunk.text else []

        return sse_response(first, rest, to_events, direct)
    result = await collect(first, rest)
    return InferResponse(id=request_id, model=body.model, text=result.text, finish_reason=result.finish_reason, usage=result.usage)  # type: ignore[arg-type]


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return Response(status_code=204)
