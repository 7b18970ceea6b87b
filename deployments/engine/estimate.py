"""What loading a model will hold, estimated from its files' headers alone (no weight is read).

Used before a load to decide whether it fits the device's memory budget. After a load the measured
footprint replaces the weights + overhead part; the KV-cache reservation stays, since the cache
grows with traffic after the measurement was taken.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deployments.engine.config import DTYPE_BYTES, EngineConfig, serving_dtype
from deployments.engine.loader import ModelSource, resolve_model_path

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "int4": 0.625, "auto": 0.625}
"""Bytes per weight as served: int4 is 4 bits + a bf16 scale and zero per 32 (embeddings int8: ~1)."""
MIN_OVERHEAD_BYTES = 64 << 20  # tokenizer, activations, allocator slack; measured 150 MiB for SmolLM2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a load is expected to hold: weights, the worst-case KV cache, and runtime overhead."""

    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def to_dict(self) -> dict[str, int]:
        return asdict(self) | {"total_bytes": self.total_bytes}


def estimate_memory(config: EngineConfig, source: ModelSource | None = None) -> MemoryEstimate:
    """Estimate from the checkpoint's tensor headers and shape: weights at the serving format
    (`auto` is counted as int4, what it picks on CPU hosts with AVX2 or better), plus the KV pool."""
    directory, gguf_file = source or resolve_model_path(config.model)
    if gguf_file is not None:
        num_weights, shape = _gguf_counts(directory / gguf_file)
        stored_bytes = None
    else:
        num_weights, stored_bytes, shape = _checkpoint_counts(directory)
    if stored_bytes is not None:  # already-quantized checkpoint (e.g. GPTQ): it stays as stored
        weights = stored_bytes
    else:
        weights = int(num_weights * WEIGHT_BYTES[config.weights])
    layers, kv_heads, head_dim = shape
    kv_dtype_bytes = DTYPE_BYTES[serving_dtype(config.weights)]
    kv_cache = config.kv_cache_size(2 * layers * kv_heads * head_dim * kv_dtype_bytes)
    return MemoryEstimate(weights, kv_cache, max(MIN_OVERHEAD_BYTES, weights // 4))


def _gguf_counts(path: Path) -> tuple[int, tuple[int, int, int]]:
    import gguf  # only GGUF sources need it

    reader = gguf.GGUFReader(str(path))
    num_weights = sum(int(t.n_elements) for t in reader.tensors)

    def field(key: str, default: int | None = None) -> int:
        value = reader.fields.get(key)
        if value is None:
            if default is None:
                raise ValueError(f"{path.name}: GGUF metadata lacks {key!r}")
            return default
        return int(value.parts[value.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv", heads)
    head_dim = field(f"{arch}.attention.key_length", field(f"{arch}.embedding_length") // heads)
    return num_weights, (field(f"{arch}.block_count"), kv_heads, head_dim)


def _checkpoint_counts(directory: Path) -> tuple[int, int | None, tuple[int, int, int]]:
    """(weights, bytes on disk if the checkpoint is quantized, (layers, kv heads, head dim))."""
    config: dict[str, Any] = json.loads((directory / "config.json").read_text())
    text = config.get("text_config") or config
    files = sorted(directory.glob("*.safetensors"))
    num_weights = sum(_safetensors_elements(f) for f in files)
    stored = sum(f.stat().st_size for f in files) if "quantization_config" in config else None
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    return num_weights, stored, (int(text["num_hidden_layers"]), kv_heads, head_dim)


def _safetensors_elements(path: Path) -> int:
    """Elements of every tensor, read from the file's JSON header (8-byte length, then JSON)."""
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(header_len))
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        total += count
    return total
