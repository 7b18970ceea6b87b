"""int8 weights: the engine runs them, and on real SmolLM2 they pass the quality gate.

Gate (issue 3): greedy tokens agree with fp32 on >= 90% of positions (teacher-forced, see
perf/quality.py) and perplexity on a fixed text rises <= 5%.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.engine import EngineConfig, LLMEngine, SamplingParams
from perf.quality import greedy_agreement, load_pair, perplexity


def test_engine_generates_with_int8_weights(tiny_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), quantization="int8"))
    weights = [m.weight for m in engine.runner.model.modules() if type(m).__name__ == "Linear"]
    assert weights and all("Int8" in type(w).__name__ for w in weights)  # torchao's int8 weight tensors
    engine.add_request("q", engine.encode("The quick"), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == 12


@pytest.fixture(scope="module")
def smollm2_pair():  # type: ignore[no-untyped-def]
    return load_pair()


def test_int8_greedy_tokens_agree_with_fp32(smollm2_pair) -> None:  # type: ignore[no-untyped-def]
    fp32, int8, tokenizer = smollm2_pair
    assert greedy_agreement(fp32, int8, tokenizer) >= 0.90


def test_int8_perplexity_rises_at_most_5_percent(smollm2_pair) -> None:  # type: ignore[no-untyped-def]
    fp32, int8, tokenizer = smollm2_pair
    assert perplexity(int8, tokenizer) <= 1.05 * perplexity(fp32, tokenizer)
