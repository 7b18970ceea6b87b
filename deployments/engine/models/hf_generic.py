"""Any transformers causal LM on our engine: its own modules, our paged attention.

transformers' attention-function interface lets a model call a registered function in place of
SDPA; ours writes the new keys/values into the engine's paged cache and attends through the block
tables, so the model runs packed batches (one flat sequence, no padding, no DynamicCache) exactly
like our native models, only slower. Used for architectures we have no code for and for
pre-quantized checkpoints (e.g. GPTQ through optimum + gptqmodel).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from deployments.engine.layers.attention import AttentionMetadata, paged_attention

ATTN_IMPLEMENTATION = "llm_serve_paged"
_step = threading.local()  # the running step's metadata, read by every layer's attention call


def _paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, d], key/value [1, kv_heads, T, d] -> ([1, T, heads, d], None)."""
    model: HFGenericCausalLM = _step.model
    k_cache, v_cache = model.caches[module.layer_idx]  # type: ignore[index]
    q = query[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(
        q, key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, _step.meta, scale, model.block_size,
        sliding=sliding_window is not None,
    )
    return out.unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # our attention builds its own masks from the block tables


AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


class HFGenericCausalLM(torch.nn.Module):
    """A transformers model behind the runner's model interface (forward -> hidden, compute_logits)."""

    def __init__(self, directory: Path, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hf: Any = AutoModelForCausalLM.from_pretrained(
            str(directory), local_files_only=True, use_safetensors=True, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION
        )
        hf.to(device)
        hf.eval()
        self.hf = hf
        self.config = self.hf.config.get_text_config(decoder=True)
        self.act_dtype = dtype
        layer_types = getattr(self.config, "layer_types", None) or []
        window = getattr(self.config, "sliding_window", None)
        self.sliding_window: int | None = window if window and "sliding_attention" in layer_types else None
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.final_logit_softcapping: float | None = getattr(self.config, "final_logit_softcapping", None)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads)

    @property
    def generation_config(self) -> Any:
        return self.hf.generation_config

    def bind_kv_cache(self, caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int) -> None:
        self.caches, self.block_size = caches, block_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        _step.model, _step.meta = self, meta
        try:
            out = self.hf.get_decoder()(input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False)
        finally:
            _step.model = _step.meta = None
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.hf.get_output_embeddings()(hidden).float()
        if self.final_logit_softcapping is not None:
            logits = torch.tanh(logits / self.final_logit_softcapping) * self.final_logit_softcapping
        return logits
