"""Graceful shutdown, last in the e2e tier (it deletes the shared app): a stream in flight when the
application is deleted finishes whole, and no process of the application is left afterwards."""

from __future__ import annotations

import json
import threading
import time

import psutil
import requests

from tests.e2e.conftest import SMOLLM2

APP_PROCESSES = ("ServeReplica:llm:", "ControlPlane")


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
    serve.delete("llm", _blocking=False)  # what `serve shutdown` / Ctrl-C on `serve run` does per app
    client.join(timeout=120)
    assert not client.is_alive() and events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert not any("error" in e for e in chunks), chunks[-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 90
    while app_processes() and time.monotonic() < deadline:
        time.sleep(1)
    assert app_processes() == []
