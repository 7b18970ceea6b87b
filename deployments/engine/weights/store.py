"""Builds a model's layers from its checkpoint, by transformers parameter name, in one weight format.

Tensors are read one at a time from safetensors (the plain checkpoint, or the GGUF conversion
cache) and turned into their serving format at once, so a load never holds the whole fp32 model.
For `int4`, 4-bit GGUF tensors (Q4_0/Q4_1/Q4_K) are taken from the GGUF blocks exactly; any other
weight is quantized group-wise. Embeddings and the LM head are int8 (per row) in the int4 format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from deployments.engine.layers.linear import Embedding, Int4Weight, Linear
from deployments.engine.layers.norm import RMSNorm

WEIGHT_FORMATS = ("int4", "bf16", "fp32")
INT4_GROUP_SIZE = 32
HEAD_FORMAT = {"int4": "int8", "bf16": "bf16", "fp32": "fp32"}
TIED_ALIASES = {"model.embed_tokens.weight": "lm_head.weight", "lm_head.weight": "model.embed_tokens.weight"}


class SafetensorsReader(Mapping[str, torch.Tensor]):
    """Lazy, read-once access to every tensor of a checkpoint directory's safetensors files."""

    def __init__(self, directory: Path) -> None:
        self._files: dict[str, Path] = {}
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            for name, file_name in json.loads(index.read_text())["weight_map"].items():
                self._files[name] = directory / file_name
        else:
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(str(path), "pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), path))
        if not self._files:
            raise FileNotFoundError(f"no safetensors weights in {directory} (pickle checkpoints are not loaded)")

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._files[name]), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class WeightStore:
    """Turns checkpoint tensors into layers of one format: fp32, bf16 or int4 (+ int8 head)."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], fmt: str, device: torch.device, int4: Mapping[str, Int4Weight] | None = None
    ) -> None:
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weights={fmt!r} is not one of {WEIGHT_FORMATS}")
        self.tensors, self.fmt, self.device = tensors, fmt, device
        self.int4 = dict(int4 or {})
        self.act_dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        self.num_exact_int4 = 0  # linears taken from 4-bit GGUF blocks as they are
        self.num_requantized = 0  # linears quantized group-wise here
        self._embedding: Embedding | None = None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors and name in TIED_ALIASES:  # safetensors keeps one of two tied tensors
            name = TIED_ALIASES[name]
        return self.tensors[name].float()

    def linear(self, prefixes: list[str]) -> Linear:
        """One Linear for several projections of the same input, fused along the output dim."""
        biases = [f"{p}.bias" for p in prefixes if f"{p}.bias" in self.tensors]
        bias = None
        if biases:
            bias = torch.cat([self._bias_or_zeros(p) for p in prefixes])
        names = [f"{p}.weight" for p in prefixes]
        if self.fmt == "int4" and all(self._can_int4(n) for n in names):
            parts = [self._int4_part(n) for n in names]
            layer = Linear.from_int4(Int4Weight.cat(parts), bias)
        else:
            fmt = "bf16" if self.fmt == "int4" else self.fmt
            layer = Linear.from_float(torch.cat([self.get(n) for n in names]), bias, fmt)
        return layer.to(self.device)

    def norm(self, name: str, eps: float, offset: float = 0.0) -> RMSNorm:
        return RMSNorm(self.get(f"{name}.weight"), eps, offset, self.act_dtype).to(self.device)

    def head_norm(self, names: list[str], num_heads: list[int], eps: float, offset: float = 0.0) -> RMSNorm:
        """One RMSNorm over [sum(num_heads), head_dim] whose weight rows are each name's per-head
        weight repeated for its heads (e.g. Gemma's q_norm for the q heads, k_norm for the k heads)."""
        rows = [self.get(f"{n}.weight").expand(count, -1) for n, count in zip(names, num_heads)]
        return RMSNorm(torch.cat(rows), eps, offset, self.act_dtype).to(self.device)

    def embedding(self, name: str) -> Embedding:
        self._embedding = Embedding(self.get(f"{name}.weight"), HEAD_FORMAT[self.fmt], self.act_dtype).to(self.device)
        return self._embedding

    def lm_head(self, name: str, embedding_name: str, tied: bool) -> torch.nn.Module:
        """The output projection; a tied head shares the embedding's table (no second copy)."""
        if tied or f"{name}.weight" not in self.tensors:
            if self._embedding is None:
                self.embedding(embedding_name)
            assert self._embedding is not None
            return self._embedding.as_linear()
        return Linear.from_float(self.get(f"{name}.weight"), None, HEAD_FORMAT[self.fmt]).to(self.device)

    def _bias_or_zeros(self, prefix: str) -> torch.Tensor:
        name = f"{prefix}.bias"
        if name in self.tensors:
            return self.get(name)
        return torch.zeros(self.tensors[f"{prefix}.weight"].shape[0])

    def _can_int4(self, name: str) -> bool:
        in_features = self.int4[name].q.shape[1] if name in self.int4 else self.tensors[name].shape[1]
        return in_features % INT4_GROUP_SIZE == 0

    def _int4_part(self, name: str) -> Int4Weight:
        if name in self.int4:
            self.num_exact_int4 += 1
            return self.int4.pop(name)
        self.num_requantized += 1
        return Int4Weight.quantize(self.get(name), INT4_GROUP_SIZE)
