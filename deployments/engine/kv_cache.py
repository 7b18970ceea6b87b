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


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose tensors are views into a buffer with spare room, so a new
    token is written in place. transformers' DynamicLayer re-concatenates the whole cache every step
    (aten::cat was 18% of decode time at 10 streams); this grows by doubling instead."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.length = keys.shape[-2]
        self._key_buffer = self._value_buffer = keys  # replaced by _reserve
        self._reserve(keys, values, capacity=max(16, 2 * self.length))

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        b, h, _, d = keys.shape
        self._key_buffer = keys.new_empty((b, h, capacity, d))
        self._value_buffer = values.new_empty((b, h, capacity, values.shape[-1]))
        self._key_buffer[:, :, : self.length] = keys
        self._value_buffer[:, :, : self.length] = values
        self.keys, self.values = self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self.length + n > self._key_buffer.shape[-2]:
            current = (self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length])
            self._reserve(*current, capacity=2 * (self.length + n))
        self._key_buffer[:, :, self.length : self.length + n] = key_states
        self._value_buffer[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length]
        return self.keys, self.values


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
            self.cache = _growing_cache(_tensors(seq_cache))
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
        self.cache = _growing_cache(merged)
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
        self.mask = self.mask.index_select(0, index)
        num_pad = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        self.mask = self.mask[:, num_pad:]
        kept = [(k.index_select(0, index)[:, :, num_pad:], v.index_select(0, index)[:, :, num_pad:]) for k, v in _tensors(self.cache)]
        self.cache = _growing_cache(kept)

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
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if type(layer) not in (DynamicLayer, GrowingLayer) or keys is None or values is None:
            raise RuntimeError(f"unexpected KV cache layer {type(layer).__name__}")
        out.append((keys, values))
    return out


def _growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [GrowingLayer(k, v) for k, v in layers]
    return cache


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad dim -2 of a [B, H, T, D] tensor (or dim -1 of a [B, T] mask) with zeros."""
    if t.dim() == 2:
        return F.pad(t, (length - t.shape[1], 0))
    return F.pad(t, (0, 0, length - t.shape[2], 0))
