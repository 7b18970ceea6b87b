"""The LoRA part of one engine step: our kernel (`lora_add`) against the masked GEMMs, by step size.

The engine's own `LoRALinear` over SmolLM2's 120 target layers (rank 16, 6 slots), tokens laid out
as a prefill step lays them: 10 contiguous sequences, 5 of them on 5 adapters and the rest on the
base. The masked-GEMM path is the same code with our kernels switched off (`LLM_SERVE_INT4_KERNEL=torch`,
as on a GPU); the base matmuls, the same in both, are timed alone and subtracted. The two run in
turns within each round; each figure is the fastest round. Baseline: the masked GEMMs, same run.

    python perf/bench_lora_kernel.py [--tokens 16,128,512,1024] [--rounds 3]

Writes perf/results/bench_lora_kernel.json; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine import kernels  # noqa: E402
from deployments.engine.lora import LoRABatch, LoRALinear  # noqa: E402
from perf.common import REPO_ROOT, machine  # noqa: E402

RANK, SLOTS = 16, 6
# SmolLM2-135M's fused target layers: (in, part outputs); 30 decoder layers of each.
LAYERS = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])] * 30
SEQUENCE_SLOTS = [0, 1, 2, 3, 4, -1, -1, 0, 1, 2]  # 10 sequences: 5 adapters and the base


def token_slots(tokens: int) -> list[int]:
    """Each sequence's tokens contiguous, as in a prefill step."""
    per = tokens // len(SEQUENCE_SLOTS)
    return [s for i, s in enumerate(SEQUENCE_SLOTS) for _ in range(per if i < len(SEQUENCE_SLOTS) - 1 else tokens - per * i)]


def build_layers() -> tuple[list[LoRALinear], Any]:
    owner = SimpleNamespace(max_rank=RANK, num_slots=SLOTS, dtype=torch.bfloat16, device=torch.device("cpu"), batch=None)
    layers = []
    for num_in, parts in LAYERS:
        base = torch.nn.Linear(num_in, sum(parts), bias=False)
        layer = LoRALinear(base, owner, [f"p{i}" for i in range(len(parts))], parts)  # type: ignore[arg-type]
        layer.lora_a.normal_(0, 0.05)
        layer.lora_b.normal_(0, 0.05)
        layers.append(layer)
    return layers, owner


def time_pass(layers: list[LoRALinear], inputs: dict[int, torch.Tensor], kernel: bool) -> float:
    if kernel:
        os.environ.pop(kernels.ENV, None)
    else:
        os.environ[kernels.ENV] = "torch"
    start = time.perf_counter()
    with torch.inference_mode():
        for layer in layers:
            layer(inputs[layer.base.in_features])
    return (time.perf_counter() - start) * 1e3


def measure(tokens: int, rounds: int) -> dict[str, float]:
    layers, owner = build_layers()
    inputs = {n: torch.randn(tokens, n) for n in {num_in for num_in, _ in LAYERS}}
    best = {"base": float("inf"), "masked": float("inf"), "kernel": float("inf")}
    batch = LoRABatch(token_slots(tokens), torch.device("cpu"))
    for round_ in range(rounds + 1):  # round 0 warms up
        for name in best:
            owner.batch = None if name == "base" else batch
            ms = time_pass(layers, inputs, kernel=name != "masked")
            if round_:
                best[name] = min(best[name], ms)
    os.environ.pop(kernels.ENV, None)
    return {"masked_ms": best["masked"] - best["base"], "kernel_ms": best["kernel"] - best["base"], "base_ms": best["base"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16,128,512,1024", help="tokens per step, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if kernels.load("native") is None:
        sys.exit(f"our CPU kernels are unavailable here: {kernels.kernel_status()}")
    results = {}
    print(f"{'tokens':>6}  {'masked GEMMs ms':>15}  {'our kernel ms':>13}  {'speed-up':>8}   (LoRA only, 120 layers)")
    for tokens in (int(t) for t in args.tokens.split(",")):
        r = measure(tokens, args.rounds)
        results[tokens] = r
        print(f"{tokens:>6}  {r['masked_ms']:>15.1f}  {r['kernel_ms']:>13.1f}  {r['masked_ms'] / r['kernel_ms']:>7.1f}x", flush=True)
    out = REPO_ROOT / "perf" / "results" / "bench_lora_kernel.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "rank": RANK, "slots": SLOTS, "sequence_slots": SEQUENCE_SLOTS,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
