"""One decode step's linears (+ LM head) in fp32 / bf16 / int4 / int8, at M rows (tokens in the batch).

Shapes are SmolLM2-135M's and Gemma 3 270M's with q/k/v and gate/up fused, as our model code runs
them; every layer has its own weights, so a step streams them all from memory like a real one.
Weights are random (kernel speed does not depend on values). Activations are fp32 for fp32 weights
and bf16 otherwise (the int kernels are vectorised for bf16 only). Formats are timed in turns
within each round, and each figure sums every call's fastest time over `--rounds`, so load from
other processes on the machine hits all formats alike. Baseline: bf16 (and fp32, the current default), same run.

    python perf/bench_linear.py [--rounds 5] [--quick]

Writes perf/results/bench_linear.json and bench_linear.png; prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.engine.layers.linear import Int4Weight, Linear  # noqa: E402
from perf.common import REPO_ROOT, machine  # noqa: E402

RESULTS = REPO_ROOT / "perf" / "results"
FORMATS = ("fp32", "bf16", "int4", "int8")
HEAD_FORMATS = ("fp32", "bf16", "int4", "int8")
# (linears, LM head) pairs for a whole step; WeightStore pairs int4 linears with an int8 head
STEPS = (("fp32", "fp32"), ("bf16", "bf16"), ("int4", "int8"), ("int4", "int4"), ("int4", "bf16"), ("int8", "int8"))
ROWS = (1, 2, 4, 10, 16, 32, 64)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab: int

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, out, in) of one layer's fused linears."""
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return [("qkv", qkv, self.hidden), ("o", self.hidden, self.num_heads * self.head_dim),
                ("gate_up", 2 * self.intermediate, self.hidden), ("down", self.hidden, self.intermediate)]


MODELS = {
    "smollm2-135m": ModelShape(576, 1536, 9, 3, 64, 30, 49152),
    "gemma3-270m": ModelShape(640, 2048, 4, 1, 256, 18, 262144),
}


def random_linear(out: int, num_in: int, fmt: str, group_size: int = 32, inner_k_tiles: int = 8) -> Linear:
    """A layer of this shape and format with random contents, built without quantizing."""
    if fmt == "int4":
        weight = Int4Weight(torch.randint(0, 16, (out, num_in), dtype=torch.uint8),
                            torch.rand(out, num_in // group_size) * 0.01, torch.randn(out, num_in // group_size) * 0.01,
                            group_size)
        return Linear.from_int4(weight, None, inner_k_tiles)
    if fmt == "int8":
        q = torch.randint(-127, 128, (out, num_in), dtype=torch.int8)
        return Linear("int8", num_in, out, q, torch.rand(out, dtype=torch.bfloat16) * 0.01)
    return Linear.from_float(torch.randn(out, num_in) * 0.02, None, fmt)


def act_dtype(fmt: str) -> torch.dtype:
    return torch.float32 if fmt == "fp32" else torch.bfloat16


def time_pass(layers: list[Linear], rows: int, dtype: torch.dtype) -> list[float]:
    """Milliseconds of each layer's call in one pass over `layers`, each on its own [rows, in] input."""
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {layer.in_features for layer in layers}}
    times = []
    with torch.inference_mode():
        for layer in layers:
            start = time.perf_counter()
            layer(inputs[layer.in_features])
            times.append((time.perf_counter() - start) * 1e3)
    return times


def bench(variants: dict[str, tuple[list[Linear], torch.dtype]], rows: tuple[int, ...], rounds: int) -> dict[str, dict[int, float]]:
    """{variant: {rows: ms per pass}}: the sum over layers of each call's fastest time across rounds.

    Per call, because a whole pass of ~100 calls is rarely untouched by other processes on a shared
    machine while single calls often are; each call still finds its weights out of cache, since
    every other layer ran in between, as in a real step.
    """
    best: dict[str, dict[int, list[float]]] = {v: {m: [] for m in rows} for v in variants}
    for (layers, dtype) in variants.values():  # warm-up: first calls allocate and pick kernels
        time_pass(layers, rows[0], dtype)
    for _ in range(rounds):
        for m in rows:
            for name, (layers, dtype) in variants.items():
                times = time_pass(layers, m, dtype)
                seen = best[name][m]
                best[name][m] = [min(a, b) for a, b in zip(seen, times)] if seen else times
    return {v: {m: sum(t) for m, t in by_m.items()} for v, by_m in best.items()}


def stack(shape: ModelShape, fmt: str, **int4_options: int) -> list[Linear]:
    return [random_linear(out, num_in, fmt, **int4_options) for _ in range(shape.num_layers) for _, out, num_in in shape.linears()]


def bench_model(shape: ModelShape, rows: tuple[int, ...], rounds: int) -> dict[str, Any]:
    layers = bench({f: (stack(shape, f), act_dtype(f)) for f in FORMATS}, rows, rounds)
    heads = bench({f: ([random_linear(shape.vocab, shape.hidden, f)], act_dtype(f)) for f in HEAD_FORMATS}, rows, rounds)
    step = {f"{f}+{h} head": {m: layers[f][m] + heads[h][m] for m in rows} for f, h in STEPS}
    # inner_k_tiles is not swept: on CPU it changes no packed byte (`inner_k_tiles_changes_cpu_packing`)
    # and the matmul does not take it, so every value runs the identical computation.
    variants = {f"group{g}": (stack(shape, "int4", group_size=g), torch.bfloat16) for g in (32, 64)}
    variant_rows = tuple(m for m in (1, 4, 16, 64) if m in rows) or rows[:1]
    int4_variants = bench(variants, variant_rows, rounds)
    return {"shape": asdict(shape), "layers_ms": layers, "lm_head_ms": heads, "step_ms": step,
            "int4_variants_layers_ms": int4_variants,
            "int4_over_bf16_speedup": {m: layers["bf16"][m] / layers["int4"][m] for m in rows}}


def inner_k_tiles_matter() -> bool:
    """Whether the CPU packer's inner_k_tiles changes the packed bytes at all."""
    q = torch.randint(0, 16, (64, 256), dtype=torch.int32)
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, k) for k in (2, 4, 8)]
    return not all(torch.equal(packed[0], p) for p in packed[1:])


def print_table(name: str, result: dict[str, Any], rows: tuple[int, ...]) -> None:
    print(f"\n{name}: ms per decode step (all layers' linears | LM head), fastest of the rounds")
    print(f"{'M':>4} " + " ".join(f"{f + ' lin':>10}" for f in FORMATS) + " " + " ".join(f"{f + ' head':>10}" for f in HEAD_FORMATS)
          + f" {'int4/bf16':>9}")
    for m in rows:
        lin = " ".join(f"{result['layers_ms'][f][m]:10.2f}" for f in FORMATS)
        head = " ".join(f"{result['lm_head_ms'][f][m]:10.2f}" for f in HEAD_FORMATS)
        print(f"{m:>4} {lin} {head} {result['int4_over_bf16_speedup'][m]:8.2f}x")
    print("int4 variants (layers ms): " + "; ".join(
        f"{v} " + "/".join(f"{ms:.2f}" for ms in by_m.values()) for v, by_m in result["int4_variants_layers_ms"].items())
        + f" at M={'/'.join(str(m) for m in next(iter(result['int4_variants_layers_ms'].values())))}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, (name, result) in zip(axes, results.items()):
        for label, by_m in result["step_ms"].items():
            ax.plot([int(m) for m in by_m], list(by_m.values()), marker="o", label=label)
        ax.set(title=f"{name}: linears + LM head per decode step", xlabel="rows M", ylabel="ms", xscale="log", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="M in 1, 16 and 64 only, 2 rounds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = (1, 16, 64) if args.quick else ROWS
    rounds = 2 if args.quick else args.rounds
    results = {}
    for name, shape in MODELS.items():
        results[name] = bench_model(shape, rows, rounds)
        print_table(name, results[name], rows)
    out = {"machine": machine(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rounds": rounds, "rows": rows,
           "inner_k_tiles_changes_cpu_packing": inner_k_tiles_matter(), "models": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_linear.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(results, RESULTS / "bench_linear.png")
    summary = ", ".join(f"{n} int4/bf16 linears {r['int4_over_bf16_speedup'][rows[0]]:.2f}x at M={rows[0]}, "
                        f"{r['int4_over_bf16_speedup'][rows[-1]]:.2f}x at M={rows[-1]}" for n, r in results.items())
    print(f"\n{summary}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
