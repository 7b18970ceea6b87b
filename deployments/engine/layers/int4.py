"""Group-wise 4-bit weights and their kernels: packing, unpacking, matmul.

On x86 CPUs, group size 32, our kernel (`deployments/engine/kernels/matmul.cpp`: activations as int8 codes (two in a row's outlier groups),
VNNI dot products, fp16 scales and mins, the GGUF Q4_1 layout) where it builds; otherwise torch's
int4 ("tinygemm") kernels, described below. `pack` picks, and `matmul`/`unpack_q` read either layout.

Convention (the kernels'; checked against a dequantized reference in tests/integration/test_weights.py):
`w = (q - 8) * scale + zero` for each group of `group_size` consecutive input columns, q in 0..15.
The kernels want scales and zeros interleaved as `[in // group, out, 2]` in the activation dtype.

CPU: `_convert_weight_to_int4pack_for_cpu` takes q as int32 `[out, in]`; its `inner_k_tiles`
argument changes nothing (the packed bytes are identical for 1..16), `out` must be a multiple of 16
(we pad), `group_size` one of 32/64/128/256. Only bf16 activations hit the vectorised kernel (fp32
and fp16 are 15-100x slower). CUDA: `_convert_weight_to_int4pack` takes two nibbles per byte
(`[out, in // 2]` uint8, even column in the high nibble) and needs `in % (inner_k_tiles * 16) == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deployments.engine import kernels

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
ROW_MULTIPLE = 16  # the CPU packer's constraint on `out`; also satisfies CUDA's multiple of 8
OUR_GROUP = 32  # the only group size our CPU kernel takes (GGUF's 4-bit blocks)
_QUANTIZE_CHUNK_ELEMENTS = 1 << 22  # rows are quantized in chunks of about this many weights
_UNPACK_CHUNK = 1024  # identity rows per kernel call when unpacking


@dataclass
class Int4Weight:
    """A 4-bit weight: `q` uint8 `[out, in]` (0..15); `scales`, `zeros` fp32 `[out, in // group_size]`.

    Dequantizes as `(q - 8) * scale + zero` per group of `group_size` input columns.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The fp32 `[out, in]` weight these codes stand for."""
        out, num_in = self.q.shape
        grouped = self.q.reshape(out, num_in // self.group_size, self.group_size).float() - 8.0
        return (grouped * self.scales.unsqueeze(-1) + self.zeros.unsqueeze(-1)).reshape(out, num_in)

    def permute_rows(self, index: torch.Tensor) -> Int4Weight:
        """A copy with output rows reordered: row i of the result is row `index[i]` of this one."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.q.device)
        rows = [t.index_select(0, index) for t in (self.q, self.scales, self.zeros)]  # 10x faster than t[index]
        return Int4Weight(rows[0], rows[1], rows[2], self.group_size)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """Stack weights of the same input along the output dim (fused q/k/v, gate/up)."""
        if not parts:
            raise ValueError("Int4Weight.cat needs at least one part")
        group_size, in_features = parts[0].group_size, parts[0].in_features
        for part in parts:
            if part.group_size != group_size or part.in_features != in_features:
                raise ValueError(
                    f"cannot fuse int4 parts with (group_size, in_features) {(part.group_size, part.in_features)} "
                    f"and {(group_size, in_features)}"
                )
        return Int4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scales for p in parts]),
            torch.cat([p.zeros for p in parts]),
            group_size,
        )

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 32, num_steps: int = 10) -> Int4Weight:
        """Group-wise asymmetric 4-bit quantization of `w` `[out, in]`, minimising squared error.

        Tries `num_steps + 1` grids from 14 to 16 steps over the group's range (llama.cpp's
        make_qkx2 search), each with its least-squares scale and zero, and keeps the best per
        group. The 15-step grid (any even `num_steps`) is plain min/max's, refitted, so no group is
        worse than min/max (whose error is at most half a step); a constant group is exact.
        """
        out, num_in = w.shape
        if group_size <= 0 or num_in % group_size:
            raise ValueError(f"in_features={num_in} is not a multiple of group_size={group_size}")
        rows = max(1, _QUANTIZE_CHUNK_ELEMENTS // num_in)
        chunks = [_quantize_groups(w[i : i + rows].float(), group_size, num_steps) for i in range(0, out, rows)]
        q, scales, zeros = (torch.cat(parts) for parts in zip(*chunks))
        return cls(q.reshape(out, num_in), scales.reshape(out, -1), zeros.reshape(out, -1), group_size)


def _quantize_groups(w: torch.Tensor, group_size: int, num_steps: int) -> tuple[torch.Tensor, ...]:
    """(q uint8 [rows, groups, G], scale, zero [rows, groups]) for the best grid per group.

    Each candidate grid fixes q; the best (scale, minimum) for that q is a least-squares line, whose
    squared error is var(g) - cov(q, g)^2 / var(q), so candidates are compared without rebuilding
    the weights. The candidate `(140 + 10) / 10 / span` is plain min/max's grid.
    """
    g = w.reshape(w.shape[0], -1, group_size)
    low = g.amin(-1, keepdim=True)
    span = (g.amax(-1, keepdim=True) - low).clamp_min(1e-30)  # constant group: q = 0 (0 * inf would be NaN)
    centred = g - g.mean(-1, keepdim=True)
    g_var = centred.square().sum(-1, keepdim=True)
    best_err = torch.full_like(span, float("inf"))
    best_iscale = 15 / span
    for step in range(num_steps + 1):
        iscale = (140 + 20 * step / max(num_steps, 1)) / 10 / span  # llama.cpp's make_qkx2 range: 14..16 steps
        q = ((g - low) * iscale).round_().clamp_(0, 15)
        q -= q.mean(-1, keepdim=True)
        q_var = q.square().sum(-1, keepdim=True)
        cov = (q * centred).sum(-1, keepdim=True)
        err = g_var - cov.square() / q_var.clamp_min(1e-30)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_iscale = torch.where(better, iscale, best_iscale)
    q = ((g - low) * best_iscale).round_().clamp_(0, 15)
    scale, minimum = _least_squares(q, g)
    zero = minimum + 8 * scale  # q * s + m  ==  (q - 8) * s + (m + 8 s)
    return q.to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1)


def _least_squares(q: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (scale, minimum) minimising |q * scale + minimum - g|^2. Where q is constant (a
    constant group) the scale is 0, so the zero point holds the value alone (no bf16 loss)."""
    q_mean, g_mean = q.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    dq = q - q_mean
    var = dq.square().sum(-1, keepdim=True)
    cov = (dq * (g - g_mean)).sum(-1, keepdim=True)
    scale = torch.where(var > 0, cov / var.clamp_min(1e-30), torch.zeros_like(var))
    return scale, g_mean - scale * q_mean


def check_kernel_shape(weight: Int4Weight) -> None:
    """Raise ValueError when the int4 kernels cannot run this weight's group size."""
    if weight.group_size not in KERNEL_GROUP_SIZES:
        raise ValueError(f"int4 kernels need group_size in {KERNEL_GROUP_SIZES}, got {weight.group_size}")


def pack(weight: Int4Weight, device: torch.device, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed q, scales) for the kernel on `device`; rows are padded to a multiple of 16 with zero
    weights (the caller slices the padding off).

    Our CPU kernel: q `[out_padded / 16, in / 4, 32]` uint8, scales `[2, out_padded / 16, in / 32, 16]`
    fp16 (d, then m = zero - 8 d). torch's: its packed q, and scales_and_zeros bf16 `[in // group, out_padded, 2]`.
    """
    check_kernel_shape(weight)
    pad = -weight.out_features % ROW_MULTIPLE
    q, scales, zeros = weight.q, weight.scales, weight.zeros
    if pad:
        q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
        zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
    if device.type == "cpu" and weight.group_size == OUR_GROUP and kernels.cpu_kernels() is not None:
        return _pack_ours(q, scales.float(), zeros.float())
    scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(device, torch.bfloat16)
    q = q.to(device)
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles), scales_and_zeros
    tiles = next(t for t in (inner_k_tiles, 8, 4, 2) if t in (2, 4, 8) and q.shape[1] % (t * 16) == 0)
    nibbles = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(nibbles, tiles), scales_and_zeros


def _pack_ours(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte 4i+j of entry (row block b, column quad c) = q[16b+i][4c+j] | q[16b+8+i][4c+j] << 4 (matmul.cpp)."""
    out, num_in = q.shape
    blocks = q.to(torch.uint8).view(out // 16, 2, 8, num_in // 4, 4)
    packed = (blocks[:, 0] | (blocks[:, 1] << 4)).permute(0, 2, 1, 3).reshape(out // 16, num_in // 4, 32).contiguous()
    mins = zeros - 8 * scales
    by_lane = [t.view(out // 16, 16, -1).transpose(1, 2) for t in (scales, mins)]
    return packed, torch.stack(by_lane).to(torch.float16).contiguous()


_ours: Any = None


def _our_kernel() -> Any:
    global _ours
    _ours = kernels.load("native")
    if _ours is None:
        raise RuntimeError("a weight packed for our int4 kernel, but the kernel is not built")
    return _ours


def is_ours(packed: torch.Tensor) -> bool:
    return packed.dim() == 3 and packed.dtype == torch.uint8


def out_padded(packed: torch.Tensor, scales: torch.Tensor) -> int:
    """The padded output size of a packed weight (either layout)."""
    return int(packed.shape[0] * 16) if is_ours(packed) else int(scales.shape[1])


def matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x `[m, in]` (contiguous, bf16) @ w.T -> `[m, out_padded]` (fp32 from our kernel, bf16 from torch's)."""
    if packed.dim() == 3:  # ours (is_ours, inlined: this runs ~120 times per step)
        return (_ours or _our_kernel()).q4_linear(x, packed, scales_and_zeros)  # type: ignore[no-any-return]
    if packed.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)


def unpack_q(packed: torch.Tensor, group_size: int, in_features: int, out_padded: int) -> torch.Tensor:
    """The uint8 codes `[out_padded, in]` of a packed weight, whatever the device's layout.

    torch's layouts: multiplies the identity by the weight with scale 1 and zero 8, so
    `(q - 8) * 1 + 8 = q` comes out exactly (small integers, one non-zero term per sum).
    """
    if is_ours(packed):
        nibbles = torch.stack([packed & 15, packed >> 4], 1).view(packed.shape[0], 2, in_features // 4, 8, 4)
        return nibbles.permute(0, 1, 3, 2, 4).reshape(out_padded, in_features).contiguous()
    ones = torch.ones(in_features // group_size, out_padded, 1, dtype=torch.bfloat16, device=packed.device)
    unit = torch.cat([ones, ones * 8], -1)
    q = torch.empty(out_padded, in_features, dtype=torch.uint8, device=packed.device)
    for start in range(0, in_features, _UNPACK_CHUNK):
        stop = min(start + _UNPACK_CHUNK, in_features)
        eye = torch.zeros(stop - start, in_features, dtype=torch.bfloat16, device=packed.device)
        eye[:, start:stop] = torch.eye(stop - start, dtype=torch.bfloat16, device=packed.device)
        q[:, start:stop] = matmul(eye, packed, group_size, unit).t().to(torch.uint8)
    return q


def unpack_scales(packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) fp32 `[out_features, in // group]` as the kernel holds them (rounded to its dtype)."""
    if is_ours(packed):
        d, m = (t.float().transpose(1, 2).reshape(-1, t.shape[1]) for t in scales)
        return d[:out_features].contiguous(), (m + 8 * d)[:out_features].contiguous()
    s, z = scales[:, :out_features].float().unbind(-1)
    return s.t().contiguous(), z.t().contiguous()
