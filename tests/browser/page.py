"""What the browser tests do on the chat page, as a person would: pick a model, send, wait for the
reply to end, read it; and what they watch (request bodies, the reply as it streams)."""

from __future__ import annotations

import json
from typing import Any

from tests.browser.conftest import LiveServer

# Polls the last reply in the page every 30 ms until it ends: [[state, text], ...].
OBSERVE_REPLY = """async () => {
  const seen = [];
  for (const end = Date.now() + 10000; Date.now() < end;) {
    const b = [...document.querySelectorAll('.msg.assistant')].pop();
    if (b) {
      seen.push([b.dataset.state, b.querySelector('.content').textContent]);
      if (['done', 'stopped', 'error'].includes(b.dataset.state)) return seen;
    }
    await new Promise((r) => setTimeout(r, 30));
  }
  return seen;
}"""


def select_model(page: Any, model_id: str) -> None:
    page.click(f".model-card[data-model='{model_id}'] .model-select")
    page.wait_for_selector(f".model-card[data-model='{model_id}'][aria-current='true']", state="attached")


def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page: Any) -> Any:
    return page.locator(".msg.assistant").last


def wait_reply_end(page: Any, timeout_ms: int = 15_000) -> str:
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return b && ['done', 'stopped', 'error'].includes(b.dataset.state); }",
        timeout=timeout_ms,
    )
    return str(last_reply(page).get_attribute("data-state"))


def chat(page: Any, text: str) -> str:
    """Send `text`, wait for the reply to end; returns the reply's text."""
    count = page.locator(".msg.assistant").count()
    send(page, text)
    page.wait_for_function(f"() => document.querySelectorAll('.msg.assistant').length > {count}")
    assert wait_reply_end(page) == "done", last_reply(page).inner_text()
    return str(last_reply(page).locator(".content").text_content())


def record_bodies(page: Any, path: str) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith(path) and r.method == "POST" else None)
    return bodies


def ensure_loaded(live_server: LiveServer, model_id: str) -> None:
    if live_server.model(model_id)["status"] != "loaded":
        live_server.api("POST", "/load", {"model": model_id})
