"""KV-cache bookkeeping: fixed-size blocks, a free list, reference counts and prefix hashes.

A pure object (no torch): it decides which block of the preallocated KV tensors holds which tokens;
the runner only ever reads `Sequence.block_table`. As in vLLM and nano-vllm, a *full* block whose
tokens are computed is registered under a hash of its tokens chained with the previous block's
hash (and the request's cache salt), so another sequence with the same prefix reuses it instead of
recomputing it. Freed blocks keep their hash until they are handed out again (least recently freed
first), so a finished chat turn's prefix stays reusable for the next turn while memory allows.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from deployments.engine.request import Sequence


@dataclass
class Block:
    """One block of `block_size` token slots in every layer's KV cache."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """A content hash of one full block, chained to its prefix (so equal blocks at different
    positions or after different prefixes never collide in meaning)."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


class BlockManager:
    """Owns the free list, reference counts and the prefix-hash table of one KV cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered: LRU first
        self.hash_to_block_id: dict[bytes, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- admission: prefix-cache lookup ------------------------------------------------------
    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Give a new (or preempted) sequence the cached blocks of its longest cached prefix; returns
        the number of tokens they hold. At least one token is always left to compute (its logits
        are needed to sample)."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks")
        max_blocks = (seq.num_tokens - 1) // self.block_size
        parent: bytes | None = seq.cache_salt
        hits: list[int] = []
        if self.enable_prefix_caching:
            for i in range(max_blocks):
                parent = hash_block(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                block_id = self.hash_to_block_id.get(parent)
                if block_id is None:
                    break
                hits.append(block_id)
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits
        seq.num_hashed_blocks = len(hits)
        num_cached = len(hits) * self.block_size
        self.num_prefix_queries += seq.num_tokens
        self.num_prefix_hits += num_cached
        return num_cached

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the blocks for `num_new_tokens` more computed tokens are free (or evictable)."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append blocks so the sequence can hold `num_new_tokens` more computed tokens."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError(f"{need} blocks needed, {self.num_free_blocks} free")
        for _ in range(need):
            block_id = next(iter(self.free_block_ids))
            block = self.blocks[block_id]
            if block.block_hash is not None and self.hash_to_block_id.get(block.block_hash) == block_id:
                del self.hash_to_block_id[block.block_hash]  # evict the old content
            block.block_hash, block.token_ids = None, ()
            self._take(block_id)
            seq.block_table.append(block_id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full and computed, so later requests reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        start = min(seq.num_hashed_blocks, num_full)
        parent = self.blocks[seq.block_table[start - 1]].block_hash if start else seq.cache_salt
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block.block_hash is None:
                block.block_hash, block.token_ids = hash_block(parent, tokens), tokens
                self.hash_to_block_id.setdefault(block.block_hash, block.block_id)
            parent = block.block_hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody holds go back to the free list, last
        block first so a prefix's head is evicted after its tail."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table, seq.num_hashed_blocks = [], 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def reset_prefix_cache(self) -> None:
        self.hash_to_block_id.clear()
        for block in self.blocks:
            block.block_hash, block.token_ids = None, ()
