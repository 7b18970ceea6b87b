"""A pool over the real Ray Serve app (tests/e2e/conftest.py: 6 tiny LoRA adapters + their base,
2 members per replica, 2 replicas): routing by multiplexed model id (and tokens back through the
engine's socket channel), a catalogue larger than the pool, eviction that frees slots and the base,
load/unload/keep-alive, and a bad adapter."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.e2e.conftest import NUM_POOL_ADAPTERS, POOL_BASE
from tests.e2e.test_serve_app import stream_events

ADAPTERS = [f"lora-{i:02d}" for i in range(NUM_POOL_ADAPTERS)]


def complete(url: str, model: str, max_tokens: int = 4) -> requests.Response:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def replicas(url: str) -> dict[str, dict[str, Any]]:
    return requests.get(f"{url}/pools", timeout=30).json()["data"]["tiny-pool"]  # type: ignore[no-any-return]


def models(url: str) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in requests.get(f"{url}/models", timeout=60).json()["data"]}


def unload(url: str, model: str) -> dict[str, Any]:
    r = requests.post(f"{url}/unload", json={"model": model}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_adapters_are_listed_under_their_base(serve_url: str) -> None:
    cards = {m["id"]: m for m in requests.get(f"{serve_url}/v1/models", timeout=30).json()["data"]}
    assert all(cards[a]["parent"] == POOL_BASE for a in ADAPTERS) and cards[POOL_BASE]["parent"] is None
    info = models(serve_url)
    assert info["lora-00"]["kind"] == "adapter" and info["lora-00"]["base"] == POOL_BASE and info["lora-00"]["pool"] == "tiny-pool"


def test_requests_for_a_resident_adapter_go_to_the_replica_holding_it(serve_url: str) -> None:
    assert complete(serve_url, "lora-00").status_code == 200  # cold: some replica loads it
    time.sleep(1.5)  # the replica pushes its multiplexed ids to Ray's routers (and reports to us)
    before = replicas(serve_url)
    holders = [r for r, report in before.items() if "lora-00" in report["resident"]]
    assert len(holders) == 1, before
    for _ in range(6):
        assert complete(serve_url, "lora-00").status_code == 200
    time.sleep(1)
    after = replicas(serve_url)
    assert after[holders[0]]["num_hits"] - before[holders[0]]["num_hits"] == 6  # every one went to the holder
    assert sum(r["num_misses"] for r in after.values()) == sum(r["num_misses"] for r in before.values())
    info = models(serve_url)["lora-00"]
    assert info["held_by"] == holders
    # after the first, its tokens came back through a channel to the holder's engine (its Unix socket)
    assert info["channels"]["open"] == 1 and info["channels"]["batches"] >= 6, info["channels"]


def test_a_catalogue_larger_than_the_pool_serves_every_member(serve_url: str) -> None:
    outputs = {}
    for adapter in ADAPTERS + [POOL_BASE]:
        r = complete(serve_url, adapter, max_tokens=6)
        assert r.status_code == 200, r.text
        outputs[adapter] = r.json()["choices"][0]["text"]
    assert len(set(outputs.values())) >= 5  # the adapters change the output (tiny random models)
    time.sleep(1)
    reports = replicas(serve_url)
    assert len(reports) == 2 and all(len(r["resident"]) <= 2 for r in reports.values())  # Ray's LRU bound holds
    assert sum(r["num_evictions"] for r in reports.values()) >= 3  # 7 members through 4 places


def test_load_unload_and_eviction_free_the_slot_and_the_base(serve_url: str) -> None:
    r = requests.post(f"{serve_url}/load", json={"model": "lora-01"}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "loaded" and len(r.json()["held_by"]) == 1, r.text
    assert unload(serve_url, "lora-01")["status"] == "unloaded"
    assert not any("lora-01" in report["resident"] for report in replicas(serve_url).values())
    for member in ADAPTERS + [POOL_BASE, "lora-brief"]:  # evict everything: no base engine stays
        unload(serve_url, member)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(r["engines"] for r in replicas(serve_url).values()):
        time.sleep(0.5)
    assert not any(r["engines"] for r in replicas(serve_url).values())  # no member left: the base engines were unloaded
    assert complete(serve_url, "lora-02").status_code == 200  # and come back on demand


def test_keep_alive_evicts_an_idle_adapter(serve_url: str) -> None:
    assert complete(serve_url, "lora-brief").status_code == 200
    # Held right after the request (on a slow host its 4 s keep-alive may be near its end already):
    deadline = time.monotonic() + 2  # reports reach the router within half a second
    while not any("lora-brief" in report["resident"] for report in replicas(serve_url).values()):
        assert time.monotonic() < deadline, "lora-brief was never reported held"
        time.sleep(0.1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and models(serve_url)["lora-brief"]["status"] == "loaded":
        time.sleep(0.5)
    info = models(serve_url)["lora-brief"]
    assert info["status"] == "unloaded" and info["releases"].get("idle") == 1, info


def test_a_bad_adapter_fails_with_its_reason_and_touches_no_other_member(serve_url: str) -> None:
    r = requests.post(f"{serve_url}/load", json={"model": "lora-pickled"}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "failed" and "pickle" in r.json()["error"], r.text
    refused = complete(serve_url, "lora-pickled")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_load_failed", refused.text
    assert complete(serve_url, "lora-03").status_code == 200


def test_saturating_one_adapter_refuses_with_503_and_every_admitted_request_completes(serve_url: str) -> None:
    # The pool (conftest): 2 replicas x max_ongoing_requests 2, and 2 more queued. 10 requests for
    # lora-04 and 1 for lora-05 at the same moment; a dedicated model beside them.
    start = threading.Barrier(12)

    def one(model: str) -> tuple[str, int, Any]:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 40, "min_tokens": 40, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        start.wait()
        with requests.post(f"{serve_url}/v1/completions", json=body, stream=True, timeout=120) as r:
            if r.status_code != 200:
                return model, r.status_code, (r.headers.get("retry-after"), r.json()["error"]["code"])
            return model, 200, stream_events(r)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, ["lora-04"] * 10 + ["lora-05", "tiny-pair"]))
    admitted = [r for r in results[:-1] if r[1] == 200]
    refused = [r for r in results if r[1] != 200]
    print(f"\npool burst: {len(admitted)} of 11 admitted ({sum(r[0] == 'lora-05' for r in admitted)} of 1 for lora-05)")
    assert results[-1][1] == 200  # a model outside the pool never notices
    # At least the holder's 2 slots and the 2 queue places are used before anything is refused. (In
    # the first second of a burst Ray keeps an adapter's requests for the replica holding it, so the
    # other replica's slots may stay unused then: the pool's whole 6 is not guaranteed.)
    assert len(admitted) >= 2 + 2 and len(admitted) + len(refused) == 11, results
    for _, code, (retry_after, error) in refused:
        assert code == 503 and error == "overloaded" and int(retry_after) >= 1
    for _, _, events in admitted + [results[-1]]:  # every admitted request completes
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 40, events[-3:]
