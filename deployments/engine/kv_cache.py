"""The batched KV cache: one row per running sequence, left-padded to a common length.

transformers' `DynamicCache` holds the tensors and the model writes to it; this manager owns which
row belongs to which request, the padding mask, and the row surgery when sequences join or leave.
A joining sequence is prefilled alone (so its prompt math is exactly unbatched generate's) and then
merged in; a finished one is dropped, and columns that became padding in every row are trimmed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVCacheManager:
    """Owner of the running batch's KV cache and attention mask."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.request_ids: list[str] = []

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def seq_len(self) -> int:
        return int(self.mask.shape[1])

    def num_cached_tokens(self) -> int:
        """Slots held, padding included: what the cache costs in memory."""
        return self.num_rows * self.seq_len

    def allocate(self, request_id: str, seq_cache: DynamicCache) -> None:
        """Merge a freshly prefilled single-sequence cache in as a new last row."""
        new_len = seq_cache.get_seq_length()
        if self.cache is None or self.num_rows == 0:
            self.cache = seq_cache
            self.mask = torch.ones((1, new_len), dtype=torch.long, device=self.device)
            self.request_ids = [request_id]
            return
        total = max(self.seq_len, new_len)
        merged = []
        for (old_k, old_v), (new_k, new_v) in zip(_tensors(self.cache), _tensors(seq_cache)):
            merged.append(
                (
                    torch.cat([_left_pad(old_k, total), _left_pad(new_k, total)], dim=0),
                    torch.cat([_left_pad(old_v, total), _left_pad(new_v, total)], dim=0),
                )
            )
        self.cache = DynamicCache(ddp_cache_data=merged)
        new_row = torch.ones((1, new_len), dtype=torch.long, device=self.device)
        self.mask = torch.cat([_left_pad(self.mask, total), _left_pad(new_row, total)], dim=0)
        self.request_ids.append(request_id)

    def free(self, request_ids: set[str]) -> None:
        """Drop the rows of finished or aborted requests, then trim all-padding columns."""
        keep = [i for i, rid in enumerate(self.request_ids) if rid not in request_ids]
        if len(keep) == self.num_rows:
            return
        self.request_ids = [self.request_ids[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, self.mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        assert self.cache is not None
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        num_pad = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        if num_pad:
            self.mask = self.mask[:, num_pad:]
            for layer, (keys, values) in zip(self.cache.layers, _tensors(self.cache)):
                layer.keys, layer.values = keys[:, :, num_pad:], values[:, :, num_pad:]  # type: ignore[union-attr]

    def decode_inputs(self) -> dict[str, torch.Tensor | DynamicCache | None]:
        """Mask, positions and cache position for one new token per row (as generate() builds them)."""
        past = self.seq_len
        position_ids = self.mask.sum(dim=1, keepdim=True)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return {
            "attention_mask": self.mask,
            "position_ids": position_ids,
            "cache_position": torch.tensor([past], device=self.device),
            "past_key_values": self.cache,
        }

    def release(self) -> None:
        self.cache, self.mask, self.request_ids = None, self.mask[:0, :0], []


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values). Only full-attention layers are expected: the engine builds its
    caches without a model config, so sliding-window models keep every position and rely on the mask."""
    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            raise RuntimeError(f"unexpected KV cache layer {type(layer).__name__}")
        out.append((layer.keys, layer.values))
    return out


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad dim -2 of a [B, H, T, D] tensor (or dim -1 of a [B, T] mask) with zeros."""
    if t.dim() == 2:
        return F.pad(t, (length - t.shape[1], 0))
    return F.pad(t, (0, 0, length - t.shape[2], 0))
