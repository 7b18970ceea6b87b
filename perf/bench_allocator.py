"""Does the replica allocator (Python's small objects on jemalloc, deployments/memory.py) cost speed?

Runs perf/bench_engine.py (--variants, default ours-fp32 and static batching, SmolLM2) in child
processes, alternating the default allocator (pymalloc + glibc) and the replica environment,
`--rounds` times each, and reports output tok/s per run and the median ratio. Writes
perf/results/bench_allocator.json (--results).

    python perf/bench_allocator.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.memory import replica_allocator_env  # noqa: E402
from perf.common import REPO_ROOT, machine  # noqa: E402
from perf.engine_runs import cpu_features  # noqa: E402

RESULTS = REPO_ROOT / "perf" / "results" / "bench_allocator.json"


def run_once(env_extra: dict[str, str], args: argparse.Namespace, out_dir: Path, name: str) -> dict[str, float]:
    command = [sys.executable, str(REPO_ROOT / "perf" / "bench_engine.py"), "--variants", args.variants,
               "--num-prompts", str(args.num_prompts), "--output-len", str(args.output_len),
               "--name", name, "--out-dir", str(out_dir)]
    subprocess.run(command, env={**os.environ, **env_extra}, check=True, capture_output=True, text=True)
    result = json.loads((out_dir / f"{name}.json").read_text())
    return {variant: float(figures["output_tokens_per_s"]) for variant, figures in result["variants"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--variants", default="ours-fp32,static", help="bench_engine.py variants, comma list")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    envs = {"default": {}, "replica_jemalloc": replica_allocator_env()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in envs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, env in envs.items():  # alternate, so drift on the machine hits both alike
                runs[name].append(run_once(env, args, Path(tmp), f"{name}-{round_}"))
                print(f"round {round_} {name}: {runs[name][-1]}", flush=True)
    medians = {name: {v: statistics.median(r[v] for r in rs) for v in rs[0]} for name, rs in runs.items()}
    ratio = {v: medians["replica_jemalloc"][v] / medians["default"][v] for v in medians["default"]}
    result = {"machine": {**machine(), **cpu_features()}, "env": envs["replica_jemalloc"], "workload": vars(args),
              "runs": runs, "median_output_tok_s": medians, "ratio_jemalloc_over_default": ratio}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"jemalloc/default output tok/s: " + ", ".join(f"{v} {r:.3f}" for v, r in ratio.items()))


if __name__ == "__main__":
    main()
