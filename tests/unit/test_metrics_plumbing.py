"""Metric plumbing without Ray: the scrape text merge, rejection reasons, the counting middleware."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

import deployments.metrics as replica_metrics
import serve_app.metrics as router_metrics
from serve_app.metrics import RequestMetrics, merge_families, rejection_reason
from tests.fakes import RecordingMetric

NODE_A = """# HELP ray_llm_serve_requests_total HTTP requests.
# TYPE ray_llm_serve_requests_total counter
ray_llm_serve_requests_total{model="a",status="200"} 3.0
# HELP ray_node_cpu_count CPUs.
# TYPE ray_node_cpu_count gauge
ray_node_cpu_count{ip="127.0.0.1"} 2.0
# HELP ray_serve_num_router_requests_total Requests.
# TYPE ray_serve_num_router_requests_total counter
ray_serve_num_router_requests_total{deployment="router"} 7.0
"""
NODE_B = """# HELP ray_llm_serve_requests_total HTTP requests.
# TYPE ray_llm_serve_requests_total counter
ray_llm_serve_requests_total{model="b",status="503"} 1.0
"""


def test_merge_keeps_our_families_once_with_every_nodes_samples() -> None:
    text = merge_families([NODE_A, NODE_B], ("ray_llm_serve_", "ray_serve_"))
    lines = text.splitlines()
    assert lines.count("# TYPE ray_llm_serve_requests_total counter") == 1
    assert 'ray_llm_serve_requests_total{model="a",status="200"} 3.0' in lines
    assert 'ray_llm_serve_requests_total{model="b",status="503"} 1.0' in lines
    assert 'ray_serve_num_router_requests_total{deployment="router"} 7.0' in lines
    assert "ray_node_cpu_count" not in text
    # Each family's samples follow its own header.
    header = lines.index("# TYPE ray_llm_serve_requests_total counter")
    assert lines[header + 1].startswith("ray_llm_serve_requests_total{")
    assert merge_families([], ("ray_llm_serve_",)) == ""


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (503, {"type": "service_unavailable_error", "code": "overloaded"}, "overloaded"),
        (503, {"type": "service_unavailable_error", "code": "model_unloading"}, "model_unloading"),
        (200, {"type": "service_unavailable_error", "code": "model_unloaded"}, "model_unloading"),  # an SSE error event
        (409, {"type": "invalid_request_error", "code": "model_not_loaded"}, "model_not_loaded"),
        (507, {"type": "insufficient_storage_error", "code": None}, "memory_budget"),
        (400, {"type": "invalid_request_error", "code": "invalid_value"}, "bad_request"),
        (413, {"type": "invalid_request_error", "code": "payload_too_large"}, "payload_too_large"),
        (404, {"type": "not_found_error", "code": "model_not_found"}, "not_found"),
        (504, {"type": "timeout_error", "code": "deadline_exceeded"}, "deadline_exceeded"),
        (500, None, "internal_error"),
        (405, None, "bad_request"),
    ],
)
def test_rejection_reason(status: int, error: dict[str, Any] | None, reason: str) -> None:
    assert rejection_reason(status, error) == reason


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, RecordingMetric]]:
    metrics: dict[str, RecordingMetric] = {}

    def make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries: list[float] | None = None) -> RecordingMetric:
        # One series per name, as in Ray: every server's metric of that name records into it.
        return metrics.setdefault(name, RecordingMetric(kind, name, description, tag_keys, boundaries))

    monkeypatch.setattr(router_metrics, "make_metric", make)
    monkeypatch.setattr(replica_metrics, "make_metric", make)
    yield metrics


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """A bare ASGI app answering like ours: JSON errors, or an SSE stream that fails midway."""
    request = await receive()
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b'data: {"text":"hi"}\n\n', "more_body": True})
        error = b'data: {"error":{"message":"gone","type":"service_unavailable_error","param":null,"code":"model_unloaded"}}\n\n'
        await send({"type": "http.response.body", "body": error, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    if scope["path"] == "/raise":
        raise RuntimeError("a bug")
    if scope["path"] == "/readyz":  # a 503 that is an answer, not an error
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"status":"not_ready"}'})
        return
    status = 200 if b"good" in request.get("body", b"") else 503
    body = b"{}" if status == 200 else b'{"error":{"message":"full","type":"service_unavailable_error","param":null,"code":"overloaded"}}'
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def test_the_middleware_counts_requests_and_rejections_by_model(recorded: dict[str, RecordingMetric]) -> None:
    app = RequestMetrics(endpoint, model_ids=["m1"], max_body_bytes=1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
        assert (await http.post("/x", json={"model": "m1", "prompt": "good"})).status_code == 200
        assert (await http.post("/x", json={"prompt": "busy", "model": "m1"})).status_code == 503
        assert (await http.post("/x", json={"model": "made-up", "prompt": "good"})).status_code == 200
        stream = await http.post("/stream", json={"model": "m1"})
        assert stream.status_code == 200 and "[DONE]" in stream.text
        assert (await http.get("/readyz")).status_code == 503
        with pytest.raises(RuntimeError):
            await http.post("/raise", json={"model": "m1"})
    requests, rejections = recorded["llm_serve_requests"], recorded["llm_serve_rejections"]
    assert requests.values(model="m1", status="200") == [1.0, 1.0]  # /x and /stream
    assert requests.values(model="m1", status="503") == [1.0]
    assert requests.values(model="", status="200") == [1.0]  # an unknown id never becomes a label value
    assert rejections.values(model="m1", reason="overloaded") == [1.0]
    assert rejections.values(model="m1", reason="model_unloading") == [1.0]  # the SSE error event
    assert requests.values(model="m1", status="500") == [1.0] and rejections.values(model="m1", reason="internal_error") == [1.0]
    assert requests.values(model="", status="503") == [1.0]  # /readyz: counted, but no rejection
    assert len(rejections.calls) == 3
    assert {t["route"] for _, t in requests.calls} == {"unmatched"}  # no router here: no route template


def test_without_ray_every_metric_is_a_no_op() -> None:
    assert replica_metrics.ray_metrics_module() is None
    metric = replica_metrics.make_metric("Counter", "llm_serve_test", "", ("model",))
    metric.inc(1.0, tags={"model": "m"})
    assert isinstance(metric, replica_metrics.NoOpMetric)
