"""`GET /metrics` on the real Ray Serve app: Ray's metrics agent export, scraped under traffic.

tests/e2e/conftest.py lowers `RAY_metrics_report_interval_ms` to 1 s (Ray's default is 10 s) so the
series move within a second or two of the traffic."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

TINY = "tiny-chat"
BASE = "tiny-base"  # loaded and unloaded here: its load and its release are counted
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    response = requests.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = []
    for line in response.text.splitlines():
        match = SAMPLE.match(line) if line and not line.startswith("#") else None
        if match:
            samples.append((match[1], dict(LABEL.findall(match[2] or "")), float(match[3])))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` (replicas, workers) whose labels include `labels`."""
    return sum(v for n, ls, v in samples if n == name and labels.items() <= ls.items())


def present(samples: Samples, name: str, **labels: str) -> bool:
    return any(n == name and labels.items() <= ls.items() for n, ls, _ in samples)


def stream_chat(url: str, content: str) -> dict[str, int]:
    body = {"model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "min_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line and line.startswith("data: {")]
    return next(e["usage"] for e in events if e.get("usage"))


def overload(url: str) -> int:
    """More concurrent streams than tiny-chat runs and queues (2 + 1): returns how many got 503."""
    body = {"model": TINY, "prompt": "hello", "max_tokens": 40, "ignore_eos": True}

    def one(_: int) -> int:
        with requests.post(f"{url}/infer", params={"stream": "true"}, json=body, stream=True, timeout=60) as r:
            r.content  # noqa: B018 - read it all: accepted streams run to the end
            return r.status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(one, range(6)))
    assert set(statuses) <= {200, 503}, statuses
    return statuses.count(503)


def wait_for(url: str, moved: Callable[[Samples], bool], timeout_s: float = 20.0) -> Samples:
    """Scrape until `moved` holds (workers push to the agent every report interval), bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if moved(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_metrics_move_under_traffic(serve_url: str) -> None:
    assert requests.post(f"{serve_url}/load", json={"model": TINY}, timeout=120).status_code == 200
    before = scrape(serve_url)
    for action, state in (("load", "loaded"), ("unload", "unloaded")):  # a load, then a release by hand
        assert requests.post(f"{serve_url}/{action}", json={"model": BASE}, timeout=120).json()["status"] == state
    usages = [stream_chat(serve_url, f"Hello number {i}") for i in range(3)]
    bad = requests.post(f"{serve_url}/v1/chat/completions", timeout=30,
                        json={"model": TINY, "messages": [{"role": "user", "content": "x"}], "temperature": -1})
    assert bad.status_code == 400
    refused = overload(serve_url)
    prompt_tokens, generated = sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)

    def delta(samples: Samples, name: str, **labels: str) -> float:
        return total(samples, name, **labels) - total(before, name, **labels)

    ok = {"model": TINY, "route": "/v1/chat/completions", "status": "200"}
    m = "ray_llm_serve_"

    def moved(s: Samples) -> bool:
        return (delta(s, f"{m}requests_total", **ok) >= 3 and delta(s, f"{m}generation_tokens_total", model=TINY) >= generated
                and delta(s, f"{m}rejections_total", model=TINY, reason="bad_request") >= 1
                and delta(s, f"{m}rejections_total", model=TINY, reason="overloaded") >= refused
                and total(s, f"{m}model_state", model=TINY, state="loaded") >= 1
                and delta(s, f"{m}model_releases_total", model=BASE, reason="manual") >= 1
                and total(s, f"{m}model_state", model=BASE, state="unloaded") >= 1)  # the replica's next sample

    after = wait_for(serve_url, moved)
    assert delta(after, f"{m}requests_total", **ok) >= 3
    assert delta(after, f"{m}requests_total", model=TINY, status="400") >= 1
    assert delta(after, f"{m}rejections_total", model=TINY, reason="bad_request") >= 1
    assert delta(after, f"{m}rejections_total", model=TINY, reason="overloaded") >= refused > 0
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(after, f"{m}{histogram}_count", model=TINY) >= 3, histogram
    assert delta(after, f"{m}inter_token_latency_seconds_count", model=TINY) >= 1
    assert delta(after, f"{m}prompt_tokens_total", model=TINY) >= prompt_tokens
    assert delta(after, f"{m}generation_tokens_total", model=TINY) >= generated
    assert total(after, f"{m}model_state", model=TINY, state="loaded") >= 1
    assert total(after, f"{m}model_state", model=TINY, state="unloaded") == 0
    assert total(after, f"{m}model_resident_bytes", model=TINY) > 0
    for gauge in ("kv_cache_usage_ratio", "kv_cache_used_blocks", "num_running_seqs", "num_waiting_seqs"):
        assert present(after, f"{m}{gauge}", model=TINY), gauge
    assert present(after, f"{m}model_load_duration_seconds_count", model=TINY)
    assert delta(after, f"{m}model_load_duration_seconds_count", model=BASE) >= 1
    assert delta(after, f"{m}model_releases_total", model=BASE, reason="manual") >= 1
    assert total(after, f"{m}model_state", model=BASE, state="unloaded") >= 1
    assert any(n.startswith("ray_serve_") for n, _, _ in after)  # Ray Serve's own series come along
    assert all(n.startswith(("ray_llm_serve_", "ray_serve_")) for n, _, _ in after)
