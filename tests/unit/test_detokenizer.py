"""Incremental detokenisation: deltas add up to the whole text, UTF-8 split across tokens, stop strings."""

from __future__ import annotations

import pytest

from deployments.engine.detokenizer import IncrementalDetokenizer
from tests.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return build_tokenizer()


def run(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], bool]:  # type: ignore[no-untyped-def]
    prompt = tokenizer("Prompt:")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    deltas, stopped = [], False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for i, token_id in enumerate(ids):
        stopped = detok.push(token_id)
        deltas.append(detok.pop_delta(finished=stopped or i == len(ids) - 1))
        if stopped:
            break
    return deltas, stopped


def test_multibyte_characters_split_across_tokens_come_out_whole(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "emoji 🙂🚀 日本語 naïve"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the byte-level BPE really splits these characters
    deltas, _ = run(tokenizer, text)
    assert "".join(deltas) == text == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_cuts_text_and_is_never_emitted(tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas, stopped = run(tokenizer, "The quick brown fox jumps over", stop=("brown f",))
    assert stopped and "".join(deltas) == "The quick "
    assert not any("brown" in d for d in deltas)


def test_text_that_only_looks_like_a_stop_prefix_is_released(tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas, stopped = run(tokenizer, "The quick brown dog", stop=("brown f",))
    assert not stopped and "".join(deltas) == "The quick brown dog"


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:  # type: ignore[no-untyped-def]
    deltas, _ = run(tokenizer, "Ray Serve hosts models", stop=("models", "Serve"))
    assert "".join(deltas) == "Ray "
