"""RMSNorm as Llama (x * w) and Gemma (x * (1 + w)) define it, computed in fp32 like transformers."""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    """`offset=1.0` gives Gemma's (1 + weight) scaling; the weight is stored already offset."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.gemma = offset != 0.0
        stored = weight.float() + offset if self.gemma else weight.to(dtype)
        self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:  # Gemma scales in fp32, then casts
            return (h * self.weight).to(x.dtype)
        return self.weight * h.to(x.dtype)  # Llama casts, then scales
