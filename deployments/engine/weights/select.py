"""Which weight format a model is served in: as configured, or (`auto`) what measures fastest here.

`auto` on CPU, for a source that stores 4-bit weights where our int4 kernel runs, picks int4; otherwise
it times one fused MLP projection of the model's own shape in int4, bf16 and fp32, at
one row (a single stream) and at `max_num_seqs` rows (a full batch), and picks the lowest time per
token summed over the two (a plain sum let the full batch decide alone: SmolLM2 then ran bf16 at
31 ms per single-stream step against int4's 17).
The int4 kernel (`_weight_int4pack_mm_for_cpu`) is vectorised for AVX2/AVX-512 with bf16
activations; bf16 matmuls use oneDNN (AMX where present). CUDA serves bf16.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from deployments.engine import kernels
from deployments.engine.config import WEIGHT_FORMATS as FORMATS, serving_dtype


def choose_weights(
    requested: str, device: str, native: bool, config: Any, max_num_seqs: int, stored_4bit: bool = True
) -> tuple[str, str]:
    """(format, why). Non-native models (the generic adapter) run fp32 or bf16 only. `auto` only
    considers int4 when the source stores 4-bit weights (served exactly as stored: no quality loss);
    a plain checkpoint would be re-quantized, so `auto` picks between bf16 and fp32 for it."""
    capability = torch.backends.cpu.get_cpu_capability() if device == "cpu" else device
    if not native:
        if requested == "int4":
            return "bf16", "int4 needs our native model code; this architecture runs through transformers in bf16"
        if requested == "auto":
            return ("bf16", "CUDA") if device != "cpu" else ("fp32", "generic transformers adapter on CPU: fp32")
        return requested, "configured"
    if requested != "auto":
        return requested, "configured"
    if device != "cpu":
        return "bf16", f"auto on {device}: bf16"
    if stored_4bit and (module := kernels.cpu_kernels()) is not None:
        # Our int4 kernel is the fastest format per token at 1 and 16 rows on every host measured
        # (perf/README.md), and a timing taken while other replicas load can say otherwise: a `make
        # serve` start once measured int4 at 1.38 ms against fp32's 0.25 for Gemma 3 and served it fp32.
        return "int4", f"auto on {capability}: the source's 4-bit blocks through our int4 kernel ({module.isa})"
    times = _measure(config, max_num_seqs, FORMATS if stored_4bit else ("bf16", "fp32"))
    best = min(times, key=lambda f: times[f])
    detail = ", ".join(f"{f} {times[f] * 1e3:.3f} ms" for f in FORMATS if f in times)
    return best, f"auto on {capability}: MLP projection time per token at batch 1 + per token at batch {max_num_seqs}: {detail}"


def _measure(config: Any, max_num_seqs: int, formats: tuple[str, ...], repeats: int = 15) -> dict[str, float]:
    from deployments.engine.layers.linear import Linear

    text = config.get_text_config(decoder=True)
    hidden, inter = int(text.hidden_size), int(text.intermediate_size)
    weight = torch.randn(2 * inter, hidden) * 0.02
    times: dict[str, float] = {}
    for fmt in formats:
        if fmt == "int4" and (hidden % 32 or torch.backends.cpu.get_cpu_capability() in ("NO AVX", "DEFAULT")):
            continue
        layer = Linear.from_float(weight, None, fmt)
        dtype = getattr(torch, serving_dtype(fmt))
        total = 0.0
        for rows in (1, max_num_seqs):
            x = torch.randn(rows, hidden, dtype=dtype)
            with torch.inference_mode():
                layer(x)
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    layer(x)
                    samples.append(time.perf_counter() - start)
            total += min(samples) / rows  # per token; the least disturbed run, so a burst elsewhere cannot decide
        times[fmt] = total
    return times
