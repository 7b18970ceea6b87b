"""Faults on the real Ray Serve app: a client that leaves frees its slot within a second (running or
queued), and a model replica killed mid-stream ends the stream with an error event and `[DONE]`,
comes back loaded, and no other model notices."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import requests

from tests.e2e.conftest import SMOLLM2
from tests.e2e.test_serve_app import model_status


def running(url: str) -> int:
    return int(model_status(url, SMOLLM2)["num_running_requests"])


def seconds_until(condition: Callable[[], bool], within_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < within_s, f"not within {within_s} s"
        time.sleep(0.02)
    return time.monotonic() - start


def open_stream(url: str, max_tokens: int = 1500) -> requests.Response:
    body = {"model": SMOLLM2, "prompt": "Tell me a long story.", "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    response = requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120)
    assert response.status_code == 200
    return response


def freed_after(url: str, closed_at: float, running_after: int) -> float:
    """Seconds from the client's close to the replica letting go of the request: the replica stamps
    `last_used` as a request leaves it (wall clock, same host). Polling /models only to see that it
    has happened keeps the probe's own latency (hundreds of ms on a saturated 2-core host) out."""
    seconds_until(lambda: running(url) == running_after, within_s=10)
    return float(model_status(url, SMOLLM2)["last_used"]) - closed_at


def test_a_client_that_leaves_frees_its_slot_within_a_second(serve_url: str) -> None:
    assert running(serve_url) == 0
    response = open_stream(serve_url)
    lines = response.iter_lines()
    for _ in range(3):
        next(lines)  # streaming
    assert running(serve_url) == 1
    closed_at = time.time()
    response.close()  # mid-stream
    streaming = freed_after(serve_url, closed_at, running_after=0)

    # Waiting in the engine's queue: SMOLLM2 runs 16 sequences at once, the 17th waits (its
    # response has not started, so these are raw connections that are simply closed).
    connections = [raw_stream(serve_url) for _ in range(17)]
    try:
        seconds_until(lambda: running(serve_url) == 17, within_s=30)
        closed_at = time.time()
        connections.pop().close()
        queued = freed_after(serve_url, closed_at, running_after=16)
    finally:
        for connection in connections:
            connection.close()
    seconds_until(lambda: running(serve_url) == 0, within_s=5)
    print(f"\nslot freed {streaming * 1000:.0f} ms after a streaming client left, {queued * 1000:.0f} ms after a queued one")
    assert 0 < streaming < 1.0 and 0 < queued < 1.0, (streaming, queued)


def raw_stream(url: str) -> socket.socket:
    """A streamed completion request sent on a bare connection that is never read."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": SMOLLM2, "prompt": "Tell me a long story.", "max_tokens": 1500, "min_tokens": 1500,
                       "ignore_eos": True, "stream": True}).encode()
    connection = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    connection.sendall(head.encode() + body)
    return connection


def events_of(response: requests.Response, on_event: Callable[[int], None]) -> list[object]:
    events: list[object] = []
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
            on_event(len(events))
    return events


def test_a_replica_killed_mid_stream_ends_the_stream_cleanly_and_comes_back(serve_url: str) -> None:
    before = model_status(serve_url, SMOLLM2)
    assert before["status"] == "loaded"
    killed = threading.Event()
    others_streaming = threading.Barrier(3)  # two more streams, started while the first runs: they go through the router's channel
    others: list[list[object]] = []
    via: list[int] = []

    def other_stream() -> None:
        others.append(events_of(open_stream(serve_url, max_tokens=600), lambda n: n == 2 and others_streaming.wait(timeout=60)))

    def kill_at_fifth_event(n: int) -> None:
        if n == 2:
            for _ in range(2):
                threading.Thread(target=other_stream).start()
            others_streaming.wait(timeout=60)
        if n == 5 and not killed.is_set():
            via.append(model_status(serve_url, SMOLLM2)["channels"]["running_via_channels"])
            os.kill(before["pid"], signal.SIGKILL)
            killed.set()

    other_codes: list[int] = []

    def other_model_traffic() -> None:  # another model, all through the kill and the restart
        while not done.is_set():
            r = requests.post(f"{serve_url}/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 4}, timeout=60)
            other_codes.append(r.status_code)
            time.sleep(0.1)

    done = threading.Event()
    other = threading.Thread(target=other_model_traffic)
    other.start()
    try:
        start = time.monotonic()
        events = events_of(open_stream(serve_url, max_tokens=600), kill_at_fifth_event)
        assert killed.is_set() and time.monotonic() - start < 60  # ended, never hung
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]  # type: ignore[index]
        assert error["code"] == "replica_died" and "Traceback" not in error["message"]
        assert via and via[0] >= 1  # at least one of the streams the kill ended came through a channel
        seconds_until(lambda: len(others) == 2, within_s=30)
        for streamed in others:  # through the channel: the same clean end, the replica's death named
            assert streamed[-1] == "[DONE]" and streamed[-2]["error"]["code"] == "replica_died", streamed[-3:]  # type: ignore[index]
        seconds_until(lambda: model_status(serve_url, SMOLLM2).get("pid") not in (None, before["pid"]), within_s=180)
        seconds_until(lambda: model_status(serve_url, SMOLLM2)["status"] == "loaded", within_s=180)
    finally:
        done.set()
        other.join()
    assert other_codes and set(other_codes) == {200}
    r = requests.post(f"{serve_url}/v1/completions", json={"model": SMOLLM2, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_a_load_that_fails_is_failed_with_its_reason_and_not_retried(serve_url: str) -> None:
    """Truncated weights: `/load` answers `failed` with the reason; the replica stays up (no restart
    storm: same pid, one load attempt, still `failed` ten seconds on); other models never notice."""
    broken = "tiny-broken"
    before = model_status(serve_url, broken)
    assert before["status"] == "unloaded" and before["pid"]
    r = requests.post(f"{serve_url}/load", json={"model": broken}, timeout=120)
    assert r.status_code == 200 and r.json().get("status") == "failed", (r.status_code, r.text)
    failed = model_status(serve_url, broken)
    assert failed["status"] == "failed" and failed["error"] and "Traceback" not in failed["error"]
    codes = []
    for _ in range(10):  # ten seconds: a crash loop would restart the replica or retry the load
        codes.append(requests.post(f"{serve_url}/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 4},
                                   timeout=60).status_code)
        time.sleep(1)
    after = model_status(serve_url, broken)
    assert (after["status"], after["pid"], after["num_loads"]) == ("failed", before["pid"], failed["num_loads"]), after
    assert set(codes) == {200}
    r = requests.post(f"{serve_url}/v1/completions", json={"model": broken, "prompt": "hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["message"], r.text  # not loaded; no load attempted
    assert model_status(serve_url, broken)["num_loads"] == failed["num_loads"]
