"""The ingress app over in-process model servers (no Ray): every endpoint, shapes and errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.inprocess import inprocess_api

CHAT = "tiny-chat"
BASE = "tiny-base"


def parse_sse(body: str) -> list[object]:
    events = []
    for block in body.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module")
async def client(tiny_model_dir: Path, tiny_base_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with inprocess_api(
        {
            "max_request_bytes": 4096,
            "models": [
                {"id": CHAT, "source": str(tiny_model_dir), "max_model_len": 128, "max_num_seqs": 4},
                {"id": BASE, "source": str(tiny_base_dir), "max_model_len": 128, "load_on_start": False, "autoload": False},
            ],
        }
    ) as (http, _):
        yield http


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


async def test_health_and_models(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text  # the base model is not load_on_start
    models = {m["id"]: m for m in (await client.get("/models")).json()["data"]}
    assert models[CHAT]["status"] == "loaded" and models[CHAT]["architecture"] == "LlamaForCausalLM"
    assert models[CHAT]["weights_bytes"] > 0 and models[CHAT]["has_chat_template"] is True
    assert models[CHAT]["context_length"] == 128
    assert models[BASE]["status"] == "unloaded" and models[BASE]["resident_memory_bytes"] == 0
    ids = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert ids == [CHAT, BASE]


async def test_one_model_by_id(client: httpx.AsyncClient) -> None:
    one = (await client.get(f"/models/{CHAT}")).json()
    assert one["id"] == CHAT and one["status"] == "loaded" and one["weights_bytes"] > 0
    assert (await client.get(f"/models/{BASE}")).json()["status"] == "unloaded"
    card = (await client.get(f"/v1/models/{CHAT}")).json()
    assert card["id"] == CHAT and card["object"] == "model" and card["parent"] is None
    for path in ("/models/nope", "/v1/models/nope", "/models/..%2Fetc", "/v1/models/a%00b"):
        error = assert_error(await client.get(path), 404)
        assert error["code"] in ("model_not_found", "404") and "/etc" not in error["message"], (path, error)


async def test_infer_stream_matches_non_stream(client: httpx.AsyncClient) -> None:
    body = {"model": CHAT, "prompt": "naïve café 🙂", "max_tokens": 24, "temperature": 0}
    whole = (await client.post("/infer", json=body)).json()
    assert whole["finish_reason"] in ("stop", "length") and whole["usage"]["prompt_tokens"] > 0
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + whole["usage"]["completion_tokens"]
    streamed = await client.post("/infer", params={"stream": "true"}, json=body)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert isinstance(final, dict) and final["finish_reason"] == whole["finish_reason"] and final["usage"] == whole["usage"]
    assert "".join(e["text"] for e in events[:-1] if isinstance(e, dict)) == whole["text"]


async def test_infer_with_messages_uses_chat_template(client: httpx.AsyncClient) -> None:
    r = await client.post("/infer", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 3  # the template wrapped the one-word message


async def test_openai_completions_and_chat(client: httpx.AsyncClient) -> None:
    comp = (await client.post("/v1/completions", json={"model": CHAT, "prompt": "The quick", "max_tokens": 5, "temperature": 0, "ignore_eos": True})).json()
    assert comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] == 5
    chat = (await client.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 4})).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 4
    stream = await client.post(
        "/v1/chat/completions",
        json={"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = parse_sse(stream.text)
    assert events[-1] == "[DONE]"
    usage_chunk, final_chunk = events[-2], events[-3]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert final_chunk["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


async def test_completions_stream_greedy_equals_whole(client: httpx.AsyncClient) -> None:
    body = {"model": CHAT, "prompt": "Ray Serve hosts", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]["text"]
    events = parse_sse((await client.post("/v1/completions", json=body | {"stream": True})).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/infer", {"model": CHAT, "prompt": "x", "temperature": 5}, 400, "temperature"),
        ("/infer", {"model": CHAT, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/infer", {"model": CHAT, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/infer", {"model": CHAT, "prompt": ""}, 400, "prompt"),
        ("/infer", {"model": CHAT}, 400, None),
        ("/infer", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/infer", {"model": CHAT, "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
        ("/v1/completions", {"model": CHAT, "prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"model": CHAT, "prompt": "x", "stop": [""]}, 400, "stop"),
        ("/v1/chat/completions", {"model": CHAT, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, None),
        ("/load", {"model": "nope"}, 404, "model"),
    ],
)
async def test_bad_input_is_a_clear_openai_error(client: httpx.AsyncClient, path: str, body: dict, status: int, param: str | None) -> None:
    assert_error(await client.post(path, json=body), status, param)


async def test_context_overflow_names_the_numbers(client: httpx.AsyncClient) -> None:
    error = assert_error(await client.post("/infer", json={"model": CHAT, "prompt": "hello " * 20, "max_tokens": 120}), 400)
    assert "128" in error["message"] and "120" in error["message"]


async def test_malformed_json_oversize_and_unknown_route(client: httpx.AsyncClient) -> None:
    bad = await client.post("/infer", content=b'{"model": ', headers={"content-type": "application/json"})
    assert assert_error(bad, 400)["code"] == "invalid_json"
    big = await client.post("/infer", json={"model": CHAT, "prompt": "x" * 5000})
    assert_error(big, 413)
    assert_error(await client.get("/no-such-route"), 404)


async def test_chat_without_template_is_400_and_unloaded_is_409(client: httpx.AsyncClient) -> None:
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    assert assert_error(await client.post("/v1/chat/completions", json=chat), 409)["code"] == "model_not_loaded"
    loaded = (await client.post("/load", json={"model": BASE})).json()
    assert loaded["status"] == "loaded" and loaded["has_chat_template"] is False
    error = assert_error(await client.post("/v1/chat/completions", json=chat), 400, "messages")
    assert "chat template" in error["message"]
    ok = await client.post("/v1/completions", json={"model": BASE, "prompt": "The", "max_tokens": 2})
    assert ok.status_code == 200
    unloaded = (await client.post("/unload", json={"model": BASE})).json()
    assert unloaded["status"] == "unloaded" and unloaded["resident_memory_bytes"] == 0


async def test_chat_page_and_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and "/ui/app.js" in page.text
    assert (await client.get("/ui/app.js")).status_code == 200
