"""Router-side metrics and the scrape endpoint `GET /metrics`.

Every process records its series into Ray's metrics (`ray.serve.metrics`); Ray's per-node metrics
agent aggregates them and exports Prometheus text on the node's metrics-export port (bound to
127.0.0.1 when the node is on loopback). `GET /metrics` fetches that text from every alive node's
agent and returns our `ray_llm_serve_*` families and Ray Serve's request-flow ones (`ray_serve_*`),
each family once. Here the router counts requests by route, model and status (one ASGI middleware, so routes
stay untouched), error responses by reason (from the error body or the SSE error event), and model
releases by reason. Without a connected Ray the counters are no-ops and `/metrics` answers 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import ServiceUnavailableError
from deployments.metrics import make_metric

logger = logging.getLogger(__name__)
# Ours, and the Ray Serve families that say how requests flow (its controller's and event loops'
# internals, most of Ray Serve's 900 KB of text here, are left to Ray's own dashboards).
EXPORTED_PREFIXES = (
    "ray_llm_serve_",
    "ray_serve_num_http_requests", "ray_serve_num_http_error_requests", "ray_serve_http_request_latency_ms",
    "ray_serve_num_ongoing_http_requests", "ray_serve_num_deployment_http_error_requests",
    "ray_serve_deployment_request_counter", "ray_serve_deployment_processing_latency_ms", "ray_serve_deployment_queued_queries",
    "ray_serve_num_ongoing_requests_at_replicas", "ray_serve_replica_processing_queries", "ray_serve_request_router_queue_len",
    "ray_serve_deployment_status", "ray_serve_application_status", "ray_serve_deployment_replica_starts",
)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
SSE_ERROR = b'data: {"error":'
MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
MAX_ERROR_BODY = 65536
# An error's `code`, else its `type`, names why a request was refused or failed.
REASON_BY_CODE = {
    "overloaded": "overloaded", "model_loading": "model_loading", "model_unloading": "model_unloading",
    "model_unloaded": "model_unloading", "model_not_loaded": "model_not_loaded", "model_load_failed": "model_load_failed",
    "payload_too_large": "payload_too_large", "deadline_exceeded": "deadline_exceeded", "replica_died": "replica_died",
}
REASON_BY_TYPE = {
    "invalid_request_error": "bad_request", "not_found_error": "not_found", "service_unavailable_error": "unavailable",
    "insufficient_storage_error": "memory_budget", "timeout_error": "deadline_exceeded",
}
router = APIRouter()


def release_counter() -> Callable[[str, str], None]:
    """`on_release(model, reason)` feeding `llm_serve_model_releases{model, reason}` (exported as
    `ray_llm_serve_model_releases_total`): manual, idle, memory_pressure. The router's lifecycle
    counts them; a replica that Ray Serve stops is not counted (serve_app.app.ModelReplica says why)."""
    counter = make_metric(
        "Counter", "llm_serve_model_releases",
        "Model releases (unloads of a loaded model) by reason: manual, idle, memory_pressure.", ("model", "reason"),
    )
    return lambda model, reason: counter.inc(tags={"model": model, "reason": reason})


def rejection_reason(status: int, error: dict[str, Any] | None) -> str:
    """Why a request got an error response (or an SSE error event), from the OpenAI error body."""
    error = error or {}
    reason = REASON_BY_CODE.get(str(error.get("code"))) or REASON_BY_TYPE.get(str(error.get("type")))
    if reason is not None:
        return reason
    return "bad_request" if 400 <= status < 500 else "internal_error"


class RequestMetrics:
    """ASGI middleware: `llm_serve_requests{model, route, status}` for every HTTP request and
    `llm_serve_rejections{model, reason}` for every error response or SSE error event. The model
    is read from the JSON body (only configured ids, so clients cannot mint label values)."""

    def __init__(self, app: ASGIApp, model_ids: Iterable[str], max_body_bytes: int) -> None:
        self.app = app
        self.model_ids = frozenset(model_ids)
        self.max_body_bytes = max_body_bytes
        self.requests = make_metric("Counter", "llm_serve_requests", "HTTP requests by model, route and status code.", ("model", "route", "status"))
        self.rejections = make_metric(
            "Counter", "llm_serve_rejections", "Requests refused or ended by an error, by model and reason.", ("model", "reason")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body, error_body = bytearray(), bytearray()
        status, started, streaming, error = 500, False, False, None

        async def tee_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < self.max_body_bytes:
                body.extend(message.get("body", b"")[: self.max_body_bytes - len(body)])
            return message

        async def watching_send(message: Message) -> None:
            nonlocal status, started, streaming, error
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if status >= 400 and len(error_body) < MAX_ERROR_BODY:
                    error_body.extend(chunk)
                elif streaming and error is None and SSE_ERROR in chunk:
                    error = _sse_error(chunk)
            await send(message)

        try:
            await self.app(scope, tee_receive, watching_send)
        finally:
            if status >= 400:
                error = _json_error(bytes(error_body))
            if not started:  # the app raised: Starlette's outermost handler answers 500
                error = {"type": "internal_error"}
            self._record(scope, status, bytes(body), error)

    def _record(self, scope: Scope, status: int, body: bytes, error: dict[str, Any] | None) -> None:
        """A rejection is an OpenAI error body or SSE error event (a 503 from /readyz is not one)."""
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        model = self._model_of(body)
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        if error is not None:
            self.rejections.inc(tags={"model": model, "reason": rejection_reason(status, error)})

    def _model_of(self, body: bytes) -> str:
        match = MODEL_FIELD.search(body) if body else None
        model = match.group(1).decode("utf-8", "replace") if match else ""
        return model if model in self.model_ids else ""


def _json_error(body: bytes) -> dict[str, Any] | None:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, dict) else None


def _sse_error(chunk: bytes) -> dict[str, Any]:
    line = chunk[chunk.index(SSE_ERROR) :].split(b"\n", 1)[0]
    return _json_error(line[len(b"data: ") :]) or {}


# --- the scrape endpoint ---------------------------------------------------------------------
class RayMetricsScraper:
    """Fetches Prometheus text from every alive node's Ray metrics agent and keeps our families."""

    def __init__(self, prefixes: tuple[str, ...] = EXPORTED_PREFIXES, timeout_s: float = 5.0, nodes_ttl_s: float = 30.0) -> None:
        self.prefixes = prefixes
        self.timeout_s = timeout_s
        self.nodes_ttl_s = nodes_ttl_s
        self._targets: tuple[float, list[str]] | None = None
        # Loopback and cluster addresses only: never through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    async def targets(self) -> list[str]:
        """`http://<node>:<metrics export port>/metrics` of every alive node (cached a while)."""
        ray = sys.modules.get("ray")
        if ray is None or not ray.is_initialized():
            raise ServiceUnavailableError("metrics are exported by Ray's metrics agent; this process is not connected to Ray", code="metrics_unavailable")
        if self._targets is None or time.monotonic() - self._targets[0] > self.nodes_ttl_s:
            nodes = await asyncio.to_thread(ray.nodes)
            urls = [_agent_url(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in nodes if n.get("Alive") and n.get("MetricsExportPort", 0) > 0]
            self._targets = (time.monotonic(), urls)
        return self._targets[1]

    async def scrape(self) -> str:
        urls = await self.targets()
        texts = await asyncio.gather(*(asyncio.to_thread(self._fetch, url) for url in urls))
        if urls and not any(t is not None for t in texts):
            self._targets = None  # maybe a node went away: look again next time
            raise ServiceUnavailableError("no Ray metrics agent answered", code="metrics_unavailable")
        # Megabytes of text from Ray: filtered off the event loop, which streams every response.
        return await asyncio.to_thread(merge_families, [t for t in texts if t is not None], self.prefixes)

    def _fetch(self, url: str) -> str | None:
        try:
            with self._opener.open(url, timeout=self.timeout_s) as response:
                return response.read().decode("utf-8", "replace")  # type: ignore[no-any-return]
        except OSError as exc:
            logger.warning("scraping %s failed: %s", url, exc)
            return None


def _agent_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


def merge_families(texts: Iterable[str], prefixes: tuple[str, ...]) -> str:
    """The families whose names start with `prefixes`, each once (its HELP and TYPE, then the
    samples of every text): several nodes export the same families, each with its own samples."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family: str | None = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                family = name if name.startswith(prefixes) else None
                if family is not None and not any(h.startswith(line[:7]) for h in headers.setdefault(family, [])):
                    headers[family].append(line)
            elif line and not line.startswith("#"):
                if family is not None and line.startswith(family):
                    samples.setdefault(family, []).append(line)
                elif line.startswith(prefixes):  # a sample without a header of its own
                    samples.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
    lines: list[str] = []
    for name in sorted(headers.keys() | samples.keys()):
        lines.extend(headers.get(name, []))
        lines.extend(samples.get(name, []))
    return "\n".join(lines) + "\n" if lines else ""


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text of our series and Ray Serve's, from Ray's metrics agents."""
    scraper: RayMetricsScraper = request.app.state.metrics_scraper
    return PlainTextResponse(await scraper.scrape(), media_type=PROMETHEUS_TEXT)


def install_metrics(app: FastAPI, model_ids: Iterable[str], max_body_bytes: int) -> None:
    """`GET /metrics` and the request-counting middleware (add it last: it wraps every other)."""
    app.state.metrics_scraper = RayMetricsScraper()
    app.include_router(router)
    app.add_middleware(RequestMetrics, model_ids=list(model_ids), max_body_bytes=max_body_bytes)
