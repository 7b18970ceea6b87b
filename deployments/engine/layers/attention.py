"""Paged attention over a flat batch.

Every layer's KV cache is one preallocated tensor of `num_blocks * block_size` token slots; a
step's new keys and values are written into their slots (`slot_mapping`) and each sequence reads
its context back through its block table. On CPU our kernel (kernels/attention.cpp) attends every
row of a step, decodes and prompt chunks alike, each row over its context read in place. Elsewhere,
in plain torch, sequences with one new token (decodes) are attended together in one batched matmul
over their gathered blocks, and each prompt chunk alone with SDPA, with a causal mask offset by the
tokens already cached (chunked prefill, prefix hits).
The metadata is built once per step by the runner and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deployments.engine import kernels

PROMPTS_IN_KERNEL = True
"""On CPU, prompt rows go through our attention kernel with the decodes (`rows_in_kernel`); False: SDPA per
prompt (perf/bench_prefill.py alternates the two)."""
PROMPT_KERNEL_MAX_CONTEXT = 768
"""A step with a prompt chunk whose context (position + 1) is longer goes through SDPA per prompt: its blocked matmuls
beat the kernel's one query at a time there (one layer's 512 rows, SmolLM2's heads: contexts 1-512 0.80x
SDPA's time, 513-1024 1.09x, 1537-2048 1.24x; 48 rows 0.37x)."""


@dataclass
class PrefillChunk:
    """One sequence with several new tokens: rows [start, end) of the flat batch."""

    start: int
    end: int
    slots: torch.Tensor
    """Cache slots of its whole context (cached prefix + this chunk), in order."""
    mask: torch.Tensor | None
    """[q, ctx] bool, True = attend; None when plain causal (no cached context before the chunk)."""
    sliding_mask: torch.Tensor | None = None
    """The same with the sliding window applied; None when the window does not cut anything."""


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the cache and what each of them attends to."""

    slot_mapping: torch.Tensor
    num_decode_tokens: int = 0
    """The first `num_decode_tokens` rows of the batch are decodes (one token per sequence)."""
    decode_block_ids: torch.Tensor | None = None
    """[num_decodes * max_blocks] block ids, each row padded to max_blocks."""
    decode_mask: torch.Tensor | None = None
    """[num_decodes, 1, 1, max_blocks * block_size] bool, True = attend."""
    decode_sliding_mask: torch.Tensor | None = None
    decode_context_lens: torch.Tensor | None = None
    """[num_decodes] int64: each decode's context length (its position + 1)."""
    sliding_window: int = 0
    """The sliding layers' window (0: none)."""
    prefills: list[PrefillChunk] = field(default_factory=list)
    row_tables: torch.Tensor | None = None
    """[T, max_blocks] int64: every row's block table, and `row_context_lens` [T] its context (position + 1),
    where our CPU kernel attends every row of the step, prompt rows too (`rows_in_kernel`)."""
    row_context_lens: torch.Tensor | None = None


def build_metadata(
    positions: list[list[int]], block_tables: list[list[int]], block_size: int, sliding_window: int | None, device: torch.device
) -> AttentionMetadata:
    """`positions[i]` are the positions of sequence i's new tokens (decodes first, one each)."""
    slots: list[int] = []
    for pos, table in zip(positions, block_tables):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=device), sliding_window=sliding_window or 0)
    decodes = [i for i, pos in enumerate(positions) if len(pos) == 1]
    if decodes and decodes != list(range(len(decodes))):
        raise ValueError("decodes must come first in the batch")
    if decodes:
        _decode_metadata(meta, [positions[i][0] for i in decodes], [block_tables[i] for i in decodes], block_size, sliding_window, device)
    start = len(decodes)
    for pos, table in zip(positions[len(decodes) :], block_tables[len(decodes) :]):
        meta.prefills.append(_prefill_chunk(start, pos, table, block_size, sliding_window, device))
        start += len(pos)
    if meta.prefills and rows_in_kernel(positions, device):
        _row_metadata(meta, positions, block_tables, block_size, device)
    return meta


def rows_in_kernel(positions: list[list[int]], device: torch.device) -> bool:
    """Whether our CPU kernel attends a step's prompt rows with its decodes: each row over its context
    read in place from the blocks, a prompt's rows eight at a time (each tile of keys read once for them),
    one call per layer for the whole step, and a mixed step's layers in one `decode_layers` call; where no
    prompt's context passes PROMPT_KERNEL_MAX_CONTEXT. Against SDPA per prompt over gathered keys,
    alternated in one process (perf/bench_prefill.py): the prefill of a ~50-token prompt 12-15% faster."""
    return (device.type == "cpu" and PROMPTS_IN_KERNEL and max(pos[-1] for pos in positions) < PROMPT_KERNEL_MAX_CONTEXT
            and kernels.cpu_kernels() is not None)


def _padded_tables(last: list[int], tables: list[list[int]], block_size: int, device: torch.device) -> torch.Tensor:
    """[len(tables), max_blocks] int64: each table cut or zero-padded to the blocks the furthest position needs."""
    max_blocks = max(p // block_size + 1 for p in last)
    return torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables], dtype=torch.long, device=device)


def _row_metadata(meta: AttentionMetadata, positions: list[list[int]], tables: list[list[int]], block_size: int, device: torch.device) -> None:
    counts = torch.tensor([len(pos) for pos in positions], device=device)
    meta.row_tables = _padded_tables([pos[-1] for pos in positions], tables, block_size, device).repeat_interleave(counts, dim=0)
    meta.row_context_lens = torch.tensor([p + 1 for pos in positions for p in pos], dtype=torch.long, device=device)


def _decode_metadata(
    meta: AttentionMetadata, last: list[int], tables: list[list[int]], block_size: int, window: int | None, device: torch.device
) -> None:
    meta.num_decode_tokens = len(last)
    padded = _padded_tables(last, tables, block_size, device)
    meta.decode_block_ids = padded.view(-1)
    cols = torch.arange(padded.shape[1] * block_size, device=device)
    lens = torch.tensor(last, device=device) + 1
    meta.decode_context_lens = lens
    pos = (lens - 1).unsqueeze(1)
    meta.decode_mask = (cols <= pos).view(len(last), 1, 1, -1)
    if window is not None and max(last) >= window:
        meta.decode_sliding_mask = ((cols <= pos) & (cols > pos - window)).view(len(last), 1, 1, -1)


def _prefill_chunk(
    start: int, pos: list[int], table: list[int], block_size: int, window: int | None, device: torch.device
) -> PrefillChunk:
    ctx = pos[-1] + 1
    ctx_slots = torch.arange(ctx, device=device)
    blocks = torch.tensor(table, dtype=torch.long, device=device)
    slots = blocks[ctx_slots // block_size] * block_size + ctx_slots % block_size
    q_pos = torch.tensor(pos, device=device).unsqueeze(1)
    causal = ctx_slots <= q_pos
    mask = None if ctx == len(pos) else causal
    sliding = None
    if window is not None and ctx > window:
        sliding = causal & (ctx_slots > q_pos - window)
    return PrefillChunk(start, start + len(pos), slots, mask, sliding)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    block_size: int,
    sliding: bool = False,
) -> torch.Tensor:
    """q [T, heads, d], k/v [T, kv_heads, d]; caches [slots, kv_heads, d]. Returns [T, heads, d].
    k and v None: they are in the cache already (written by the fused `rope_kv` kernel)."""
    if k is not None and v is not None:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    num_heads = q.shape[1]
    if meta.row_tables is not None and meta.row_context_lens is not None and (kernel := kernels.cpu_kernels()) is not None:
        window = meta.sliding_window if sliding else 0  # every row, prompts' too, in one call (rows_in_kernel)
        return kernel.paged_decode_attention(q, k_cache, v_cache, meta.row_tables, meta.row_context_lens, block_size, window, scale)
    n = meta.num_decode_tokens
    if n:
        mask = meta.decode_sliding_mask if sliding and meta.decode_sliding_mask is not None else meta.decode_mask
        assert meta.decode_block_ids is not None and mask is not None and meta.decode_context_lens is not None
        if q.device.type == "cpu" and (kernel := kernels.cpu_kernels()) is not None:  # reads the blocks in place: no gather
            tables = meta.decode_block_ids.view(n, -1)
            window = meta.sliding_window if sliding else 0
            decoded = kernel.paged_decode_attention(q[:n], k_cache, v_cache, tables, meta.decode_context_lens, block_size, window, scale)
        else:
            decoded = _decode_attention(q[:n], k_cache, v_cache, meta.decode_block_ids, mask, scale, block_size)
        if not meta.prefills:  # a decode-only step: no output buffer to fill
            return decoded
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if n:
        out[:n] = decoded
    for chunk in meta.prefills:
        mask = chunk.sliding_mask if sliding and chunk.sliding_mask is not None else chunk.mask
        kc = k_cache.index_select(0, chunk.slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
        vc = v_cache.index_select(0, chunk.slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=num_heads != kc.shape[1]
        )
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, mask: torch.Tensor, scale: float, block_size: int
) -> torch.Tensor:
    """One query per sequence against its gathered blocks, grouped-query heads in one matmul."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    q = q.contiguous()  # a view into the fused qkv output
    kc = k_cache.view(-1, block_size, num_kv_heads, head_dim).index_select(0, block_ids)
    vc = v_cache.view(-1, block_size, num_kv_heads, head_dim).index_select(0, block_ids)
    kc = kc.view(n, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)  # [n, kvh, L, d]
    vc = vc.view(n, -1, num_kv_heads, head_dim).transpose(1, 2).to(q.dtype)
    qg = q.view(n, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, kc.transpose(-1, -2)).float() * scale  # [n, kvh, group, L]
    scores.masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, vc).reshape(n, num_heads, head_dim)
