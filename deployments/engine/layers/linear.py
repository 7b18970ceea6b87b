"""Linear layers in five weight formats (fp32, bf16, int4, int8, int8g) and the token embedding.

Fusing: callers concatenate before construction, `torch.cat` for float weights or
`Int4Weight.cat` for 4-bit parts (q/k/v, gate/up), and split the output themselves.

Each format computes in one dtype (fp32 in fp32, the others in bf16; the int kernels are vectorised
only for bf16 activations on CPU) and `forward` casts its input to it and the result back, so a
layer of any format drops into a model of either activation dtype. `.to(dtype)` never changes a
layer's format; `.to(device)` re-packs int4 weights for the new device's kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from deployments.engine import kernels
from deployments.engine.layers import int4, int8
from deployments.engine.layers.int4 import Int4Weight

__all__ = ["Embedding", "Int4Weight", "Linear", "TiedLinear", "WEIGHT_FORMATS", "quantize_int8"]

WEIGHT_FORMATS = ("fp32", "bf16", "int4", "int8", "int8g")
"""int8: per-row scale, torch's kernel; int8g: per-32-group scale, our CPU kernel (layers/int8.py)."""
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int4": torch.bfloat16, "int8": torch.bfloat16, "int8g": torch.float32}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 `[out, in]`, scale bf16 `[out]`), `w ~= q * scale`.

    The scale is rounded to bf16 (the kernel's dtype) before q is computed, so the codes are
    exact for the scale actually used.
    """
    w = w.float()
    scale = (w.abs().amax(-1) / 127).to(torch.bfloat16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w / scale.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x `[m, in]` bf16 @ (q * scale).T, by torch's weight-only int8 kernel on CPU."""
    if q.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, q, scale)
    return F.linear(x, q.to(x.dtype)) * scale  # CUDA: dequantize on the fly (transient copy)


def _keeping_dtype(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` (from `.to()`, `.cuda()`, `.float()`, ...) with its dtype change dropped: a layer's
    format fixes its tensors' dtypes, so `model.to(torch.bfloat16)` must not turn fp32 weights into
    bf16 ones (or int4 scales into fp32); only the device move applies."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        moved = fn(t)
        return moved if moved.dtype == t.dtype else t.to(moved.device)

    return apply


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _flat(x: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, in_features).to(dtype).contiguous()


class Linear(torch.nn.Module):
    """`y = x @ W.T + b` with W held in `fmt` (one of `WEIGHT_FORMATS`).

    Buffers: `weight` (fp32 / bf16 `[out, in]`, int8 `[out, in]`, or int4 kernel-packed) and
    `scales` (int8: bf16 `[out]`; int4: as `int4.pack` lays them out for the kernel; empty otherwise).
    Build with `from_float` or `from_int4`.
    """

    weight: torch.Tensor
    scales: torch.Tensor  # empty for fp32 / bf16
    bias: torch.Tensor | None

    def __init__(self, fmt: str, in_features: int, out_features: int, weight: torch.Tensor,
                 scales: torch.Tensor | None = None, bias: torch.Tensor | None = None, group_size: int = 0) -> None:
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {fmt!r} is not one of {WEIGHT_FORMATS}")
        self.fmt, self.in_features, self.out_features, self.group_size = fmt, in_features, out_features, group_size
        self.compute_dtype = COMPUTE_DTYPE[fmt]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", weight.new_empty(0, dtype=torch.bfloat16) if scales is None else scales)
        self.register_buffer("bias", None if bias is None else bias.to(weight.device, self.compute_dtype))
        self._set_direct()

    def _set_direct(self) -> None:
        """Whether `forward` can hand a 2-D fp32 input straight to our int4 kernel: no bias, no row
        padding to slice off (it runs ~120 times per decode step)."""
        ours = (self.fmt == "int4" and int4.is_ours(self.weight)) or self.fmt == "int8g"
        self.direct = ours and self.bias is None and self.out_features % int4.ROW_MULTIPLE == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, group_size: int = 32) -> Linear:
        """A layer from a float `[out, in]` weight; `int4` quantizes group-wise (`Int4Weight.quantize`)."""
        out_features, in_features = weight.shape
        if fmt == "int4":
            return cls.from_int4(Int4Weight.quantize(weight, group_size), bias)
        if fmt == "int8":
            q, scale = quantize_int8(weight)
            return cls("int8", in_features, out_features, q, scale, bias)
        if fmt == "int8g":
            packed, scales = int8.pack(weight)
            return cls("int8g", in_features, out_features, packed, scales, bias)
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {fmt!r} is not one of {WEIGHT_FORMATS}")
        return cls(fmt, in_features, out_features, weight.to(COMPUTE_DTYPE[fmt]).contiguous(), None, bias)

    @classmethod
    def from_int4(cls, weight: Int4Weight, bias: torch.Tensor | None, inner_k_tiles: int = 8) -> Linear:
        """An int4 layer packed from `weight` (kept on its device). Scales and zeros become bf16."""
        packed, scales_and_zeros = int4.pack(weight, weight.q.device, inner_k_tiles)
        return cls("int4", weight.in_features, weight.out_features, packed, scales_and_zeros, bias, weight.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direct and x.dim() == 2 and x.dtype == torch.float32:
            if self.fmt == "int8g":
                return kernels.load("native").q8_linear(x, self.weight, self.scales)  # type: ignore[union-attr,no-any-return]
            return int4.matmul(x, self.weight, self.group_size, self.scales)
        if self.fmt == "int4" and int4.is_ours(self.weight):  # our CPU kernel codes fp32 or bf16 input as it is
            flat = x.reshape(-1, self.in_features)
        else:
            flat = _flat(x, self.in_features, self.compute_dtype)
        if self.fmt == "int4":
            out = int4.matmul(flat, self.weight, self.group_size, self.scales)
            if out.shape[1] != self.out_features:
                out = out[:, : self.out_features]
            if self.bias is not None:
                out = out + self.bias
        elif self.fmt == "int8":
            out = _int8_matmul(flat, self.weight, self.scales)
            if self.bias is not None:
                out = out + self.bias
        elif self.fmt == "int8g":
            out = kernels.load("native").q8_linear(flat, self.weight, self.scales)[:, : self.out_features]  # type: ignore[union-attr]
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(flat, self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        """Bytes held by this layer's weight, scales and bias."""
        return _nbytes(self.weight, self.scales, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The fp32 `[out, in]` weight this layer computes with (int4: scales and zeros rounded as held)."""
        if self.fmt == "int4":
            return self.int4_weight().dequantize()
        if self.fmt == "int8":
            return self.weight.float() * self.scales.float().unsqueeze(-1)
        if self.fmt == "int8g":
            return int8.dequantize(self.weight, self.scales, self.out_features)
        return self.weight.float()

    def int4_weight(self) -> Int4Weight:
        """This int4 layer's codes, scales and zeros (scales/zeros as the kernel holds them, in fp32)."""
        if self.fmt != "int4":
            raise ValueError(f"int4_weight() on a {self.fmt} layer")
        out_padded = int4.out_padded(self.weight, self.scales)
        q = int4.unpack_q(self.weight, self.group_size, self.in_features, out_padded)[: self.out_features]
        scales, zeros = int4.unpack_scales(self.weight, self.scales, self.out_features)
        return Int4Weight(q, scales, zeros, self.group_size)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        # int4 layouts differ per kernel: repack for a new device before the buffers move.
        target = fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device)).device
        if self.fmt == "int8g" and target != self.weight.device:
            raise NotImplementedError("int8g is our CPU kernel's layout: build the model on the target device instead")
        if self.fmt == "int4" and target != self.weight.device:
            self.weight, self.scales = int4.pack(self.int4_weight(), target)
        moved = super()._apply(_keeping_dtype(fn), recurse)
        self._set_direct()
        return moved

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}{group}"


class Embedding(torch.nn.Module):
    """Token-embedding table in fp32, bf16 or int8 (per-row bf16 scale); lookups in `act_dtype`.

    `as_linear()` gives the tied LM head over the same table, with no second copy.
    """

    FORMATS = ("fp32", "bf16", "int8")
    weight: torch.Tensor
    scales: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, fmt: str, act_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if fmt not in self.FORMATS:
            raise ValueError(f"embedding format {fmt!r} is not one of {self.FORMATS}")
        self.fmt, self.act_dtype = fmt, act_dtype
        self.num_embeddings, self.embedding_dim = (int(n) for n in weight.shape)
        scales = None
        if fmt == "int8":
            weight, scales = quantize_int8(weight)
        else:
            weight = weight.to(COMPUTE_DTYPE[fmt]).contiguous()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """`[*ids.shape, hidden]` rows of the table in `act_dtype`."""
        rows = F.embedding(ids, self.weight)
        if self.scales is None:
            return rows.to(self.act_dtype)
        return (rows.float() * self.scales[ids].float().unsqueeze(-1)).to(self.act_dtype)

    def dequantize(self) -> torch.Tensor:
        """The fp32 `[num_embeddings, embedding_dim]` table."""
        if self.scales is None:
            return self.weight.float()
        return self.weight.float() * self.scales.float().unsqueeze(-1)

    def as_linear(self) -> TiedLinear:
        """The LM head `hidden -> vocab` sharing this table."""
        return TiedLinear(self)

    def nbytes(self) -> int:
        """Bytes held by the table and its scales."""
        return _nbytes(self.weight, self.scales)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        return super()._apply(_keeping_dtype(fn), recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


class TiedLinear(torch.nn.Module):
    """An LM head that reads an `Embedding`'s table (int8 rows + scales are exactly what the
    int8 kernel takes). It registers no tensors of its own, so moving the model moves the table
    once; it is not a submodule of the embedding's either, so state dicts hold the table once."""

    def __init__(self, embedding: Embedding) -> None:
        super().__init__()
        self._table = [embedding]  # a list: not registered as a submodule
        self.fmt = embedding.fmt
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def embedding(self) -> Embedding:
        return self._table[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.embedding
        flat = _flat(x, self.in_features, COMPUTE_DTYPE[self.fmt])
        if table.scales is not None:
            out = _int8_matmul(flat, table.weight, table.scales)
        else:
            out = F.linear(flat, table.weight)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        """0: the table is counted by its `Embedding`."""
        return 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, tied"
