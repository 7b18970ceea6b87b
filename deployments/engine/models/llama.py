"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): our own compact model code over the
shared layers, reading a transformers checkpoint's weights by their transformers names.

q/k/v and gate/up projections are fused into one matmul each (fewer, larger kernels per layer).
transformers stays the reference: the fp32 path equals `generate()` token for token (tests).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.activations import ACT2FN

from deployments.engine.layers.attention import AttentionMetadata, paged_attention
from deployments.engine.layers.norm import RMSNorm
from deployments.engine.layers.rotary import RotaryTable, apply_rotary
from deployments.engine.weights.store import WeightStore


class Attention(torch.nn.Module):
    """Fused qkv projection, optional per-head q/k norms, rotary, paged attention, output projection."""

    def __init__(self, store: WeightStore, prefix: str, cfg: Any, head_dim: int, scale: float, sliding: bool, qk_norm_offset: float | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
        self.scale, self.sliding = scale, sliding
        names = [f"{prefix}.{p}_proj" for p in ("q", "k", "v")]
        self.qkv_proj = store.linear(names)
        self.o_proj = store.linear([f"{prefix}.o_proj"])
        self.qk_norm = None
        if qk_norm_offset is not None:  # q and k norms as one norm over [heads + kv_heads, head_dim]
            self.qk_norm = store.head_norm([f"{prefix}.q_norm", f"{prefix}.k_norm"], [self.num_heads, self.num_kv_heads], cfg.rms_norm_eps, qk_norm_offset)
        self.k_cache = self.v_cache = torch.empty(0)
        self.block_size = 0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t, h, kvh = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(t, h + 2 * kvh, self.head_dim)
        qk = qkv[:, : h + kvh]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rotary(qk, cos, sin)  # q and k heads together: one pass
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + kvh :]
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.block_size, self.sliding)
        return self.o_proj(out.view(t, h * self.head_dim))


class MLP(torch.nn.Module):
    """act(gate(x)) * up(x), then down: gate and up fused into one matmul."""

    def __init__(self, store: WeightStore, prefix: str, activation: str) -> None:
        super().__init__()
        self.gate_up_proj = store.linear([f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj = store.linear([f"{prefix}.down_proj"])
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(torch.nn.Module):
    def __init__(self, store: WeightStore, cfg: Any, i: int, head_dim: int) -> None:
        super().__init__()
        prefix = f"model.layers.{i}"
        self.self_attn = Attention(store, f"{prefix}.self_attn", cfg, head_dim, head_dim**-0.5, False, None)
        self.mlp = MLP(store, f"{prefix}.mlp", cfg.hidden_act)
        self.input_layernorm = store.norm(f"{prefix}.input_layernorm", cfg.rms_norm_eps)
        self.post_attention_layernorm = store.norm(f"{prefix}.post_attention_layernorm", cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(torch.nn.Module):
    """What the runner needs of a native model: embed, layers over paged KV, final norm, logits."""

    sliding_window: int | None = None
    layers: torch.nn.ModuleList

    def __init__(self, store: WeightStore, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.act_dtype = store.act_dtype
        self.embed_tokens = store.embedding("model.embed_tokens")
        self.norm = store.norm("model.norm", cfg.rms_norm_eps)
        self.lm_head = store.lm_head("lm_head", "model.embed_tokens", bool(getattr(cfg, "tie_word_embeddings", False)))
        self.final_logit_softcapping: float | None = getattr(cfg, "final_logit_softcapping", None)

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads)

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> None:
        """Give each layer its slice of the runner's preallocated cache (views, no copies)."""
        for layer, (k, v) in zip(self.layers, caches):
            attn: Any = layer.self_attn
            attn.k_cache, attn.v_cache, attn.block_size = k, v, block_size

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden)).float()
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits


class LlamaForCausalLM(CausalLM):
    """Llama/SmolLM2/Mistral/Qwen2 (biases on q/k/v where the checkpoint has them)."""

    def __init__(self, store: WeightStore, cfg: Any, rotary: torch.nn.Module, max_positions: int) -> None:
        super().__init__(store, cfg)
        self.layers = torch.nn.ModuleList(DecoderLayer(store, cfg, i, self.head_dim) for i in range(cfg.num_hidden_layers))
        self.rotary = RotaryTable(rotary, max_positions, store.act_dtype, store.device)
        window = getattr(cfg, "sliding_window", None)
        self.sliding_window = window if window and getattr(cfg, "use_sliding_window", True) else None
        for layer in self.layers:
            attn: Any = layer.self_attn
            attn.sliding = self.sliding_window is not None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.lookup(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        return x

