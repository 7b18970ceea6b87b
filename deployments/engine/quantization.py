"""Weight quantization applied after loading: `int8` = int8 weights, fp32 activations (torchao).

Measured on SmolLM2-135M here (perf/README.md): torchao's weight-only int8 keeps quality (greedy
agreement 96.5%, perplexity +1.8%) and stores Linear weights in a quarter of the bytes, but on this
2-core AVX2 CPU its matmul is slower than fp32 (135 vs 86 ms per decode step at batch 10).
fbgemm's dynamic int8 (int8 activations too) is fast (48 ms) but fails the quality gate (45%
agreement; SmoothQuant smoothing lifts it to 78%): SmolLM2's activation outliers break per-tensor
activation scales. So int8 is a memory option here, off by default.
"""

from __future__ import annotations

from typing import Any

QUANTIZATION_METHODS = ("int8",)


def quantize(model: Any, method: str | None, device: str) -> Any:
    """Return the model with its Linear weights quantized by `method` (None: unchanged)."""
    if method is None:
        return model
    if method != "int8":
        raise ValueError(f"quantization={method!r} is not one of {QUANTIZATION_METHODS}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ValueError("quantization='int8' needs torchao: pip install '.[int8]'") from exc
    quantize_(model, Int8WeightOnlyConfig())
    return model
