"""What the model server and the router record, on the real engine and API in-process (no Ray:
the metrics are recorded by a stand-in for Ray's metric objects; tests/e2e/test_metrics.py scrapes
the real export)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

import deployments.metrics as replica_metrics
import serve_app.metrics as router_metrics
from deployments.server import ModelServer
from deployments.protocol import GenerateRequest
from serve_app.api import create_api
from serve_app.clients import InProcessModelClient, ModelRegistry
from serve_app.config import parse_app_settings
from serve_app.lifecycle import LifecycleManager
from tests.inprocess import inprocess_api
from tests.fakes import RecordingMetric

CHAT, BASE = "tiny-chat", "tiny-base"


def recorder(metrics: dict[str, RecordingMetric]) -> Callable[..., RecordingMetric]:
    """A `make_metric` that records into `metrics`, one series per name as in Ray: every server's
    metric of that name records into it."""

    def make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries: list[float] | None = None) -> RecordingMetric:
        return metrics.setdefault(name, RecordingMetric(kind, name, description, tag_keys, boundaries))

    return make


@pytest.fixture(scope="module")
async def app(tiny_model_dir: Path, tiny_base_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, ModelServer, dict[str, RecordingMetric]]]:
    metrics: dict[str, RecordingMetric] = {}
    make = recorder(metrics)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(router_metrics, "make_metric", make)
        patch.setattr(replica_metrics, "make_metric", make)
        async with inprocess_api({"max_request_bytes": 4096, "models": [
            {"id": CHAT, "source": str(tiny_model_dir), "max_model_len": 128, "max_num_seqs": 4},
            {"id": BASE, "source": str(tiny_base_dir), "max_model_len": 128, "load_on_start": False, "autoload": False},
        ]}) as (http, servers):
            yield http, servers[CHAT], metrics


async def test_a_streamed_request_records_latencies_and_tokens(app, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    http, server, metrics = app
    step = server.engine.engine.step
    # 20 ms more per step, so tokens mostly reach the consumer one by one.
    monkeypatch.setattr(server.engine.engine, "step", lambda lane=None: (time.sleep(0.02), step(lane))[1])
    before = {name: len(m.calls) for name, m in metrics.items()}
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "min_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    usage = [json.loads(line[6:])["usage"] for line in response.text.splitlines() if line.startswith("data: {") and '"usage":{' in line][-1]
    new = {name: m.calls[before.get(name, 0):] for name, m in metrics.items()}
    assert [t for _, t in new["llm_serve_requests"]] == [{"model": CHAT, "route": "/v1/chat/completions", "status": "200"}]
    assert len(new["llm_serve_time_to_first_token_seconds"]) == 1
    assert len(new["llm_serve_e2e_request_latency_seconds"]) == 1
    # One ITL per token after the first (tokens that reach the replica together share their gap;
    # any that came with the first token have none) on a box this busy.
    assert 1 <= len(new["llm_serve_inter_token_latency_seconds"]) <= usage["completion_tokens"] - 1 == 5
    ttft, e2e = new["llm_serve_time_to_first_token_seconds"][0][0], new["llm_serve_e2e_request_latency_seconds"][0][0]
    assert 0.02 <= ttft <= e2e and all(0.005 <= v <= e2e for v, _ in new["llm_serve_inter_token_latency_seconds"])
    assert [v for v, _ in new["llm_serve_prompt_tokens"]] == [usage["prompt_tokens"]]
    assert [v for v, _ in new["llm_serve_generation_tokens"]] == [usage["completion_tokens"]]
    assert all(t == {"model": CHAT} for _, t in new["llm_serve_time_to_first_token_seconds"] + new["llm_serve_generation_tokens"])
    assert not new.get("llm_serve_rejections")


async def test_errors_count_by_status_and_reason_with_the_model(app) -> None:  # type: ignore[no-untyped-def]
    http, _, metrics = app
    bad = await http.post("/infer", json={"model": CHAT, "prompt": "x", "temperature": -1})
    not_loaded = await http.post("/infer", json={"model": BASE, "prompt": "x"})
    too_large = await http.post("/infer", json={"model": CHAT, "prompt": "x" * 5000})
    assert (bad.status_code, not_loaded.status_code, too_large.status_code) == (400, 409, 413)
    requests, rejections = metrics["llm_serve_requests"], metrics["llm_serve_rejections"]
    assert requests.values(model=CHAT, route="/infer", status="400")
    assert requests.values(model=BASE, route="/infer", status="409")
    assert rejections.values(model=CHAT, reason="bad_request")
    assert rejections.values(model=BASE, reason="model_not_loaded")
    # Refused by its Content-Length before a byte was read: counted, with no model.
    assert rejections.values(model="", reason="payload_too_large")


async def test_queue_time_counts_from_the_routers_handoff(app) -> None:  # type: ignore[no-untyped-def]
    _, server, metrics = app
    request = GenerateRequest("q", {"max_tokens": 2, "temperature": 0}, prompt="Hello", sent_at=time.time() - 0.5)
    async for _ in server.generate(request):
        pass
    assert 0.5 <= metrics["llm_serve_request_queue_time_seconds"].values(model=CHAT)[-1] < 5
    assert metrics["llm_serve_time_to_first_token_seconds"].values(model=CHAT)[-1] >= 0.5
    assert metrics["llm_serve_e2e_request_latency_seconds"].values(model=CHAT)[-1] >= 0.5


async def test_a_sample_reads_state_memory_and_the_engines_stats(app) -> None:  # type: ignore[no-untyped-def]
    _, server, metrics = app
    server.metrics.sample(server)
    states = metrics["llm_serve_model_state"]
    assert states.last(model=CHAT, state="loaded") == 1.0
    assert states.last(model=CHAT, state="unloaded") == 0.0 and states.last(model=CHAT, state="failed") == 0.0
    assert metrics["llm_serve_model_resident_bytes"].last(model=CHAT) == server.resident_bytes > 0
    stats = server.engine.engine.stats()
    assert metrics["llm_serve_num_running_seqs"].last(model=CHAT) == stats["num_running"]
    assert metrics["llm_serve_num_waiting_seqs"].last(model=CHAT) == stats["num_waiting"]
    assert 0.0 <= metrics["llm_serve_kv_cache_usage_ratio"].last(model=CHAT) <= 1.0  # type: ignore[operator]
    assert metrics["llm_serve_model_load_duration_seconds"].values(model=CHAT)  # observed at the load


async def test_metrics_endpoint_needs_ray(app) -> None:  # type: ignore[no-untyped-def]
    http, _, _ = app
    response = await http.get("/metrics")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "metrics_unavailable"
    # Outside the OpenAPI document (schemathesis does not reach it): a hostile query and body change nothing.
    hostile = await http.request("GET", "/metrics", params={"model": "../../etc/passwd", "x": "\x00" * 10}, content=b"\xff{[" * 100)
    assert hostile.status_code == 503 and hostile.json()["error"]["code"] == "metrics_unavailable"


async def test_a_manual_unload_and_an_idle_release_count_with_their_reasons(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`llm_serve_model_releases{model, reason}` as the router's lifecycle feeds it, wired as
    serve_app.app.Router wires it; unloading a model that is not loaded releases nothing."""
    metrics: dict[str, RecordingMetric] = {}
    monkeypatch.setattr(router_metrics, "make_metric", recorder(metrics))
    monkeypatch.setattr(replica_metrics, "make_metric", recorder(metrics))
    settings = parse_app_settings({"idle_check_interval_s": 0.1, "models": [
        {"id": CHAT, "source": str(tiny_model_dir), "max_model_len": 128, "keep_alive": -1},
    ]})
    server = ModelServer(CHAT, settings.models[0].engine_config(), load_on_start=True)
    registry = ModelRegistry({CHAT: InProcessModelClient(server)})
    lifecycle = LifecycleManager(registry, settings, on_release=router_metrics.release_counter())
    transport = httpx.ASGITransport(app=create_api(registry, settings, lifecycle))
    releases = metrics["llm_serve_model_releases"]
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as http:
            assert (await http.post("/unload", json={"model": CHAT})).json()["status"] == "unloaded"
            assert releases.calls == [(1.0, {"model": CHAT, "reason": "manual"})]
            assert (await http.post("/unload", json={"model": CHAT})).json()["status"] == "unloaded"
            assert len(releases.calls) == 1  # it held nothing: not a release
            # Loaded on demand, then idle past this request's keep-alive: the idle loop releases it.
            served = await http.post("/infer", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2, "keep_alive": "200ms"})
            assert served.status_code == 200, served.text
            deadline = time.monotonic() + 10.0  # unloading takes a moment on a busy host
            while len(releases.calls) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert releases.calls == [(1.0, {"model": CHAT, "reason": "manual"}), (1.0, {"model": CHAT, "reason": "idle"})]
            assert server.engine is None
    finally:
        await lifecycle.stop()
        await server.unload(force=True)
