"""The fused layer glue (deployments/engine/kernels/glue.cpp) and the vocabulary's rescoring and
argmax (vocab.cpp) against the torch operators they replace.

Each kernel against its torch reference; then whole native models (tiny Llama with biases and tied
embeddings, tiny Gemma 3 with q/k norms, sandwich norms, GELU and a sliding window), bf16 and int4
weights, run the same steps fused and through torch's operators (`LLM_SERVE_INT4_KERNEL=torch`):
two prompts prefilled, one in two chunks over its cached first half, then decode steps past the
sliding window. Hidden states and KV caches must agree to rounding (a wrong rotary half, norm or
cache slot is off by order 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deployments.engine import EngineConfig, LLMEngine, kernels
from deployments.engine.layers.attention import build_metadata

native = kernels.load("native")
pytestmark = pytest.mark.skipif(native is None, reason=f"CPU kernels not built here: {kernels._failed.get('native')}")


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("rows", [1, 5, 200])  # 200: the rows run in parallel
def test_residual_norm_adds_in_place_and_normalises(rows: int) -> None:
    assert native is not None
    torch.manual_seed(1)
    x, w, w_y = torch.randn(rows, 96), torch.randn(96), torch.randn(96)
    y = torch.randn(rows, 112)[:, :96]  # a strided view, as a sliced matmul output is
    plain, gemma = x.clone(), x.clone()
    out = native.residual_norm(plain, y, None, w, 1e-5)
    torch.testing.assert_close(plain, x + y, rtol=0, atol=0)
    torch.testing.assert_close(out, rms(x + y, w, 1e-5))
    out = native.residual_norm(gemma, y, w_y, w, 1e-6)
    torch.testing.assert_close(gemma, x + rms(y, w_y, 1e-6))
    torch.testing.assert_close(out, rms(gemma, w, 1e-6))
    assert native.residual_norm(x.clone(), y, None, None, 1e-5).numel() == 0  # no norm asked: nothing returned


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rope_kv_rotates_q_and_k_and_writes_the_cache(cache_dtype: torch.dtype, qk_norm: bool) -> None:
    assert native is not None
    torch.manual_seed(2)
    tokens, heads, kv_heads, head_dim = 6, 4, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    cos, sin = torch.randn(50, head_dim), torch.randn(50, head_dim)
    positions, slots = torch.tensor([0, 7, 8, 9, 30, 49]), torch.tensor([3, 11, 12, 13, 0, 40])
    norm = torch.randn(heads + kv_heads, head_dim) if qk_norm else None
    k_cache = torch.zeros(64, kv_heads, head_dim, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    q = native.rope_kv(qkv, positions, cos, sin, norm, 1e-6, k_cache, v_cache, slots, heads, kv_heads)
    heads_in = qkv.view(tokens, heads + 2 * kv_heads, head_dim)
    qk = heads_in[:, : heads + kv_heads]
    if norm is not None:
        qk = rms(qk, norm, 1e-6)
    half = head_dim // 2
    rotated = qk * cos[positions].unsqueeze(1) + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin[positions].unsqueeze(1)
    torch.testing.assert_close(q, rotated[:, :heads])
    torch.testing.assert_close(k_cache[slots].float(), rotated[:, heads:].to(cache_dtype).float())
    torch.testing.assert_close(v_cache[slots], heads_in[:, heads + kv_heads :].to(cache_dtype), rtol=0, atol=0)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("width", [80, 84])  # whole vectors; and 4 lanes past them (the scalar tail)
def test_act_mul_computes_silu_and_gelu_tanh_gates(width: int) -> None:
    assert native is not None
    torch.manual_seed(3)
    gate_up = torch.randn(9, 2 * width) * 6  # wide enough to reach both tails of each activation
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, -90.0, 90.0])  # past the exponential's clamp
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(native.act_mul(gate_up, 0), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.act_mul(gate_up, 1), F.gelu(gate, approximate="tanh") * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["q8-layout", "row-major"])
def test_rescore_top_and_argmax_match_torchs_topk_scatter_and_argmax(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native is not None
    from deployments.engine.layers.vocab import VocabTable

    torch.manual_seed(4)
    if not packed:
        monkeypatch.setenv(kernels.ENV, "torch")  # the table without our kernels' layout
    table = VocabTable(torch.randn(1000, 64))
    monkeypatch.delenv(kernels.ENV, raising=False)
    if packed and not table.packed:
        pytest.skip("the q8 layout needs AVX-512 VNNI")
    assert table.packed is packed
    x = torch.randn(3, 64)
    approx = table.ranking(x).contiguous()
    approx[1, 7] = approx[1, 500] = approx[1].max() + 1  # a tie: the first index wins, as torch's
    top = approx.topk(16, dim=-1).indices
    want = approx.clone().scatter_(1, top, torch.matmul(table.rows(top), x.unsqueeze(-1)).squeeze(-1))
    got = approx.clone()
    native.rescore_top(got, x, table.codes, table.scales, 16)
    torch.testing.assert_close(got, want)
    assert native.argmax_rows(approx).tolist() == approx.argmax(-1).tolist()
    approx[0, 10] = float("inf")  # an infinity is a value, not a NaN
    approx[2, 900] = float("nan")  # NaN counts as the largest, as in torch
    assert native.argmax_rows(approx).tolist() == approx.argmax(-1).tolist() == [10, 7, 900]


def test_table_rows_are_the_packed_tables_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding lookup in C++ reads the same rows as indexing the packed table in torch."""
    assert native is not None
    from deployments.engine.layers.vocab import VocabTable

    torch.manual_seed(6)
    table = VocabTable(torch.randn(1000, 64))
    if not table.packed:
        pytest.skip("the q8 layout needs our q8 kernel")
    ids = torch.tensor([[0, 999, 17], [16, 15, 500]])
    got = table.rows(ids)
    monkeypatch.setenv(kernels.ENV, "torch")  # rows() through torch's indexing of the same table
    want = table.rows(ids)
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="out of range"):
        native.table_rows(torch.tensor([1008]), table.codes, table.scales)


def run_steps(engine: LLMEngine, prompts: list[list[int]], decode_steps: int) -> list[torch.Tensor]:
    """The model's hidden states over: prompt 0 whole, prompt 1 in two chunks (the second over its
    cached first half, beside a decode of prompt 0), then decode steps of both. Blocks are laid out by
    hand (sequence i owns blocks 8i..8i+7), as the runner would."""
    runner, model = engine.runner, engine.runner.model
    bs, window, device = runner.block_size, model.sliding_window, runner.device
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(2)]
    runner.kv_cache.zero_()
    hidden: list[torch.Tensor] = []

    def forward(ids: list[int], positions: list[list[int]], seqs: list[int]) -> None:
        meta = build_metadata(positions, [tables[s] for s in seqs], bs, window, device)
        flat = torch.tensor([p for pos in positions for p in pos])
        with torch.inference_mode():
            hidden.append(model(torch.tensor(ids), flat, meta).clone())

    a, b = prompts
    half = len(b) // 2
    forward(a, [list(range(len(a)))], [0])
    forward(b[:half], [list(range(half))], [1])
    tokens = [a[-1], b[-1]]
    forward([tokens[0], *b[half:]], [[len(a)], list(range(half, len(b)))], [0, 1])
    for step in range(decode_steps):
        forward(tokens, [[len(a) + 1 + step], [len(b) + step]], [0, 1])
    hidden.append(runner.kv_cache.clone())
    return hidden


@pytest.mark.parametrize("weights", ["bf16", "int4"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fused_forward_equals_torchs_operators(family: str, weights: str, tiny_model_dir: Path, tiny_gemma_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tiny_model_dir if family == "llama" else tiny_gemma_dir
    engine = LLMEngine(EngineConfig(model=str(model_dir), weights=weights, max_num_seqs=2, block_size=4))
    model = engine.runner.model
    prompts = [engine.encode("The quick brown fox jumps over"), engine.encode("Ray Serve hosts models behind one API, and")]
    x = torch.zeros(1, model.config.hidden_size)
    assert model.glue(x) is not None  # this format runs fused here
    # int4: decode steps in one call (decode_layers; Gemma's sliding and global layers with their sandwich
    # and q/k norms included); bf16 layers: the Python loop
    assert (model._decode_plan() is not None) == (weights == "int4")
    fused = run_steps(engine, prompts, decode_steps=12)  # 12: past the tiny Gemma's window of 8
    monkeypatch.setenv(kernels.ENV, "torch")
    assert model.glue(x) is None
    reference = run_steps(engine, prompts, decode_steps=12)
    for got, want in zip(fused, reference):  # normwise: bf16-rounded matmul inputs turn 1e-8 into 1e-3 here and there
        assert float((got - want).float().norm() / want.float().norm()) < 1e-2
