"""The chat page with a pool: LoRA adapters listed under their base, chatted with by id, loaded and
unloaded from their cards (the pool of tests/browser/conftest.py: a tiny Llama and two adapters)."""

from __future__ import annotations

import json
from typing import Any

from tests.browser.conftest import ADAPTERS, LORA_BASE, POOL, SCREENSHOTS, LiveServer
from tests.browser.page import chat, last_reply, record_bodies, select_model

LORA_A, LORA_B = ADAPTERS


def card(page: Any, model_id: str) -> Any:
    return page.locator(f".model-card[data-model='{model_id}']")


def wait_card_status(page: Any, model_id: str, status: str) -> None:
    page.wait_for_function(
        "([id, status]) => document.querySelector(`.model-card[data-model='${id}']`)?.dataset.status === status",
        arg=[model_id, status], timeout=20_000,
    )


def resident(live_server: LiveServer) -> dict[str, float]:
    return live_server.api("GET", "/pools")["data"][POOL]["local"]["resident"]  # type: ignore[no-any-return]


def unload_if_loaded(live_server: LiveServer, model_id: str) -> None:
    if live_server.model(model_id)["status"] == "loaded":
        live_server.api("POST", "/unload", {"model": model_id})


def test_adapters_are_listed_under_their_base(page: Any) -> None:
    order = page.locator("#model-list .model-card").evaluate_all("cards => cards.map((c) => c.dataset.model)")
    at = order.index(LORA_BASE)
    assert order[at:at + 3] == [LORA_BASE, LORA_A, LORA_B], order
    # The base's card, then a nested list of its adapters, named for screen readers.
    group = page.locator(f"#model-list > li.adapter-group[data-base='{LORA_BASE}']")
    assert group.evaluate("g => g.previousElementSibling.dataset.model") == LORA_BASE
    nested = group.locator("ul.adapter-list")
    assert nested.get_attribute("aria-label") == f"Adapters of {LORA_BASE}"
    assert nested.locator(":scope > .model-card").evaluate_all("cs => cs.map((c) => c.dataset.model)") == [LORA_A, LORA_B]
    base_box = card(page, LORA_BASE).bounding_box()
    for adapter_id in ADAPTERS:
        adapter = card(page, adapter_id)
        assert adapter.get_attribute("data-kind") == "adapter" and adapter.get_attribute("data-base") == LORA_BASE
        assert adapter.locator(".adapter-badge").inner_text() == "adapter"
        assert adapter.locator(".badge").inner_text() == "unloaded"
        assert adapter.locator(".model-action").get_attribute("aria-label") == f"Load {adapter_id}"
        assert adapter.bounding_box()["x"] > base_box["x"] + 8  # indented under the base
        assert adapter.locator(".model-details").count() == 0  # the base's card names the pool
    assert card(page, LORA_BASE).locator(".adapter-badge").count() == 0
    assert "pool tiny-pool" in card(page, LORA_BASE).locator(".model-details").inner_text()


def test_chat_with_an_adapter_goes_to_its_id_and_differs_from_the_base(page: Any, live_server: LiveServer) -> None:
    bodies = record_bodies(page, "/v1/chat/completions")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "10")
    page.press("#max_tokens", "Tab")
    replies = {}
    for model_id in (LORA_BASE, LORA_A, LORA_B):
        select_model(page, model_id)
        assert page.locator(".msg").count() == 0  # a conversation of its own
        replies[model_id] = chat(page, "hi")
        assert replies[model_id].strip(), f"{model_id} sent an empty reply"
    assert [b["model"] for b in bodies] == [LORA_BASE, LORA_A, LORA_B]
    assert all(b["temperature"] == 0 and b["max_tokens"] == 10 and b["stream"] is True for b in bodies)
    assert len(set(replies.values())) == 3, replies  # greedy: each adapter changes the output
    # The adapter's header tag and state; the pool holds both adapters now.
    assert "adapter" in page.inner_text("#current-model") and LORA_B in page.inner_text("#current-model")
    assert {LORA_A, LORA_B} <= set(resident(live_server))
    wait_card_status(page, LORA_A, "loaded")
    assert card(page, LORA_A).locator(".model-memory").inner_text() == "on local"
    # Conversations stay per model id.
    select_model(page, LORA_A)
    assert [t.strip() for t in page.locator(".msg .content").all_text_contents()] == ["hi", replies[LORA_A].strip()]
    select_model(page, LORA_BASE)
    assert last_reply(page).locator(".content").text_content() == replies[LORA_BASE]


def test_load_and_unload_an_adapter_from_its_card(page: Any, live_server: LiveServer) -> None:
    unload_if_loaded(live_server, LORA_B)
    page.reload()
    wait_card_status(page, LORA_B, "unloaded")
    action = card(page, LORA_B).locator(".model-action")
    assert action.inner_text() == "Load" and card(page, LORA_B).locator(".model-memory").inner_text() == ""
    card(page, LORA_A).evaluate("c => { c.marked = true; }")  # a property, not an attribute: it lives on this element only
    action.click()
    wait_card_status(page, LORA_B, "loaded")
    assert card(page, LORA_B).locator(".badge").inner_text() == "loaded"
    assert card(page, LORA_B).locator(".model-memory").inner_text() == "on local"
    assert action.inner_text() == "Unload" and action.get_attribute("aria-label") == f"Unload {LORA_B}"
    info = live_server.model(LORA_B)
    assert info["status"] == "loaded" and info["held_by"] == ["local"] and LORA_B in resident(live_server)
    action.click()
    wait_card_status(page, LORA_B, "unloaded")
    assert card(page, LORA_B).locator(".badge").inner_text() == "unloaded" and action.inner_text() == "Load"
    assert live_server.model(LORA_B)["held_by"] == [] and LORA_B not in resident(live_server)
    # The polls while B loaded and unloaded re-rendered the list, but A's card did not change: same element.
    assert card(page, LORA_A).evaluate("c => c.marked === true")


def test_adapters_of_a_base_not_listed_have_a_heading(page: Any) -> None:
    def without_base(route: Any) -> None:
        response = route.fetch()
        body = response.json()
        body["data"] = [m for m in body["data"] if m["id"] != LORA_BASE]
        route.fulfill(response=response, body=json.dumps(body))

    page.route("**/models", without_base)
    page.reload()
    page.wait_for_selector(f".model-card[data-model='{LORA_A}']")
    assert card(page, LORA_BASE).count() == 0
    group = page.locator("li.adapter-group.orphan")
    assert group.count() == 1 and group.get_attribute("data-base") == LORA_BASE
    heading = group.locator("h3.adapter-base")
    assert LORA_BASE in heading.inner_text()
    assert group.locator("ul").get_attribute("aria-labelledby") == heading.get_attribute("id")
    assert group.locator(".model-card").evaluate_all("cs => cs.map((c) => c.dataset.model)") == [LORA_A, LORA_B]
    assert "pool tiny-pool" in card(page, LORA_A).locator(".model-details").inner_text()  # no base card says it
    select_model(page, LORA_B)
    assert LORA_B in page.inner_text("#current-model")


def test_adapters_at_phone_width_and_screenshot(page: Any, live_server: LiveServer) -> None:
    for model_id in (LORA_A, LORA_B):
        if live_server.model(model_id)["status"] != "loaded":
            live_server.api("POST", "/load", {"model": model_id})
    unload_if_loaded(live_server, LORA_B)  # one adapter held, one not: both badges in the picture
    page.reload()
    wait_card_status(page, LORA_A, "loaded")
    wait_card_status(page, LORA_B, "unloaded")
    select_model(page, LORA_A)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "10")
    if page.locator(".msg").count() == 0:
        chat(page, "hi")
    card(page, LORA_A).scroll_into_view_if_needed()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "adapters.png"))

    page.set_viewport_size({"width": 390, "height": 844})
    page.click("#models-toggle")
    assert page.is_visible(f".model-card[data-model='{LORA_B}']")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = card(page, LORA_B).bounding_box()
    assert box["x"] + box["width"] <= 390
    select_model(page, LORA_B)
    assert not page.is_visible("#model-list") and LORA_B in page.inner_text("#current-model")
