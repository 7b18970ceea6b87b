"""Gemma 3 (text): sandwich norms with (1 + w) scaling, per-head q/k norms, scaled embeddings,
sliding-window layers (local RoPE base) interleaved with global ones (global RoPE base)."""

from __future__ import annotations

from typing import Any

import torch

from deployments.engine.layers.attention import AttentionMetadata
from deployments.engine.layers.rotary import RotaryTable
from deployments.engine.models.llama import MLP, Attention, CausalLM
from deployments.engine.weights.store import WeightStore

GEMMA_NORM_OFFSET = 1.0


class Gemma3DecoderLayer(torch.nn.Module):
    def __init__(self, store: WeightStore, cfg: Any, i: int, head_dim: int) -> None:
        super().__init__()
        prefix, eps = f"model.layers.{i}", cfg.rms_norm_eps
        self.is_sliding = cfg.layer_types[i] == "sliding_attention"
        scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.self_attn = Attention(store, f"{prefix}.self_attn", cfg, head_dim, scale, self.is_sliding, GEMMA_NORM_OFFSET)
        self.mlp = MLP(store, f"{prefix}.mlp", cfg.hidden_activation)
        self.input_layernorm = store.norm(f"{prefix}.input_layernorm", eps, GEMMA_NORM_OFFSET)
        self.post_attention_layernorm = store.norm(f"{prefix}.post_attention_layernorm", eps, GEMMA_NORM_OFFSET)
        self.pre_feedforward_layernorm = store.norm(f"{prefix}.pre_feedforward_layernorm", eps, GEMMA_NORM_OFFSET)
        self.post_feedforward_layernorm = store.norm(f"{prefix}.post_feedforward_layernorm", eps, GEMMA_NORM_OFFSET)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, store: WeightStore, cfg: Any, rotary: torch.nn.Module, max_positions: int) -> None:
        super().__init__(store, cfg)
        self.norm = store.norm("model.norm", cfg.rms_norm_eps, GEMMA_NORM_OFFSET)
        self.layers = torch.nn.ModuleList(Gemma3DecoderLayer(store, cfg, i, self.head_dim) for i in range(cfg.num_hidden_layers))
        self.sliding_window = int(cfg.sliding_window) if "sliding_attention" in cfg.layer_types else None
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5, dtype=store.act_dtype)
        self.rotary = {
            kind: RotaryTable(rotary, max_positions, store.act_dtype, store.device, layer_type=kind) for kind in set(cfg.layer_types)
        }

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        if (glue := self.glue(x)) is not None:
            return self._fused_layers(x, positions, meta, glue)
        tables = {kind: table.lookup(positions) for kind, table in self.rotary.items()}
        local, full = tables.get("sliding_attention"), tables.get("full_attention")
        for layer in self.layers:
            cos, sin = local if layer.is_sliding and local else full  # type: ignore[misc]
            x = layer(x, cos, sin, meta)
        return x

    def _norms(self, layer: Any) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight, layer.post_feedforward_layernorm.weight

    def _rotary(self, layer: Any) -> Any:
        return self.rotary["sliding_attention" if layer.is_sliding else "full_attention"]
