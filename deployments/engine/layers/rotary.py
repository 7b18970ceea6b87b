"""Rotary position embeddings: cos/sin come from transformers' own rotary modules (so every RoPE
variant a config names, llama3 scaling included, is computed as the reference computes it); we
only apply them, once per step for all layers of a kind."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos/sin [T, d] (broadcast over heads)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class RotaryTable:
    """cos/sin for every position up to `max_positions`, computed once at load time."""

    def __init__(self, rotary_module: torch.nn.Module, max_positions: int, dtype: torch.dtype, device: torch.device, **kwargs: object) -> None:
        positions = torch.arange(max_positions, device=device).unsqueeze(0)
        probe = torch.empty(0, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = rotary_module(probe, positions, **kwargs)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)
