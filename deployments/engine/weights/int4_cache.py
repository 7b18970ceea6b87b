"""The 4-bit GGUF tensors, decoded once and kept beside the conversion cache.

Decoding reads and unpacks every 4-bit block (about 1 s for SmolLM2); the decoded codes, scales
and zeros are written to `int4-g32.safetensors` in the model's conversion-cache folder, so a reload
reads them directly (0.2 s).
The GGUF's file type is kept there too (`gguf_meta.json`) for `/models`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from deployments.engine.layers.int4 import Int4Weight

CACHE_FILE = "int4-g32.safetensors"
META_FILE = "gguf_meta.json"


def cached_int4_weights(gguf_path: Path, cache_dir: Path, config: Any) -> dict[str, Int4Weight]:
    """{transformers name: Int4Weight} of every Q4_0/Q4_1/Q4_K tensor, from the cache if there."""
    path = cache_dir / CACHE_FILE
    if path.is_file():
        return _read(path)
    from deployments.engine.weights.gguf import read_int4_weights

    weights = read_int4_weights(gguf_path, config)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        tensors |= {f"{name}.q": w.q.contiguous(), f"{name}.scales": w.scales.contiguous(), f"{name}.zeros": w.zeros.contiguous()}
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file(tensors, str(staging), metadata={"group_size": "32"})
    staging.replace(path)
    return weights


def _read(path: Path) -> dict[str, Int4Weight]:
    tensors = safetensors.torch.load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {n: Int4Weight(tensors[f"{n}.q"], tensors[f"{n}.scales"], tensors[f"{n}.zeros"], 32) for n in names}


def gguf_file_type(gguf_path: Path, cache_dir: Path | None) -> str:
    """`GGUF MOSTLY_Q4_1` etc., read once per file and kept in the cache folder."""
    meta = cache_dir / META_FILE if cache_dir is not None else None
    if meta is not None and meta.is_file():
        return str(json.loads(meta.read_text())["source_format"])
    from deployments.engine.weights.gguf import gguf_file_type as read_file_type

    described = read_file_type(gguf_path)
    if meta is not None:
        meta.write_text(json.dumps({"source_format": described}))
    return described
