"""Graceful shutdown, last in the e2e tier (it deletes the shared app and then stops Serve and Ray): a
stream in flight when the application is deleted finishes whole within the grace period, and no process
of the application, of Serve or of Ray (GCS, raylet, HAProxy, dashboard, workers) is left afterwards."""

from __future__ import annotations

import json
import threading
import time

import psutil
import requests

from tests.e2e.conftest import SMOLLM2

APP_PROCESSES = ("ServeReplica:llm:", "ControlPlane")
GRACE_S = 30  # graceful_shutdown_timeout_s of every deployment (serve_app/app.py, pool_app.py)


def app_processes() -> list[str]:
    names = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    return [n for n in names if any(marker in n for marker in APP_PROCESSES)]


def test_deleting_the_app_lets_streams_finish_and_leaves_no_process(serve_url: str) -> None:
    from ray import serve

    assert app_processes()
    body = {"model": SMOLLM2, "prompt": "Tell me about the sea.", "max_tokens": 120, "min_tokens": 120,
            "ignore_eos": True, "stream": True}
    events: list[object] = []
    started = threading.Event()

    def stream() -> None:
        with requests.post(f"{serve_url}/v1/completions", json=body, stream=True, timeout=120) as response:
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("data: "):
                    payload = line[len("data: "):]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    started.set()

    client = threading.Thread(target=stream)
    client.start()
    assert started.wait(60)
    deleted_at = time.monotonic()
    serve.delete("llm", _blocking=False)  # what `serve shutdown` / Ctrl-C on `serve run` does per app
    client.join(timeout=120)
    assert not client.is_alive() and events[-1] == "[DONE]"
    assert time.monotonic() - deleted_at < GRACE_S  # finished within the grace period, not cut at its end
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert not any("error" in e for e in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 90
    while app_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert app_processes() == []


def test_stopping_serve_and_ray_leaves_no_process(serve_url: str) -> None:
    """What Ctrl-C on `serve run` ends with: every process this Ray session started is gone."""
    import psutil
    import ray
    from ray import serve

    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    me = psutil.Process()
    started = {p.pid for p in me.children(recursive=True)}
    assert started
    serve.shutdown()
    ray.shutdown()

    def left() -> list[str]:
        names = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            cmdline = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and (p.info["pid"] in started or session_dir in cmdline):
                names.append(f"{p.info['pid']} {cmdline[:100]}")
        return names

    deadline = time.monotonic() + 60
    while left() and time.monotonic() < deadline:
        time.sleep(1)
    assert left() == []
