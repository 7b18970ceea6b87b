"""The control plane on the real Ray Serve app: transitions of different models at the same moment
both land (the app config has one writer), and a router replica killed mid-traffic comes back
with the lifecycle state (keep-alive clocks, release counts) intact."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from tests.e2e.test_lifecycle_ray import replica_states
from tests.e2e.test_serve_app import model_status


def post(url: str, route: str, model: str) -> int:
    return requests.post(f"{url}/{route}", json={"model": model}, timeout=300).status_code


def test_transitions_of_different_models_at_the_same_moment_all_land(serve_url: str) -> None:
    # Each round unloads one model while loading the other, both at once; before the config had
    # one writer, one of the two read-modify-writes of the app config could overwrite the other.
    rounds = [("unload", "tiny-pair", "load", "tiny-base"), ("load", "tiny-pair", "unload", "tiny-base")] * 2
    for first, first_model, second, second_model in rounds:
        with ThreadPoolExecutor(2) as pool:
            codes = list(pool.map(lambda call: post(serve_url, *call), [(first, first_model), (second, second_model)]))
        assert codes == [200, 200]
        wanted = {first_model: first + "ed", second_model: second + "ed"}
        pair_states = replica_states(serve_url, "tiny-pair")
        assert len(pair_states) == 2 and set(pair_states.values()) == {wanted["tiny-pair"]}, (wanted, pair_states)
        assert model_status(serve_url, "tiny-base")["status"] == wanted["tiny-base"]
    assert model_status(serve_url, "tiny-base")["status"] == "unloaded"  # as the other e2e tests expect


def router_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "ServeReplica:llm:router" in " ".join(p.info["cmdline"] or [])]


def wait_for_router(url: str, old_pid: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pids = router_pids()
            if pids and old_pid not in pids and requests.get(f"{url}/models", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no new router replica answered in {timeout_s} s")


def test_a_router_replica_killed_mid_traffic_comes_back_with_its_state(serve_url: str) -> None:
    assert post(serve_url, "load", "tiny-chat") == 200
    r = requests.post(f"{serve_url}/load", json={"model": "tiny-chat", "keep_alive": "2h"}, timeout=120)
    assert r.status_code == 200
    assert post(serve_url, "unload", "tiny-pair") == 200 and post(serve_url, "load", "tiny-pair") == 200
    before = {m: model_status(serve_url, m) for m in ("tiny-chat", "tiny-pair")}
    assert before["tiny-chat"]["keep_alive_s"] == 7200 and before["tiny-pair"]["releases"].get("manual", 0) >= 1

    body = {"model": "tiny-chat", "prompt": "once upon a time", "max_tokens": 100, "min_tokens": 100, "ignore_eos": True, "stream": True}
    streaming = threading.Event()

    def stream() -> None:  # traffic in flight when the router dies: it may fail, it must not hang
        try:
            with requests.post(f"{serve_url}/v1/completions", json=body, stream=True, timeout=60) as response:
                for _ in response.iter_lines():
                    streaming.set()
        except requests.RequestException:
            pass

    client = threading.Thread(target=stream)
    client.start()
    assert streaming.wait(60)
    (pid,) = router_pids()
    os.kill(pid, signal.SIGKILL)
    # While no router replica is up: HAProxy's answer is a 503 in the error shape (serve_app/haproxy-loopback),
    # or Serve's own proxy (its backup) holds the request until the new router takes it, or a request that
    # reached the dying router loses its connection -- never a bare 500, never a hang.
    # (tiny-pair: a request to tiny-chat would move the keep-alive clock checked below.)
    for _ in range(3):
        try:
            r = requests.post(f"{serve_url}/v1/completions", json={"model": "tiny-pair", "prompt": "hi", "max_tokens": 2}, timeout=60)
        except requests.ConnectionError:
            continue
        assert r.status_code in (200, 503), (r.status_code, r.text[:200])
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"] == "1"
    client.join(timeout=90)
    assert not client.is_alive()
    wait_for_router(serve_url, pid)

    after = {m: model_status(serve_url, m) for m in ("tiny-chat", "tiny-pair")}
    assert after["tiny-chat"]["keep_alive_s"] == 7200
    assert abs(after["tiny-chat"]["keep_alive_expires_at"] - before["tiny-chat"]["keep_alive_expires_at"]) < 1.0
    assert after["tiny-pair"]["releases"] == before["tiny-pair"]["releases"]
    assert after["tiny-chat"]["status"] == "loaded" and after["tiny-pair"]["status"] == "loaded"
    again = requests.post(f"{serve_url}/v1/completions", json=body | {"stream": False, "max_tokens": 4, "min_tokens": 4}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert requests.post(f"{serve_url}/load", json={"model": "tiny-chat", "keep_alive": "5m"}, timeout=60).status_code == 200
