"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2): our own compact model code over the
shared layers, reading a transformers checkpoint's weights by their transformers names.

q/k/v and gate/up projections are fused into one matmul each (fewer, larger kernels per layer).
transformers stays the reference: the fp32 path equals `generate()` token for token (tests).

On CPU with our kernels, the int4 and bf16 formats run each layer's glue fused (`_fused_layers`:
residual add + RMS norm, q/k norms + rotary + the KV-cache write, the gated activation; see
deployments/engine/kernels/glue.cpp): a few calls per layer instead of ~30 torch operators. The fp32
format keeps the torch operators: it is the reference the tests hold to transformers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.activations import ACT2FN

from deployments.engine import kernels
from deployments.engine.layers.attention import AttentionMetadata, paged_attention
from deployments.engine.layers.linear import Linear
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

    def fused_forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryTable, meta: AttentionMetadata, glue: Any) -> torch.Tensor:
        """`forward` with q/k norms, rotary and the cache write in one kernel call (`glue`: our kernels)."""
        qkv = self.qkv_proj(x)
        norm = self.qk_norm
        q = glue.rope_kv(qkv, positions, rotary.cos, rotary.sin, None if norm is None else norm.weight, norm.eps if norm else 0.0,
                         self.k_cache, self.v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
        out = paged_attention(q, None, None, self.k_cache, self.v_cache, meta, self.scale, self.block_size, self.sliding)
        return self.o_proj(out.view(x.shape[0], -1))


FUSED_ACTIVATIONS = {"silu": 0, "gelu_pytorch_tanh": 1}
"""transformers activation names our `act_mul` kernel computes, by its code."""


class MLP(torch.nn.Module):
    """act(gate(x)) * up(x), then down: gate and up fused into one matmul."""

    def __init__(self, store: WeightStore, prefix: str, activation: str) -> None:
        super().__init__()
        self.gate_up_proj = store.linear([f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj = store.linear([f"{prefix}.down_proj"])
        self.act = ACT2FN[activation]
        self.fused_act = FUSED_ACTIVATIONS.get(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)

    def fused_forward(self, x: torch.Tensor, glue: Any) -> torch.Tensor:
        return self.down_proj(glue.act_mul(self.gate_up_proj(x), self.fused_act))


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


@dataclass
class DecodePlan:
    """The tensors of a decode step in one call (`decode_layers`): per layer norms, packed weights and
    scales, rotary tables, KV caches and windows, and, where the projections are LoRA-wrapped, their adapter slots."""

    weights: list[torch.Tensor] = field(default_factory=list)
    caches: list[torch.Tensor] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    """Per layer, its sliding window (0: global attention)."""
    lora: list[torch.Tensor] = field(default_factory=list)
    lora_parts: list[int] = field(default_factory=list)
    lora_owner: Any = None
    """The LoRAManager whose `batch` says this step's adapter per token."""


class CausalLM(torch.nn.Module):
    """What the runner needs of a native model: embed, layers over paged KV, final norm, logits."""

    sliding_window: int | None = None
    layers: Any  # a ModuleList of decoder layers (Any: their submodules are reached by name per family)

    def __init__(self, store: WeightStore, cfg: Any) -> None:
        super().__init__()
        self.config = cfg
        self.weight_format = store.fmt
        self.act_dtype = store.act_dtype
        self.embed_tokens = store.embedding("model.embed_tokens")
        self.norm = store.norm("model.norm", cfg.rms_norm_eps)
        self.lm_head = store.lm_head("lm_head", "model.embed_tokens", bool(getattr(cfg, "tie_word_embeddings", False)))
        self.final_logit_softcapping: float | None = getattr(cfg, "final_logit_softcapping", None)
        self._plan_key: tuple[int, int, int] | None = None
        self._plan: DecodePlan | None = None

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

    def glue(self, x: torch.Tensor) -> Any:
        """Our kernels when this forward can run fused (CPU, int4/bf16, fp32 activations), else None."""
        if not self._fusable or x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        return kernels.cpu_kernels()

    @functools.cached_property
    def _fusable(self) -> bool:
        """int4/bf16 weights and an activation our kernel computes in every layer (fixed at build)."""
        return self.weight_format != "fp32" and all(layer.mlp.fused_act is not None for layer in self.layers)

    def _fused_layers(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, glue: Any) -> torch.Tensor:
        """The layers with their glue fused, for every family: x (the residual stream) is updated in
        place, and each residual add is one call with the norms around it (a family's `_norms`: the
        attention output's, the MLP input's, the MLP output's), the next layer's input norm included.
        A step whose projections are all our kernels' and whose rows our attention kernel takes (decodes,
        and prompt rows where `rows_in_kernel`) runs every layer in one kernel call (`decode_layers`, the
        same sequence of kernels looped in C++)."""
        rows = self._row_tables(meta)
        if rows is not None and (plan := self._decode_plan(meta.sliding_window)) is not None:
            self._decode_layers(x, positions, meta, glue, plan, *rows)
            return x
        layers, eps = self.layers, self.config.rms_norm_eps
        h = glue.residual_norm(x, None, None, layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(layers):
            attn_out, mlp_in, mlp_out = self._norms(layer)
            o = layer.self_attn.fused_forward(h, positions, self._rotary(layer), meta, glue)
            h = glue.residual_norm(x, o, attn_out, mlp_in, eps)
            following = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else None
            h = glue.residual_norm(x, layer.mlp.fused_forward(h, glue), mlp_out, following, eps)
        return x

    @staticmethod
    def _row_tables(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every row's block table and context length, where the attention kernel takes every row of the step."""
        if not meta.prefills:
            assert meta.decode_block_ids is not None and meta.decode_context_lens is not None
            return meta.decode_block_ids.view(meta.num_decode_tokens, -1), meta.decode_context_lens
        if meta.row_tables is not None and meta.row_context_lens is not None:
            return meta.row_tables, meta.row_context_lens
        return None

    def _decode_layers(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, glue: Any, plan: DecodePlan,
                       tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        first = self.layers[0].self_attn
        owner = plan.lora_owner
        batch = owner.batch if owner is not None else None  # this step's adapter per token
        rank, slots = (owner.max_rank, owner.num_slots) if owner is not None else (0, 0)
        glue.decode_layers(x, plan.weights, plan.caches, plan.windows, positions, meta.slot_mapping,
                           tables, context_lens, first.num_heads, first.num_kv_heads,
                           first.block_size, first.scale, self.config.rms_norm_eps, self.layers[0].mlp.fused_act, plan.lora,
                           None if batch is None else batch.slots, plan.lora_parts, rank, slots)

    def _decode_plan(self, window: int = 0) -> DecodePlan | None:
        """What `decode_layers` takes, or None when a projection is not one of our kernels' without bias
        (bf16 layers), or only some are LoRA-wrapped. Cached per cache binding, LoRA wrapping and window."""
        first = self.layers[0].self_attn
        key = (id(first.k_cache), id(first.qkv_proj), window)  # rebinding the cache or wrapping for LoRA changes it
        if key == self._plan_key:
            return self._plan
        self._plan_key, self._plan = key, self._build_decode_plan(window)
        return self._plan

    def _build_decode_plan(self, window: int) -> DecodePlan | None:
        plan, none = DecodePlan(), torch.empty(0)
        if len({(layer.self_attn.scale, layer.self_attn.num_heads, layer.self_attn.num_kv_heads) for layer in self.layers}) != 1:
            return None
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            wrapped = [p for p in projections if hasattr(p, "lora_a")]  # LoRALinear (lora.py): base + adapter slots
            bases = [p.base if hasattr(p, "lora_a") else p for p in projections]
            if not all(isinstance(b, Linear) and b.direct for b in bases) or attn.k_cache.numel() == 0:
                return None
            if wrapped and len(wrapped) != len(projections):
                return None
            qkv, o, gate_up, down = bases
            attn_out, mlp_in, mlp_out = self._norms(layer)
            rotary = self._rotary(layer)
            plan.weights += [layer.input_layernorm.weight, qkv.weight, qkv.scales, o.weight, o.scales, none if attn_out is None else attn_out,
                             mlp_in, gate_up.weight, gate_up.scales, down.weight, down.scales, none if mlp_out is None else mlp_out,
                             none if attn.qk_norm is None else attn.qk_norm.weight, rotary.cos, rotary.sin]
            plan.caches += [attn.k_cache, attn.v_cache]
            plan.windows.append(window if attn.sliding else 0)
            for p in wrapped:
                plan.lora += [p.lora_a, p.lora_b, p.lora_a_scale, p.lora_b_scale]
            if wrapped and not plan.lora_parts:
                plan.lora_parts = [size for p in wrapped for size in p.part_sizes]
                plan.lora_owner = wrapped[0]._owner[0]
        return plan

    def _norms(self, layer: Any) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(attention output norm, MLP input norm, MLP output norm) weights; None where the family has none."""
        raise NotImplementedError

    def _rotary(self, layer: Any) -> Any:
        """The layer's rotary table."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        glue = self.glue(hidden)
        normed = self.norm(hidden) if glue is None else glue.residual_norm(hidden.contiguous(), None, None, self.norm.weight, self.norm.eps)
        logits = self.lm_head(normed).float()
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
        if (glue := self.glue(x)) is not None:
            return self._fused_layers(x.contiguous(), positions, meta, glue)
        cos, sin = self.rotary.lookup(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        return x

    def _norms(self, layer: Any) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return None, layer.post_attention_layernorm.weight, None

    def _rotary(self, layer: Any) -> Any:
        return self.rotary
