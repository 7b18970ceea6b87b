"""Our paged attention kernel (deployments/engine/kernels/attention.cpp) against the torch paths it replaces
on CPU, on both of its instruction paths (tiles of 16 keys with AVX-512, 8 with AVX2): decodes against
`_decode_attention` (windows, contexts split across threads), and a step's prompt rows against SDPA per
prompt (windows, a cached prefix); prompts with long contexts stay on SDPA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deployments.engine import kernels

native = kernels.load("native")
pytestmark = pytest.mark.skipif(native is None, reason=f"CPU kernels not built here: {kernels._failed.get('native')}")


KV_HEADS, HEAD_DIM = 2, 64  # the attention tests' caches


def random_caches(slots: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(slots, KV_HEADS, HEAD_DIM).to(dtype), torch.randn(slots, KV_HEADS, HEAD_DIM).to(dtype)


def kernel_and_caches(isa: str, seed: int, slots: int, dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The kernels built for `isa` and random k and v caches of `slots` token slots (after seeding torch)."""
    module = kernels.load(isa)
    assert module is not None, kernels._failed.get(isa)
    torch.manual_seed(seed)
    return module, *random_caches(slots, dtype)


@pytest.mark.parametrize("dtype,q_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("window", [0, 5, 200])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("isa", ["native", "avx2"])  # tiles of 16 keys (AVX-512) or 8 (AVX2)
def test_paged_decode_attention_matches_the_torch_path(dtype: torch.dtype, q_dtype: torch.dtype, window: int, split: bool, isa: str) -> None:
    from deployments.engine.layers.attention import _decode_attention, build_metadata

    block_size, heads = 4, 6
    module, k_cache, v_cache = kernel_and_caches(isa, 5, 16 * block_size, dtype)
    tables = [[3, 7, 1], [12], [0, 5, 9, 2]]  # scattered blocks, ragged lengths
    positions = [[9], [2], [15]]
    if split:  # one sequence, a long context: split into chunks whose softmax partials are merged
        block_size = 16
        k_cache, v_cache = random_caches(64 * block_size, dtype)
        tables, positions = [list(range(63, 0, -2))], [[499]]
    meta = build_metadata(positions, tables, block_size, window or None, torch.device("cpu"))
    n = len(tables)
    q = torch.randn(n, heads, HEAD_DIM).to(q_dtype)  # fp32 queries over a bf16 cache: our int4/bf16 formats
    mask = meta.decode_sliding_mask if meta.decode_sliding_mask is not None else meta.decode_mask
    assert meta.decode_block_ids is not None and mask is not None
    expected = _decode_attention(q, k_cache, v_cache, meta.decode_block_ids, mask, 0.125, block_size)
    out = module.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_ids.view(n, -1), meta.decode_context_lens,
                                        block_size, window, 0.125)
    tolerance = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype,q_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("window", [0, 5, 200])
@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_prompt_rows_in_the_kernel_match_sdpa(dtype: torch.dtype, q_dtype: torch.dtype, window: int, isa: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of a decode, a prompt from position 0 and a chunk after a cached prefix (more rows than a work
    item's eight, shorter than a tile), every row through the kernel, against SDPA per prompt over gathered keys."""
    from deployments.engine.layers import attention

    block_size, heads = 4, 6
    module, k_cache, v_cache = kernel_and_caches(isa, 7, 32 * block_size, dtype)
    tables = [[3, 7, 1], [12, 20, 4, 6, 30], [0, 5, 9, 2, 11, 13]]
    positions = [[9], list(range(19)), list(range(13, 24))]
    q = torch.randn(sum(map(len, positions)), heads, HEAD_DIM).to(q_dtype)
    monkeypatch.setattr(attention, "PROMPTS_IN_KERNEL", False)
    meta = attention.build_metadata(positions, tables, block_size, window or None, torch.device("cpu"))
    assert meta.row_tables is None
    expected = attention.paged_attention(q, None, None, k_cache, v_cache, meta, 0.125, block_size, sliding=window > 0)
    monkeypatch.setattr(attention, "PROMPTS_IN_KERNEL", True)
    meta = attention.build_metadata(positions, tables, block_size, window or None, torch.device("cpu"))
    assert meta.row_tables is not None and meta.row_context_lens is not None
    assert meta.row_context_lens.tolist() == [p + 1 for pos in positions for p in pos]
    out = module.paged_decode_attention(q, k_cache, v_cache, meta.row_tables, meta.row_context_lens, block_size, window, 0.125)
    tolerance = 1e-5 if q_dtype == torch.float32 else 2e-2
    assert out.dtype == q_dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_long_prompt_contexts_go_through_sdpa() -> None:
    from deployments.engine.layers import attention

    cut = attention.PROMPT_KERNEL_MAX_CONTEXT
    tables = [list(range(cut // 4 + 8))]
    short = attention.build_metadata([list(range(cut - 8, cut))], tables, 4, None, torch.device("cpu"))
    long = attention.build_metadata([list(range(cut - 7, cut + 1))], tables, 4, None, torch.device("cpu"))
    assert short.row_tables is not None and long.row_tables is None and len(long.prefills) == 1
