"""Streamed OpenAI responses hand their HTTP connection to the model replica after the first event
(serve_app.handoff, deployments.handoff) on the real Ray Serve app: the streams are exactly the
non-streamed answers, event for event well formed, over kept-alive connections one after another; a
deadline that passes mid-stream gets its error event and [DONE] after the replica gave the
connection back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.e2e.conftest import SMOLLM2
from tests.e2e.test_serve_app import model_status, stream_events


def handoffs(url: str, model: str) -> int:
    return int(model_status(url, model)["channels"]["handoffs"])


def streamed_text(session: requests.Session, url: str, path: str, body: dict) -> str:
    with session.post(f"{url}{path}", json=body | {"stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        events = stream_events(r)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) and "error" not in e for e in events[:-1]), events[-3:]
    choices = [e["choices"][0] for e in events[:-1] if e.get("choices")]  # type: ignore[union-attr]
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)


def test_streamed_responses_hand_their_connection_to_the_replica_and_stay_exact(serve_url: str) -> None:
    completion = {"model": "tiny-pair", "prompt": "The quick brown", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    chat = {"model": "tiny-pair", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
            "ignore_eos": True, "temperature": 0}
    whole = {
        "/v1/completions": requests.post(f"{serve_url}/v1/completions", json=completion, timeout=120).json()["choices"][0]["text"],
        "/v1/chat/completions": requests.post(f"{serve_url}/v1/chat/completions", json=chat, timeout=120).json()["choices"][0]["message"]["content"],
    }
    bodies = {"/v1/completions": completion, "/v1/chat/completions": chat}
    before = handoffs(serve_url, "tiny-pair")

    def one_connection(i: int) -> list[str]:  # several streams, one after another, on one kept-alive connection
        with requests.Session() as session:
            paths = ["/v1/completions", "/v1/chat/completions"] * 2
            return [streamed_text(session, serve_url, p, bodies[p]) for p in paths[i % 2:] + paths[:i % 2]]

    with ThreadPoolExecutor(6) as pool:
        for _ in range(2):  # the first burst opens the router's channels to the replicas; the next uses them
            results = list(pool.map(one_connection, range(6)))
    for i, texts in enumerate(results):
        paths = (["/v1/completions", "/v1/chat/completions"] * 2)
        paths = paths[i % 2:] + paths[:i % 2]
        assert texts == [whole[p] for p in paths], (i, texts)
    channels = model_status(serve_url, "tiny-pair")["channels"]
    assert channels["handoffs"] - before >= 12, ("too few connections were handed over", before, channels)


def test_a_deadline_mid_stream_takes_the_connection_back_before_its_error(serve_url: str) -> None:
    body = {"model": SMOLLM2, "prompt": "Count on and on:", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    with requests.Session() as session:
        streamed_text(session, serve_url, "/v1/completions", body | {"max_tokens": 4})  # the router's channel opens
        before = handoffs(serve_url, SMOLLM2)
        start = time.monotonic()
        with session.post(f"{serve_url}/v1/completions", json=body | {"stream": True, "timeout": 1.5}, stream=True, timeout=120) as r:
            assert r.status_code == 200, r.text
            events = stream_events(r)
        assert time.monotonic() - start < 30
        assert events[-1] == "[DONE]", events[-3:]
        error = events[-2]["error"]  # type: ignore[index]
        assert error["code"] == "deadline_exceeded", error
        tokens = [e for e in events[:-2] if isinstance(e, dict) and e.get("choices")]
        assert len(tokens) > 5, "the deadline passed before the stream got going"
        assert handoffs(serve_url, SMOLLM2) - before >= 1
        # the connection, back with the router, carries the next stream whole
        assert streamed_text(session, serve_url, "/v1/completions", body | {"max_tokens": 8})
