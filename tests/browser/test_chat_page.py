"""The chat page as a person uses it: streaming, stop, turns, models, errors, safe rendering."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

from tests.browser.conftest import (
    API_KEY,
    BASE,
    CHAT,
    DEFAULT_REPLY,
    REPLIES,
    SCREENSHOTS,
    SCRIPTED,
    LiveServer,
    new_context,
    open_page,
)
from tests.browser.page import OBSERVE_REPLY, chat, ensure_loaded, last_reply, record_bodies, select_model, send, wait_reply_end


# --- streaming ---------------------------------------------------------------------------------
def test_tokens_arrive_incrementally(page: Any) -> None:
    select_model(page, SCRIPTED)
    send(page, "please count")
    seen = page.evaluate(OBSERVE_REPLY)
    assert seen[-1] == ["done", REPLIES["count"]]
    growing = [text for state, text in seen if state == "streaming" and text]
    lengths = sorted(set(map(len, growing)))
    assert len(lengths) >= 4, f"the reply did not grow in steps: {seen}"
    assert all(REPLIES["count"].startswith(text.rstrip()) for text in growing)
    assert all(len(a) <= len(b) for a, b in zip(growing, growing[1:]))
    meta = last_reply(page).locator(".meta").inner_text()
    assert "TTFT" in meta and "tok/s" in meta and "20 tokens" in meta and "finish: stop" in meta
    assert "tok/s" in page.inner_text("#live")


def test_stop_mid_stream(page: Any, live_server: LiveServer) -> None:
    select_model(page, SCRIPTED)
    send(page, "a long one")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .content')?.textContent || '').includes('word3')")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.click("#stop")
    assert wait_reply_end(page, 3000) == "stopped"
    stopped_text = last_reply(page).locator(".content").text_content()
    page.wait_for_timeout(400)
    assert last_reply(page).locator(".content").text_content() == stopped_text
    assert "word200" not in stopped_text and stopped_text.startswith("word1 word2 word3")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    # The aborted fetch ended the request on the server too.
    for _ in range(40):
        if live_server.model(SCRIPTED)["num_running_requests"] == 0:
            break
        page.wait_for_timeout(50)
    assert live_server.model(SCRIPTED)["num_running_requests"] == 0
    # The page is usable again.
    assert chat(page, "hello again") == DEFAULT_REPLY


def test_second_turn_sends_the_first(page: Any) -> None:
    select_model(page, SCRIPTED)
    bodies = record_bodies(page, "/v1/chat/completions")
    assert chat(page, "first question") == DEFAULT_REPLY
    chat(page, "second question")
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": DEFAULT_REPLY},
        {"role": "user", "content": "second question"},
    ]
    assert bodies[1]["stream"] is True and bodies[1]["model"] == SCRIPTED
    assert bodies[1]["temperature"] == 0.7 and bodies[1]["top_p"] == 1 and "max_tokens" not in bodies[1]


def test_sampling_controls_are_sent_and_kept(page: Any) -> None:
    select_model(page, SCRIPTED)
    bodies = record_bodies(page, "/v1/chat/completions")
    page.fill("#temperature", "0.3")
    page.fill("#top_p", "0.9")
    page.fill("#max_tokens", "5")
    page.press("#max_tokens", "Tab")
    assert chat(page, "please count") == "w1 w2 w3 w4 w5"
    assert "finish: length" in last_reply(page).locator(".meta").inner_text()
    assert {k: bodies[0][k] for k in ("temperature", "top_p", "max_tokens")} == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 5}
    page.reload()
    page.wait_for_selector(".model-card[aria-current='true']")
    assert [page.input_value(s) for s in ("#temperature", "#top_p", "#max_tokens")] == ["0.3", "0.9", "5"]


# --- conversations and models --------------------------------------------------------------
def test_conversation_per_model_survives_switch_and_reload(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, CHAT)
    select_model(page, SCRIPTED)
    assert chat(page, "hello scripted") == DEFAULT_REPLY
    select_model(page, CHAT)
    assert page.locator(".msg").count() == 0
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    chat(page, "hello tiny")
    tiny_reply = last_reply(page).locator(".content").text_content()

    def conversation() -> list[str]:
        return [t.strip() for t in page.locator(".msg .content").all_text_contents()]

    select_model(page, SCRIPTED)
    assert conversation() == ["hello scripted", DEFAULT_REPLY]
    page.reload()
    page.wait_for_selector(f".model-card[data-model='{SCRIPTED}'][aria-current='true']")
    assert conversation() == ["hello scripted", DEFAULT_REPLY]
    select_model(page, CHAT)
    assert conversation() == ["hello tiny", tiny_reply.strip()]
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    select_model(page, SCRIPTED)
    assert conversation() == ["hello scripted", DEFAULT_REPLY]


def badge(page: Any, model_id: str) -> Any:
    return page.locator(f".model-card[data-model='{model_id}'] .badge")


def test_load_and_unload_from_the_page(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, BASE)
    page.reload()
    select_model(page, BASE)
    card = page.locator(f".model-card[data-model='{BASE}']")
    assert badge(page, BASE).inner_text() == "loaded" and "resident" in card.locator(".model-memory").inner_text()
    card.locator(".model-action").click()
    page.wait_for_function(f"() => document.querySelector(\".model-card[data-model='{BASE}']\").dataset.status === 'unloaded'")
    assert live_server.model(BASE)["status"] == "unloaded" and live_server.model(BASE)["resident_memory_bytes"] == 0
    assert card.locator(".model-action").inner_text() == "Load"
    card.locator(".model-action").click()
    page.wait_for_function(f"() => document.querySelector(\".model-card[data-model='{BASE}']\").dataset.status === 'loaded'")
    assert live_server.model(BASE)["status"] == "loaded"
    assert badge(page, BASE).inner_text() == "loaded" and card.locator(".model-action").inner_text() == "Unload"
    assert page.locator("#current-model .badge").inner_text() == "loaded"


def test_model_without_chat_template_completes_text(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, BASE)
    page.reload()
    select_model(page, BASE)
    assert "base model" in page.inner_text("#mode-banner")
    assert page.locator(f".model-card[data-model='{BASE}'] .model-kind").inner_text() == "base"
    bodies = record_bodies(page, "/v1/completions")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    first = chat(page, "Once upon a time")
    assert bodies[0]["prompt"] == "User: Once upon a time\nAssistant:" and bodies[0]["stop"] == ["\nUser:"]
    assert bodies[0]["max_tokens"] == 12 and bodies[0]["temperature"] == 0
    assert last_reply(page).get_attribute("class") == "msg assistant completion" and first
    chat(page, "and then")
    assert bodies[1]["prompt"] == f"User: Once upon a time\nAssistant: {first}\nUser: and then\nAssistant:"
    page.select_option("#base-format", "raw")
    chat(page, "The end")
    assert bodies[2]["prompt"] == "The end" and "stop" not in bodies[2]


def test_model_not_loaded_offers_to_load_it(page: Any, live_server: LiveServer) -> None:
    if live_server.model(BASE)["status"] == "loaded":
        live_server.api("POST", "/unload", {"model": BASE})
    page.reload()
    select_model(page, BASE)
    send(page, "Hello")
    assert wait_reply_end(page) == "error"
    error = last_reply(page).locator(".error")
    assert "Model not loaded (409)" in error.inner_text()
    assert page.input_value("#prompt") == "Hello"  # given back to retry
    error.locator("button").click()
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 1 && "
                           "['done'].includes(document.querySelector('.msg.assistant').dataset.state)", timeout=20_000)
    assert live_server.model(BASE)["status"] == "loaded"
    assert page.locator(".msg.user").all_text_contents() == ["Hello"]


# --- safe rendering --------------------------------------------------------------------------
def test_injected_html_in_model_output_stays_inert(page: Any) -> None:
    select_model(page, SCRIPTED)
    text = chat(page, "inject")
    assert "<script>window.__pwned = 1</script>" in text and '<img src=x onerror="window.__pwned = 2">' in text
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#messages script, #messages img, #messages iframe").count() == 0
    assert page.locator("#messages a").count() == 0  # a javascript: link is shown as text
    assert "click me (javascript:window.__pwned=3)" in text


def test_markdown_code_block_is_a_code_element(page: Any) -> None:
    select_model(page, SCRIPTED)
    chat(page, "markdown")
    reply = last_reply(page)
    code = reply.locator("pre > code.language-python")
    assert code.count() == 1 and code.text_content() == "def hello():\n    return 'hi'\n"
    assert reply.locator("strong").text_content() == "bold"
    assert reply.locator("p code").text_content() == "inline code"
    assert reply.locator("ul > li").all_text_contents() == ["one", "two"]


# --- loading, overload and errors -------------------------------------------------------------
def test_autoload_progress_is_shown(page: Any, live_server: LiveServer) -> None:
    live_server.api("POST", "/unload", {"model": SCRIPTED})
    page.reload()
    select_model(page, SCRIPTED)
    assert badge(page, SCRIPTED).inner_text() == "unloaded"
    send(page, "hello")
    progress = page.wait_for_selector(".msg.assistant .progress")
    assert progress.text_content().startswith(f"Loading model {SCRIPTED} (")
    assert wait_reply_end(page) == "done"
    assert last_reply(page).locator(".content").text_content() == DEFAULT_REPLY
    assert "for the model to load" in last_reply(page).locator(".meta").inner_text()
    page.wait_for_function(f"() => document.querySelector(\".model-card[data-model='{SCRIPTED}']\").dataset.status === 'loaded'")


def test_in_stream_error_is_shown(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, SCRIPTED)
    select_model(page, SCRIPTED)
    send(page, "a long one")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .content')?.textContent || '').includes('word2')")
    live_server.api("POST", "/unload", {"model": SCRIPTED, "force": True})
    assert wait_reply_end(page, 5000) == "error"
    error = last_reply(page).locator(".error").inner_text()
    assert "Generation failed" in error and "unloaded" in error
    assert last_reply(page).locator(".content").text_content().startswith("word1 word2")  # what came is kept
    assert page.is_enabled("#send")
    live_server.api("POST", "/load", {"model": SCRIPTED})


def test_busy_model_says_when_to_retry(context: Any, page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, SCRIPTED)
    select_model(page, SCRIPTED)
    send(page, "a long one")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .content')?.textContent || '').includes('word2')")
    unloading = threading.Thread(target=live_server.api, args=("POST", "/unload", {"model": SCRIPTED}))
    unloading.start()  # drains: waits for the page's stream
    live_server.wait_status(SCRIPTED, "unloading")
    other = context.new_page()
    open_page(other)
    select_model(other, SCRIPTED)
    other.click("#clear")
    send(other, "hi")
    assert wait_reply_end(other) == "error"
    error = last_reply(other).locator(".error")
    assert "Model unloading (503)" in error.inner_text() and "Retry in 1 s" in error.inner_text()
    page.click("#stop")  # the drain ends, the unload completes
    unloading.join(timeout=10)
    other.wait_for_function("() => document.querySelector('.msg.assistant .error button').textContent === 'Retry'")
    error.locator("button").click()  # the model autoloads for the retry
    other.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 1 && "
                            "document.querySelector('.msg.assistant').dataset.state === 'done'", timeout=15_000)
    assert last_reply(other).locator(".content").text_content() == DEFAULT_REPLY
    other.close()


def test_api_key_is_asked_for_then_sent_with_every_request(browser: Any, live_server: LiveServer) -> None:
    context = new_context(browser, live_server)  # no key stored: the server answers 401
    page = context.new_page()
    seen: list[tuple[str, str | None]] = []
    page.on("request", lambda r: seen.append((urlsplit(r.url).path, r.headers.get("authorization"))))
    page.goto("/")
    page.wait_for_selector("#models-status[data-kind='error']")
    assert "Not authorised (401)" in page.inner_text("#models-status") and "API key" in page.inner_text("#models-status")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector(".model-card[aria-current='true']", state="attached")
    select_model(page, SCRIPTED)
    assert chat(page, "hello") == DEFAULT_REPLY
    page.reload()
    page.wait_for_selector(".model-card[aria-current='true']", state="attached")
    assert page.input_value("#api-key") == API_KEY
    calls = [(path, auth) for path, auth in seen if path == "/models" or path.startswith("/v1/")]
    assert calls[0] == ("/models", None) and "/v1/chat/completions" in [path for path, _ in calls]
    assert all(auth == f"Bearer {API_KEY}" for _, auth in calls[1:]), calls
    context.close()


# --- phone width and screenshots ---------------------------------------------------------------
def test_phone_width_and_screenshots(page: Any, live_server: LiveServer) -> None:
    ensure_loaded(live_server, SCRIPTED)
    ensure_loaded(live_server, CHAT)
    select_model(page, SCRIPTED)
    chat(page, "How does streaming work? Give me the tour")
    page.fill("#prompt", "And can I stop it?")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chat-desktop.png"))

    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.is_visible("#models-toggle") and not page.is_visible("#model-list")
    assert page.is_visible("#prompt") and page.is_visible("#send")
    page.screenshot(path=str(SCREENSHOTS / "chat-phone.png"))
    page.click("#models-toggle")
    assert page.is_visible(f".model-card[data-model='{CHAT}']")
    page.screenshot(path=str(SCREENSHOTS / "chat-phone-models.png"))
    select_model(page, CHAT)
    assert not page.is_visible("#model-list")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
