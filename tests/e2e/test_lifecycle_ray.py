"""Lifecycle on the real Ray Serve app: load/unload reach every replica, and Ray's autoscaler takes
a `min_replicas: 0` model to zero when idle, back on the next request, and up to `max_replicas`."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.e2e.test_serve_app import model_status


def replica_states(url: str, model: str, samples: int = 24, replicas: int = 2) -> dict[int, str]:
    """pid -> status, sampled through /models (each status call reaches one replica, at random),
    until `replicas` different ones answered or `samples` calls were made (a poll takes ~0.5 s
    here: sampling on once every replica has answered only cost time)."""
    seen: dict[int, str] = {}
    for _ in range(samples):
        status = model_status(url, model)
        seen[status["pid"]] = status["status"]
        if len(seen) >= replicas:
            break
    return seen


def wait_for_replicas(url: str, model: str, wanted: int, timeout_s: float) -> float:
    start = time.monotonic()
    while model_status(url, model)["replicas"] != wanted:
        assert time.monotonic() - start < timeout_s, f"{model} did not reach {wanted} replicas in {timeout_s} s"
        time.sleep(0.25)
    return time.monotonic() - start


def test_load_and_unload_reach_every_replica(serve_url: str) -> None:
    assert model_status(serve_url, "tiny-pair")["replicas"] == 2
    unloaded = requests.post(f"{serve_url}/unload", json={"model": "tiny-pair"}, timeout=120)
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
    states = replica_states(serve_url, "tiny-pair")
    assert len(states) == 2 and set(states.values()) == {"unloaded"}, states
    loaded = requests.post(f"{serve_url}/load", json={"model": "tiny-pair"}, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    states = replica_states(serve_url, "tiny-pair")
    assert len(states) == 2 and set(states.values()) == {"loaded"}, states
    # Concurrent loads of a loaded model do no load at all; replicas stay as they are.
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda _: requests.post(f"{serve_url}/load", json={"model": "tiny-pair"}, timeout=120), range(4)))
    assert {r.json()["status"] for r in again} == {"loaded"} and {r.json()["num_loads"] for r in again} == {loaded.json()["num_loads"]}


def test_interleaved_load_unload_from_several_clients_ends_in_the_last_calls_state(serve_url: str) -> None:
    calls = ["unload", "load", "unload", "load", "unload"]

    def call(i: int) -> int:
        time.sleep(0.05 * i)  # issued in this order, each before the previous one finished
        return requests.post(f"{serve_url}/{calls[i]}", json={"model": "tiny-pair"}, timeout=300).status_code

    with ThreadPoolExecutor(len(calls)) as pool:
        assert list(pool.map(call, range(len(calls)))) == [200] * len(calls)
    states = replica_states(serve_url, "tiny-pair")
    assert len(states) == 2 and set(states.values()) == {"unloaded"}, states
    assert requests.post(f"{serve_url}/load", json={"model": "tiny-pair"}, timeout=120).json()["status"] == "loaded"


def running_replicas(model: str) -> int:
    """RUNNING replicas straight from Ray Serve's controller. /models asks the replica too, and that
    call queues behind the load this test puts on it (seconds per poll on a 2-core host)."""
    from ray import serve

    from serve_app.ray_client import deployment_name

    deployment = serve.status().applications["llm"].deployments[deployment_name(model)]
    return sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


def test_scale_to_zero_back_on_request_and_up_to_max(serve_url: str) -> None:
    model = "tiny-scale"
    wait_for_replicas(serve_url, model, 0, timeout_s=60)  # idle since start: Ray removed the replica
    assert model_status(serve_url, model)["status"] == "unloaded"
    first = requests.post(f"{serve_url}/infer", json={"model": model, "prompt": "Hi", "max_tokens": 3}, timeout=120)
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] >= 1  # came back from zero
    assert model_status(serve_url, model)["replicas"] == 1
    body = {"model": model, "prompt": "Hi", "max_tokens": 120, "ignore_eos": True}
    # A new replica is a new worker process importing torch and transformers, then loading: 20-40 s
    # on a busy 2-core host. The load stops as soon as the second replica runs.
    deadline = time.monotonic() + 120
    scaled = threading.Event()

    def keep_busy(_: int) -> list[int]:  # 4 clients in a loop, against a target of 1 ongoing per replica
        codes = []
        while time.monotonic() < deadline and not (codes and scaled.is_set()):
            codes.append(requests.post(f"{serve_url}/infer", json=body, timeout=120).status_code)
        return codes

    peak = 0
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(keep_busy, i) for i in range(4)]
        while not all(f.done() for f in futures):
            peak = max(peak, running_replicas(model))
            if peak >= 2:
                scaled.set()
            time.sleep(0.25)
    codes = [c for f in futures for c in f.result()]
    assert set(codes) == {200}, codes  # nothing refused or lost while Ray added a replica
    assert peak == 2, f"scaled up to {peak} replicas in {time.monotonic() - started:.0f} s, max_replicas is 2"
    print(f"\n{model}: 2 replicas running {time.monotonic() - started:.1f} s after the load began")
    waited = wait_for_replicas(serve_url, model, 0, timeout_s=90)
    print(f"{model}: peak {peak} replicas; back to zero {waited:.1f} s after the load ended")
