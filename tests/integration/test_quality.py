"""The quality gate: int4 and bf16 weights against fp32, on the real shipped models, through our
engine (teacher-forced greedy agreement >= 97%, perplexity rise <= 2%; see perf/quality.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deployments.engine.layers import int8
from perf.quality import GATE_AGREEMENT, GATE_PERPLEXITY_RISE, MODELS, measure
from tests import prepare


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    prepare.wait_for(request.param)  # the GGUF's conversion, made in the background on idle CPU (tests/prepare.py)
    return measure(MODELS[request.param])


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_weights_format_passes_the_quality_gate(figures: dict[str, Any], fmt: str) -> None:
    f = figures["formats"][fmt]
    assert f["greedy_agreement"] >= GATE_AGREEMENT, f
    assert f["perplexity_rise"] <= GATE_PERPLEXITY_RISE, f


def test_int4_serves_the_shipped_4bit_blocks_as_they_are(figures: dict[str, Any]) -> None:
    facts = figures["formats"]["int4"]["facts"]
    assert facts["implementation"] == "native" and facts["weights"] == "int4"
    if "Q4_1" in facts["source_format"]:  # SmolLM2: every projection is Q4_1 in the GGUF
        assert facts["int4_exact_from_gguf"] == 210 and facts["int4_requantized"] == 0
        assert facts["linear_formats"] == {"int4": 120}  # 30 layers x (qkv, o, gate_up, down), fused
    elif int8.available(torch.device("cpu")):  # Gemma 3's Q5_0/Q6_K/Q8_0 projections: group-wise int8, not bf16
        assert facts["linear_formats"] == {"int4": 27, "int8g": 45}
