"""The chat page when the server is full, and Esc as the stop key.

Overload needs more concurrent requests than a model's `max_ongoing_requests + max_queued_requests`,
which only Ray Serve's queues produce (tests/e2e/test_serve_app.py drives that over Ray). Here the
page meets the exact answer the router gives then -- 503, code `overloaded`, a `Retry-After` -- through
Playwright's request routing for one request, and the retry goes to the real server."""

from __future__ import annotations

from typing import Any

from deployments.errors import OverloadedError
from serve_app.errors import error_response
from tests.browser.conftest import DEFAULT_REPLY, SCRIPTED, LiveServer
from tests.browser.page import ensure_loaded, last_reply, select_model, send, wait_reply_end

# The router's own answer (serve_app/ray_client.py), rendered by its own error handler.
OVERLOADED = error_response(OverloadedError(f"model {SCRIPTED!r} is at capacity (its queue is full); retry after 3s",
                                            headers={"Retry-After": "3"}))


def test_overloaded_server_says_busy_counts_down_and_retries(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, SCRIPTED)
    select_model(page, SCRIPTED)
    page.click("#clear")
    refused: list[str] = []

    def full_once(route: Any) -> None:
        if refused:
            route.continue_()
            return
        refused.append(route.request.url)
        route.fulfill(status=OVERLOADED.status_code, headers=dict(OVERLOADED.headers), body=bytes(OVERLOADED.body))

    page.route("**/v1/chat/completions", full_once)
    send(page, "hi")
    assert wait_reply_end(page) == "error"
    error = last_reply(page).locator(".error")
    assert "Server busy (503)" in error.inner_text() and "Retry in 3 s" in error.inner_text()
    button = error.locator("button")
    page.wait_for_function("() => /Retry in [12] s/.test(document.querySelector('.msg.assistant .error button').textContent)")
    assert button.is_disabled()  # no retry before the server said
    page.wait_for_function("() => document.querySelector('.msg.assistant .error button').textContent === 'Retry'", timeout=5000)
    button.click()
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 1 && "
                           "document.querySelector('.msg.assistant').dataset.state === 'done'", timeout=15_000)
    assert last_reply(page).locator(".content").text_content() == DEFAULT_REPLY
    assert len(refused) == 1
    page.unroute("**/v1/chat/completions")


def test_escape_stops_the_stream(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, SCRIPTED)
    select_model(page, SCRIPTED)
    send(page, "a long one")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .content')?.textContent || '').includes('word3')")
    page.keyboard.press("Escape")
    assert wait_reply_end(page, 3000) == "stopped"
    for _ in range(40):  # the aborted fetch ended the request on the server too
        if live_server.model(SCRIPTED)["num_running_requests"] == 0:
            break
        page.wait_for_timeout(50)
    assert live_server.model(SCRIPTED)["num_running_requests"] == 0
