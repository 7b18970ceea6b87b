"""Group-wise int8 weights for our CPU kernel (`q8_linear` with per-group scales: AVX-512 VNNI, or AVX2).

What GGUF's 5-, 6- and 8-bit tensors become in the `int4` format where that kernel runs (Gemma 3's
Q4_K_M keeps q/k/v and gate/up in Q5_0/Q8_0, half of down in Q6_K): one int8 code per weight with an
fp32 absmax scale per row per group of 32 inputs, half the bytes of bf16, and the same two-int8-code
activations and VNNI dot products as the int4 kernel (bf16 matmuls without avx512_bf16 are emulated:
Gemma's bf16 projections took 45 ms per 10-stream step here, perf/README.md). Q8_0 and Q5_0 blocks are
integers times a per-32 scale already; their codes here carry a finer scale (absmax / 127), so they
are kept to within 1/254 of the group's largest weight.

Layout (the vocabulary table's too, layers/vocab.py): codes + 128 as uint8 `[N/16, K/4, 64]`, byte 4l + j of entry (b, c) =
u[16b + l][4c + j]; scales fp32 `[N/16, K/32, 16]`, lane l = output row 16b + l. N is padded to 16.
"""

from __future__ import annotations

import torch

GROUP = 32
ROWS = 16


def available(device: torch.device) -> bool:
    """Whether this layout's kernel runs here (CPU, our kernels built: AVX-512 VNNI or AVX2)."""
    from deployments.engine import kernels

    module = kernels.cpu_kernels() if device.type == "cpu" else None
    return module is not None and bool(module.has_q8)


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales) of a float weight `[out, in]` (in a multiple of 32), rows padded to 16."""
    out, num_in = w.shape
    pad = -out % ROWS
    w = torch.cat([w.float(), w.new_zeros(pad, num_in, dtype=torch.float32)]) if pad else w.float()
    groups = w.view(out + pad, num_in // GROUP, GROUP)
    scales = groups.abs().amax(-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (groups / scales.unsqueeze(-1)).round_().clamp_(-127, 127).view(out + pad, num_in)
    unsigned = (codes + 128).to(torch.uint8)
    packed = unsigned.view(-1, ROWS, num_in // 4, 4).transpose(1, 2).reshape(-1, num_in // 4, 4 * ROWS).contiguous()
    return packed, scales.view(-1, ROWS, num_in // GROUP).transpose(1, 2).contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """The fp32 `[out, in]` weight a packed layer computes with."""
    blocks, quads = packed.shape[:2]
    codes = packed.view(blocks, quads, ROWS, 4).transpose(1, 2).reshape(blocks * ROWS, quads * 4).float() - 128
    per_row = scales.transpose(1, 2).reshape(blocks * ROWS, -1)
    return (codes.view(blocks * ROWS, -1, GROUP) * per_row.unsqueeze(-1)).view(blocks * ROWS, -1)[:out_features]
