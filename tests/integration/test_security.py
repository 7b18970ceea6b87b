"""API keys, the Host allowlist, CORS, the access log (no prompt text), and what the loader refuses:
pickle weight files and remote code. The router runs in-process behind an ASGI client."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from deployments.engine.loader import resolve_model_path
from deployments.server import ModelServer
from serve_app import security
from serve_app.api import create_api
from serve_app.clients import InProcessModelClient, ModelRegistry
from serve_app.config import parse_app_settings
from tests.integration.test_hostile import assert_client_error

REPO = Path(__file__).resolve().parents[2]
CHAT = "tiny-chat"
USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
SECRET_PROMPT = "zebra-quartz-7741 my card number is 4111"
PROTECTED = [("GET", "/models"), ("GET", "/readyz"), ("GET", "/v1/models"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("GET", "/metrics"), ("GET", "/no-such-route"), ("POST", "/infer"), ("POST", "/v1/completions"),
             ("POST", "/v1/chat/completions"), ("POST", "/load"), ("POST", "/unload")]
PUBLIC = [("/healthz", 200), ("/", 200), ("/ui/app.js", 200), ("/favicon.ico", 204)]


@pytest.fixture(scope="module")
def registry(tiny_model_dir: Path) -> ModelRegistry:
    server = ModelServer(CHAT, parse_app_settings({"models": [model_config(tiny_model_dir)]}).models[0].engine_config())
    return ModelRegistry({CHAT: InProcessModelClient(server)})


def model_config(directory: Path) -> dict[str, Any]:
    return {"id": CHAT, "source": str(directory), "max_model_len": 128, "keep_alive": -1}


def client_for(registry: ModelRegistry, directory: Path, host: str = "127.0.0.1", **settings: Any) -> httpx.AsyncClient:
    app = create_api(registry, parse_app_settings({"models": [model_config(directory)], **settings}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}", timeout=60)


@pytest.fixture(scope="module")
async def keyed(registry: ModelRegistry, tiny_model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(registry, tiny_model_dir, api_keys=[USER_KEY], admin_api_keys=[ADMIN_KEY]) as http:
        yield http


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_without_a_valid_key_every_data_route_is_401(keyed: httpx.AsyncClient, method: str, path: str) -> None:
    for headers in [{}, bearer("wrong-key-0123456789abcdef"), {"Authorization": f"Basic {USER_KEY}"},
                    {"Authorization": "Bearer "}, {"Authorization": USER_KEY}, bearer(USER_KEY + "x")]:
        response = await keyed.request(method, path, headers=headers, json={"model": CHAT, "prompt": "hi"})
        error = assert_client_error(response, 401)
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert USER_KEY not in response.text


async def test_the_chat_page_and_liveness_stay_public(keyed: httpx.AsyncClient) -> None:
    for path, status in PUBLIC:
        assert (await keyed.get(path)).status_code == status, path


async def test_a_user_key_reads_and_generates_but_only_an_admin_key_loads(keyed: httpx.AsyncClient) -> None:
    for path in ("/models", "/readyz", "/v1/models", "/docs", "/openapi.json"):
        assert (await keyed.get(path, headers=bearer(USER_KEY))).status_code == 200, path
    assert (await keyed.get("/models", headers={"authorization": f"bearer {USER_KEY}"})).status_code == 200
    infer = await keyed.post("/infer", headers=bearer(USER_KEY), json={"model": CHAT, "prompt": "hi", "max_tokens": 2})
    assert infer.status_code == 200, infer.text
    for path in ("/load", "/unload"):
        error = assert_client_error(await keyed.post(path, headers=bearer(USER_KEY), json={"model": CHAT}), 403)
        assert error["type"] == "permission_error"
    loaded = await keyed.post("/load", headers=bearer(ADMIN_KEY), json={"model": CHAT})
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    assert (await keyed.get("/v1/models", headers=bearer(ADMIN_KEY))).status_code == 200  # an admin key works everywhere


async def test_keys_from_the_environment(registry: ModelRegistry, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = "env-key-two-0123456789abcdef"
    monkeypatch.setenv(security.API_KEY_ENV, f"{USER_KEY}, {other}")
    monkeypatch.setenv(security.ADMIN_API_KEY_ENV, ADMIN_KEY)
    async with client_for(registry, tiny_model_dir) as http:
        assert_client_error(await http.get("/v1/models"), 401)
        assert (await http.get("/v1/models", headers=bearer(other))).status_code == 200
        assert_client_error(await http.post("/unload", headers=bearer(other), json={"model": "nope"}), 403)
        assert_client_error(await http.post("/unload", headers=bearer(ADMIN_KEY), json={"model": "nope"}), 404)


async def test_admin_keys_alone_guard_only_load_and_unload(registry: ModelRegistry, tiny_model_dir: Path) -> None:
    async with client_for(registry, tiny_model_dir, admin_api_keys=[ADMIN_KEY]) as http:
        assert (await http.get("/v1/models")).status_code == 200
        assert_client_error(await http.post("/load", json={"model": CHAT}), 401)
        assert (await http.post("/load", headers=bearer(ADMIN_KEY), json={"model": CHAT})).status_code == 200


async def test_keys_are_compared_in_constant_time_against_every_key(keyed: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    for key in ("wrong-key-0123456789abcdef", USER_KEY, ADMIN_KEY):
        calls.clear()
        await keyed.get("/v1/models", headers=bearer(key))
        assert len(calls) == 2  # no early exit on a match: both configured keys, every time
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the key's length does not show either


def test_bad_keys_fail_the_config_without_showing_the_key(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="api_keys") as failed:
        parse_app_settings({"models": [model_config(tiny_model_dir)], "api_keys": ["short-secret"]})
    assert "short-secret" not in str(failed.value)
    settings = parse_app_settings({"models": [model_config(tiny_model_dir)], "api_keys": [USER_KEY], "admin_api_keys": [ADMIN_KEY]})
    assert USER_KEY not in repr(settings) and ADMIN_KEY not in str(settings.model_dump())
    for bad in ({"allowed_hosts": ["evil.example/path"]}, {"cors_origins": ["javascript:alert(1)"]}):
        with pytest.raises(ValueError):
            parse_app_settings({"models": [model_config(tiny_model_dir)], **bad})


async def test_host_allowlist_refuses_dns_rebinding(registry: ModelRegistry, tiny_model_dir: Path) -> None:
    async with client_for(registry, tiny_model_dir, allowed_hosts=["llm.lan", "*.corp.example"]) as http:
        for host in ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:80", "localhost.", "[::1]:8000", "[::1]",
                     "llm.lan:8443", "a.corp.example", "b.a.corp.example:1"]:
            assert (await http.get("/healthz", headers={"host": host})).status_code == 200, host
        for host in ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "corp.example", "evilcorp.example",
                     "llm.lan.evil", "0.0.0.0", "127.0.0.2", "[::2]:80", "localhost:abc", "[::1", "", "llm.lan:80:80"]:
            for path in ("/healthz", "/", "/v1/models"):
                error = assert_client_error(await http.get(path, headers={"host": host}), 400)
                assert error["code"] == "invalid_host", (host, error)


async def test_cors_is_closed_unless_origins_are_configured(keyed: httpx.AsyncClient, registry: ModelRegistry, tiny_model_dir: Path) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    closed = await keyed.options("/v1/chat/completions", headers=preflight)
    assert closed.status_code in (401, 405) and "access-control-allow-origin" not in closed.headers
    simple = await keyed.get("/v1/models", headers=bearer(USER_KEY) | {"origin": "https://app.example"})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    async with client_for(registry, tiny_model_dir, api_keys=[USER_KEY], cors_origins=["https://app.example"]) as http:
        allowed = await http.options("/v1/chat/completions", headers=preflight)  # a preflight carries no key
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        refused = await http.options("/v1/chat/completions", headers=preflight | {"origin": "https://evil.example"})
        assert assert_client_error(refused, 400)["code"] == "cors_refused"
        simple = await http.get("/v1/models", headers=bearer(USER_KEY) | {"origin": "https://app.example"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.get("/v1/models", headers=bearer(USER_KEY) | {"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


ACCESS_LINE = re.compile(
    r"request_id=(\S+) method=(\w+) path=(\S+) status=(\d+) bytes_in=(\d+) bytes_out=(\d+) duration_ms=([\d.]+)"
)


async def test_logs_carry_ids_sizes_and_timings_but_no_prompt(keyed: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    auth = bearer(USER_KEY)
    chat = {"model": CHAT, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3}
    sent = [
        await keyed.post("/infer", headers=auth | {"x-request-id": "client-id-1"}, json={"model": CHAT, "prompt": SECRET_PROMPT, "max_tokens": 3}),
        await keyed.post("/v1/chat/completions", headers=auth, json=chat | {"stream": True}),
        await keyed.post("/v1/completions", headers=auth, json={"model": CHAT, "prompt": SECRET_PROMPT * 20}),  # over the context
        await keyed.post("/v1/completions", headers=auth, json={"model": "no-such-model", "prompt": SECRET_PROMPT}),
        await keyed.post("/infer", headers=auth, content=b'{"prompt": "' + SECRET_PROMPT.encode() + b'", NaN}'),
        await keyed.post("/infer", json={"model": CHAT, "prompt": SECRET_PROMPT}),  # no key
    ]
    assert [r.status_code for r in sent] == [200, 200, 400, 404, 400, 401]
    assert SECRET_PROMPT not in caplog.text and "zebra" not in caplog.text
    assert USER_KEY not in caplog.text
    lines = [ACCESS_LINE.search(r.getMessage()) for r in caplog.records if r.name == "serve_app.access"]
    assert len(lines) == len(sent) and all(lines)
    for response, line in zip(sent, lines):
        assert line is not None
        request_id, method, path, status, bytes_in, bytes_out, duration = line.groups()
        assert (method, path, int(status)) == ("POST", response.request.url.path, response.status_code)
        assert int(bytes_in) == len(response.request.content) and int(bytes_out) == len(response.content)
        assert float(duration) > 0 if response.status_code == 200 else float(duration) >= 0
        assert request_id == response.headers.get("x-request-id", "client-id-1")


async def test_debug_logging_adds_the_body_with_its_request_id(keyed: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="serve_app.access")
    body = {"model": CHAT, "prompt": SECRET_PROMPT, "max_tokens": 2}
    response = await keyed.post("/infer", headers=bearer(USER_KEY) | {"x-request-id": "client-id-2"}, json=body)
    assert response.status_code == 200
    debug = [r.getMessage() for r in caplog.records if r.name == "serve_app.access" and r.levelno == logging.DEBUG]
    assert len(debug) == 1 and debug[0].startswith("request_id=client-id-2 body=") and SECRET_PROMPT in debug[0]
    assert USER_KEY not in caplog.text  # headers never


def pickle_that_creates(marker: Path) -> bytes:
    """A pickle that, when loaded, creates `marker` (what a malicious checkpoint would do, harmlessly)."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    import pickle

    return pickle.dumps({"model.embed_tokens.weight": torch.zeros(2), "payload": Payload()})


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.pt", "weights.pkl", "model.ckpt"])
async def test_pickle_only_checkpoints_are_refused(tiny_model_dir: Path, tmp_path: Path, weights_file: str) -> None:
    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "unpickled"
    shutil.copytree(tiny_model_dir, checkpoint, ignore=shutil.ignore_patterns("*.safetensors*"))
    (checkpoint / weights_file).write_bytes(pickle_that_creates(marker))
    with pytest.raises(ValueError, match="pickle") as refused:
        resolve_model_path(str(checkpoint))
    assert weights_file in str(refused.value) and "safetensors or GGUF" in str(refused.value)
    server = ModelServer("pickled", {"model": str(checkpoint), "max_model_len": 128}, load_on_start=False)
    status = (await server.load()).to_dict()
    assert status["status"] == "failed" and "pickle" in status["error"] and not marker.exists()


async def test_a_pickle_beside_safetensors_is_never_opened(tiny_model_dir: Path, tmp_path: Path) -> None:
    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "unpickled"
    shutil.copytree(tiny_model_dir, checkpoint)
    (checkpoint / "pytorch_model.bin").write_bytes(pickle_that_creates(marker))
    server = ModelServer("mixed", {"model": str(checkpoint), "max_model_len": 128}, load_on_start=False)
    assert (await server.load()).status == "loaded"
    await server.unload()
    assert not marker.exists()


def test_trust_remote_code_is_never_set_in_our_code() -> None:
    sources = [*REPO.glob("deployments/**/*.py"), *REPO.glob("serve_app/**/*.py"), *REPO.glob("perf/*.py"),
               *REPO.glob("tests/**/*.py"), *REPO.glob("config/*.yaml")]
    assert len(sources) > 20
    settings = {
        f"{path.relative_to(REPO)}: {m.group(0)}"
        for path in sources
        if path != Path(__file__).resolve()  # this test's own pattern
        for m in re.finditer(r"trust_remote_code\W{1,4}(\w+)", path.read_text())
        if m.group(1) != "False"
    }
    assert settings == set()


@pytest.mark.parametrize("model_type", ["llama", "evil-arch"])
async def test_remote_code_in_a_checkpoint_never_runs(tiny_model_dir: Path, tmp_path: Path, model_type: str) -> None:
    checkpoint, marker = tmp_path / "checkpoint", tmp_path / "remote-code-ran"
    shutil.copytree(tiny_model_dir, checkpoint)
    (checkpoint / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import *\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config |= {"model_type": model_type, "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}
    (checkpoint / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    server = ModelServer("remote", {"model": str(checkpoint), "max_model_len": 128}, load_on_start=False)
    status = (await server.load()).to_dict()
    # A family we know loads with our own code; an unknown one fails: neither imports evil.py.
    assert status["status"] == ("loaded" if model_type == "llama" else "failed"), status.get("error")
    await server.unload()
    assert not marker.exists()
