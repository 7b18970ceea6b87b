"""The chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against the
real ingress app served by uvicorn on 127.0.0.1 (no Ray): in-process model servers, two of them
real tiny models, one a scripted engine (tests/fakes.py) that makes the visible text deterministic,
and a pool (deployments/pool.py, one in-process replica) of a tiny base and two LoRA adapters of it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.pool import PoolServer
from deployments.server import ModelServer
from serve_app.api import create_api
from serve_app.clients import InProcessModelClient, InProcessPoolClient, ModelRegistry
from serve_app.config import parse_app_settings
from tests.fakes import ScriptedEngine
from tests.inprocess import in_process_pool

SCRIPTED, CHAT, BASE = "scripted", "tiny-chat", "tiny-base"
POOL, LORA_BASE, ADAPTERS = "tiny-pool", "tiny-lora-base", ("lora-a", "lora-b")
DEFAULT_REPLY = "Hello! I am a scripted model."
REPLIES = {
    "count": " ".join(f"w{i}" for i in range(1, 21)),
    "long": " ".join(f"word{i}" for i in range(1, 201)),
    "markdown": "Here is **bold** text, `inline code` and a list:\n\n- one\n- two\n\n"
    "```python\ndef hello():\n    return 'hi'\n```\nDone.",
    "inject": 'Careful: <script>window.__pwned = 1</script> and <img src=x onerror="window.__pwned = 2"> '
    "and [click me](javascript:window.__pwned=3) end.",
    "tour": "Sure! The page:\n\n1. POSTs with `stream: true`\n2. reads **SSE** from the body\n\n"
    "```js\nconst reader = res.body.getReader();\n```",
}
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
API_KEY = "sk-browser-tests-0123456789"
# Before the page's scripts run: the key the page would keep after a person typed it once.
STORE_KEY = f"""try {{ if (localStorage.getItem('llm-chat.api-key') === null)
  localStorage.setItem('llm-chat.api-key', {json.dumps(json.dumps(API_KEY))}); }} catch (e) {{}}"""


@dataclass
class LiveServer:
    url: str
    servers: dict[str, ModelServer]
    pools: list[PoolServer]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        response = httpx.request(method, self.url + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def model(self, model_id: str) -> dict[str, Any]:
        return next(m for m in self.api("GET", "/models")["data"] if m["id"] == model_id)

    def wait_status(self, model_id: str, status: str, timeout_s: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (info := self.model(model_id))["status"] != status:
            assert time.monotonic() < deadline, f"{model_id} is {info['status']}, not {status}"
            time.sleep(0.05)
        return info


def chromium_path() -> str | None:
    found = shutil.which("chromium") or "/usr/bin/chromium"
    return found if os.access(found, os.X_OK) else None


@pytest.fixture(scope="session")
def lora_adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny Llama (random, non-zero: each changes the output), by id."""
    from tests.tiny_models import save_lora_adapter

    root = tmp_path_factory.mktemp("browser-adapters")
    return {
        adapter_id: save_lora_adapter(tiny_model_dir, root / adapter_id, seed, rank=8, base_name=LORA_BASE)
        for seed, adapter_id in enumerate(ADAPTERS, 1)
    }


@pytest.fixture(scope="module")
def live_server(tiny_model_dir: Path, tiny_base_dir: Path, lora_adapter_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    import uvicorn

    settings = parse_app_settings({
        "load_progress_interval_s": 0.1,
        "api_keys": [API_KEY],  # the page sends it on every request; tests/browser check it does
        "models": [
            {"id": SCRIPTED, "source": str(tiny_model_dir), "max_model_len": 4096, "keep_alive": -1},
            {"id": CHAT, "source": str(tiny_model_dir), "weights": "fp32", "max_model_len": 256, "max_num_seqs": 2, "keep_alive": -1},
            {"id": BASE, "source": str(tiny_base_dir), "weights": "fp32", "max_model_len": 256, "max_num_seqs": 2,
             "autoload": False, "keep_alive": -1},
        ],
        "pools": [{
            "id": POOL,
            "models": [{"id": LORA_BASE, "source": str(tiny_model_dir), "max_model_len": 128, "weights": "fp32"}],
            "adapters": [{"id": adapter_id, "base": LORA_BASE, "path": str(path)} for adapter_id, path in lora_adapter_dirs.items()],
            "max_models_per_replica": 2,
            "max_lora_rank": 8,
        }],
    })
    scripted = partial(ScriptedEngine, replies=REPLIES, default_reply=DEFAULT_REPLY, delay_s=0.05, load_delay_s=0.3)
    servers = {m.id: ModelServer(m.id, m.engine_config(), m.load_on_start) for m in settings.models if m.id != SCRIPTED}
    # ScriptedEngine has the AsyncLLMEngine surface ModelServer uses, without subclassing it.
    servers[SCRIPTED] = ModelServer(SCRIPTED, settings.models[0].engine_config(), engine_cls=scripted)  # type: ignore[arg-type]
    clients: dict[str, Any] = {m.id: InProcessModelClient(servers[m.id]) for m in settings.models}
    pools = [in_process_pool(pool) for pool in settings.pools]
    for pool in pools:  # every member (base and adapters) is a model id of the API
        clients |= {member_id: InProcessPoolClient(pool, member_id) for member_id in pool.members}
    app = create_api(ModelRegistry(clients), settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield LiveServer(f"http://127.0.0.1:{sock.getsockname()[1]}", servers, pools)
    server.should_exit = True
    thread.join(timeout=10)
    for model_server in [*servers.values(), *(s for pool in pools for s in pool.servers.values())]:
        if model_server.engine is not None:
            model_server.engine.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed: `apt-get install -y chromium` (make test installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser: Any, live_server: LiveServer) -> Iterator[Any]:
    """A fresh browser profile per test; its localStorage holds only the API key."""
    ctx = new_context(browser, live_server)
    ctx.add_init_script(STORE_KEY)
    yield ctx
    ctx.close()


def new_context(browser: Any, live_server: LiveServer) -> Any:
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(10_000)
    return ctx


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    """The chat page, its model list shown; a script error in the page fails the test."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    open_page(page)
    yield page
    assert not errors, f"errors in the page: {errors}"


def open_page(page: Any) -> None:
    page.goto("/")
    page.wait_for_selector(".model-card[aria-current='true']")
