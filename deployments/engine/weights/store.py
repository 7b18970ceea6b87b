"""Builds a model's layers from its checkpoint, by transformers parameter name, in one weight format.

Tensors are read one at a time from safetensors (the plain checkpoint, or the GGUF conversion
cache) and turned into their serving format at once, so a load never holds the whole fp32 model.
For `int4`, 4-bit GGUF tensors (Q4_0/Q4_1/Q4_K) are taken from the GGUF blocks exactly; other GGUF
tensors are served in bf16, and a plain checkpoint's are quantized group-wise. In the int4 and bf16
formats the embedding table and LM head are one 8-bit table with exact rescoring (layers/vocab.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from deployments.engine.config import WEIGHT_FORMATS
from deployments.engine.layers import int8
from deployments.engine.layers.linear import Embedding, Int4Weight, Linear
from deployments.engine.layers.norm import RMSNorm
from deployments.engine.layers.vocab import VocabHead, VocabTable

INT4_GROUP_SIZE = 32
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
        # The residual stream, norms, rotary and attention stay fp32 in every format: bf16/int4/int8
        # matmuls cast their input to bf16 (their kernels' dtype) and hand back fp32. A bf16
        # residual stream cost SmolLM2 5 points of greedy agreement with fp32 (perf/README.md).
        self.act_dtype = torch.float32
        # From a GGUF, only its 4-bit tensors are served in int4 (exactly as stored); its 5/6/8-bit
        # tensors are served in bf16 rather than re-quantized to 4 bits (Gemma 3: perplexity +13.7%).
        # A plain checkpoint asked for int4 is quantized group-wise.
        self.requantize = int4 is None
        self.num_exact_int4 = 0  # linears taken from 4-bit GGUF blocks as they are
        self.num_requantized = 0  # linears quantized group-wise here
        self._embedding: torch.nn.Module | None = None

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
            # In the int4 format, GGUF's 5/6/8-bit tensors (and a fused layer with any of them) go to
            # group-wise int8 where our kernel runs (layers/int8.py), else bf16.
            weight, fmt = torch.cat([self.get(n) for n in names]), self.fmt
            if fmt == "int4":
                fmt = "int8g" if int8.available(self.device) and weight.shape[1] % int8.GROUP == 0 else "bf16"
            layer = Linear.from_float(weight, bias, fmt)
        return layer.to(self.device)

    def norm(self, name: str, eps: float, offset: float = 0.0) -> RMSNorm:
        return RMSNorm(self.get(f"{name}.weight"), eps, offset, self.act_dtype).to(self.device)

    def head_norm(self, names: list[str], num_heads: list[int], eps: float, offset: float = 0.0) -> RMSNorm:
        """One RMSNorm over [sum(num_heads), head_dim] whose weight rows are each name's per-head
        weight repeated for its heads (e.g. Gemma's q_norm for the q heads, k_norm for the k heads)."""
        rows = [self.get(f"{n}.weight").expand(count, -1) for n, count in zip(names, num_heads)]
        return RMSNorm(torch.cat(rows), eps, offset, self.act_dtype).to(self.device)

    def embedding(self, name: str) -> torch.nn.Module:
        weight = self.get(f"{name}.weight")
        if self.fmt == "fp32" or weight.shape[1] % 32:
            self._embedding = Embedding(weight, "fp32" if self.fmt == "fp32" else "bf16", self.act_dtype).to(self.device)
        else:
            self._embedding = VocabTable(weight).to(self.device)
        return self._embedding

    def lm_head(self, name: str, embedding_name: str, tied: bool) -> torch.nn.Module:
        """The output projection; a tied head shares the embedding's table (no second copy)."""
        if tied or f"{name}.weight" not in self.tensors:
            if self._embedding is None:
                self.embedding(embedding_name)
            table = self._embedding
            if isinstance(table, VocabTable):
                return VocabHead(table)
            assert isinstance(table, Embedding)
            return table.as_linear()
        weight = self.get(f"{name}.weight")
        if self.fmt == "fp32" or weight.shape[1] % 32:
            return Linear.from_float(weight, None, "fp32" if self.fmt == "fp32" else "bf16").to(self.device)
        return VocabHead(VocabTable(weight).to(self.device), owned=True)

    def _bias_or_zeros(self, prefix: str) -> torch.Tensor:
        name = f"{prefix}.bias"
        if name in self.tensors:
            return self.get(name)
        return torch.zeros(self.tensors[f"{prefix}.weight"].shape[0])

    def _can_int4(self, name: str) -> bool:
        if name in self.int4:
            return True
        return self.requantize and self.tensors[name].shape[1] % INT4_GROUP_SIZE == 0

    def _int4_part(self, name: str) -> Int4Weight:
        if name in self.int4:
            self.num_exact_int4 += 1
            return self.int4.pop(name)
        self.num_requantized += 1
        return Int4Weight.quantize(self.get(name), INT4_GROUP_SIZE)
