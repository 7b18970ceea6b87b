"""Our CPU kernels (deployments/engine/kernels/) against a float64 reference: the int4
matmul (on the activations as it codes them: one int8 code per value, two in a row's outlier groups)
on both of its instruction paths (the host's, and AVX2 built on any x86 host), every row-tile
remainder, many rows (a prefill's path) bit-equal to each row alone, padded outputs, all-zero groups; its layout round-trips; LLM_SERVE_INT4_KERNEL=torch falls
back; the int8 matmul and vocabulary ranking (both instruction paths) and the exact rescoring on top of it."""

from __future__ import annotations

import pytest
import torch

from deployments.engine import kernels
from deployments.engine.layers import int4
from deployments.engine.layers.int4 import Int4Weight
from deployments.engine.layers.linear import Linear
from perf.bench_codes import second_code_groups

native = kernels.load("native")
pytestmark = pytest.mark.skipif(native is None, reason=f"int4 CPU kernel not built here: {kernels._failed.get('native')}")


def reference(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    return x.double() @ weight.dequantize().double().t()


def coded(x: torch.Tensor, outlier: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the kernels code it (codes.h), in float64, and which groups kept a second code: per group of
    32, q1 = round(x * 127 / absmax); q2 = round(256 * the residual), kept only where the group's absmax
    is over `outlier` x the median of its row's groups'."""
    rows, k = x.shape
    g = x.float().view(rows, k // 32, 32)
    amax = g.abs().amax(-1)
    two = second_code_groups(x, outlier)
    scaled = g * torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)[..., None]  # (127 / amax: reciprocal, then x 127)
    q1 = scaled.round()
    q2 = ((scaled - q1) * 256).round().clamp(-127, 127) * two[..., None]
    value = (amax / 127)[..., None].double() * (q1.double() + q2.double() / 256)
    return value.view(rows, k), two


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def fp16_exact(weight: Int4Weight) -> Int4Weight:
    """Scales and mins the kernel holds exactly (fp16), as a GGUF Q4_1 block's are."""
    d = weight.scales.half().float()
    m = (weight.zeros - 8 * weight.scales).half().float()
    return Int4Weight(weight.q, d, m + 8 * d, weight.group_size)


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("in_features,out_features", [(32, 16), (96, 20), (576, 960)])
def test_kernel_matches_a_float64_reference(isa: str, in_features: int, out_features: int) -> None:
    module = kernels.load(isa)
    assert module is not None, kernels._failed.get(isa)
    torch.manual_seed(in_features)
    w = torch.randn(out_features, in_features) * 0.05
    if in_features > 32:
        w[:, :32] = 0  # an all-zero group in every row
    weight = fp16_exact(Int4Weight.quantize(w))
    padded = -out_features % 16
    q = torch.cat([weight.q, weight.q.new_full((padded, in_features), 8)])
    s = torch.cat([weight.scales, weight.scales.new_zeros(padded, in_features // 32)])
    z = torch.cat([weight.zeros, weight.zeros.new_zeros(padded, in_features // 32)])
    packed, scales = int4._pack_ours(q, s, z)
    for rows in [*range(0, 14), 17, 18, 19]:  # every remainder of the 6-row (AVX-512) and 4-row (AVX2) tiles, and of
        # the 4-row tiles over a block's unpacked weights (AVX-512, more than 12 rows)
        x = torch.randn(rows, in_features).bfloat16()
        x[:, 32:64] *= 50  # a group with large values next to ordinary ones
        out = module.q4_linear(x, packed, scales)
        assert out.shape == (rows, out_features + padded) and out.dtype == torch.float32
        if rows:
            x_coded, two = coded(x, module.OUTLIER)
            assert relative_error(out[:, :out_features], reference(x_coded, weight)) < 1e-5  # the arithmetic on the codes
            assert relative_error(out[:, :out_features], reference(x, weight)) < 1.5e-2  # the codes against x: ~8 bits
            if in_features > 64:
                assert two[:, 1].all() and two.float().mean() < 0.5  # the large group keeps its second code
            both = module.q4_linear(x, packed, scales, 0.0)  # outlier 0: two codes in every group (~16 bits)
            assert relative_error(both[:, :out_features], reference(coded(x, 0.0)[0], weight)) < 1e-5
            assert relative_error(both[:, :out_features], reference(x, weight)) < 2e-4
            assert not padded or float(out[:, out_features:].abs().max()) == 0.0  # zero padding rows


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_many_rows_give_each_rows_own_result(isa: str) -> None:
    """A prefill's rows (AVX-512: past 12 rows the block's weights are unpacked once and shared by every row
    tile) give, bit for bit, what each row gives alone (one row tile, weights unpacked in registers)."""
    module = kernels.load(isa)
    assert module is not None, kernels._failed.get(isa)
    torch.manual_seed(3)
    weight = Int4Weight.quantize(torch.randn(48, 320) * 0.05)
    packed, scales = int4._pack_ours(weight.q, weight.scales, weight.zeros)
    x = torch.randn(43, 320)
    x[::5, 64:96] *= 40  # outlier groups: their second codes
    together = module.q4_linear(x, packed, scales)
    alone = torch.cat([module.q4_linear(x[r : r + 1], packed, scales) for r in range(len(x))])
    assert torch.equal(together, alone)


def test_both_instruction_paths_agree() -> None:
    avx2 = kernels.load("avx2")
    assert avx2 is not None and native is not None
    torch.manual_seed(1)
    weight = Int4Weight.quantize(torch.randn(64, 256))
    packed, scales = int4._pack_ours(weight.q, weight.scales, weight.zeros)
    x = torch.randn(9, 256).bfloat16()
    torch.testing.assert_close(native.q4_linear(x, packed, scales), avx2.q4_linear(x, packed, scales), rtol=1e-5, atol=1e-5)


def test_layer_uses_our_layout_and_round_trips() -> None:
    torch.manual_seed(2)
    weight = fp16_exact(Int4Weight.quantize(torch.randn(40, 128) * 0.1))
    layer = Linear.from_int4(weight, torch.randn(40))
    assert int4.is_ours(layer.weight) and layer.scales.dtype == torch.float16
    assert layer.nbytes() == 48 * 128 // 2 + 2 * 48 * 4 * 2 + 40 * 2  # 4 bits per weight, fp16 d and m per 32, bf16 bias
    back = layer.int4_weight()
    assert torch.equal(back.q, weight.q) and torch.equal(back.scales, weight.scales) and torch.equal(back.zeros, weight.zeros)
    x = torch.randn(3, 128)
    assert relative_error(layer(x) - layer.bias.float(), reference(x.bfloat16(), weight)) < 1.5e-2  # x coded to ~8 bits
    assert "ours" in kernels.kernel_status()


def test_auto_serves_a_4bit_source_through_our_kernel() -> None:
    from transformers import LlamaConfig

    from deployments.engine.weights.select import choose_weights

    config = LlamaConfig(hidden_size=64, intermediate_size=128)
    fmt, why = choose_weights("auto", "cpu", True, config, 16, stored_4bit=True)
    assert fmt == "int4" and "our int4 kernel" in why  # no timing, which other replicas' loads can skew
    fmt, why = choose_weights("auto", "cpu", True, config, 16, stored_4bit=False)  # a plain checkpoint: measured
    assert fmt in ("bf16", "fp32") and "MLP projection time" in why


def test_env_selects_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    weight = Int4Weight.quantize(torch.randn(32, 64))
    monkeypatch.setenv(kernels.ENV, "torch")
    layer = Linear.from_int4(weight, None)
    assert not int4.is_ours(layer.weight) and layer.scales.dtype == torch.bfloat16
    assert "torch" in kernels.kernel_status()
    x = torch.randn(2, 64).bfloat16()
    assert relative_error(layer(x), reference(x, weight)) < 1e-2


def test_int8_vocabulary_ranking_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.engine.layers import int8
    from deployments.engine.layers.vocab import VocabTable, quantize_groups

    if not int8.available(torch.device("cpu")):
        pytest.skip("our kernels are not built here")
    torch.manual_seed(4)
    weight = torch.randn(1000, 64) * 0.05
    table = VocabTable(weight)  # 1000 rows: padded to 1008 inside
    assert table.packed and table.rank is None  # the exact table ranks itself: no second copy
    ids = torch.arange(1000)
    codes, scales = quantize_groups(weight)
    exact_rows = (codes.float().view(1000, -1, 32) * scales.unsqueeze(-1)).view(1000, 64)
    torch.testing.assert_close(table.rows(ids), exact_rows, rtol=0, atol=0)
    monkeypatch.setenv(kernels.ENV, "torch")
    plain = VocabTable(weight)  # without our kernels: row-major table + a per-row int8 ranking copy
    assert not plain.packed and isinstance(plain.rank, Linear) and plain.rank.fmt == "int8"
    torch.testing.assert_close(plain.rows(ids), exact_rows, rtol=0, atol=0)
    monkeypatch.delenv(kernels.ENV)
    for rows in (1, 7, 13):
        x = torch.randn(rows, 64)
        ranked = table.ranking(x)
        ref = x.double() @ exact_rows.double().t()
        assert ranked.shape == (rows, 1000) and relative_error(ranked, ref) < 1e-2  # the activations' first code: ~8 bits
        logits = table.logits(x)
        top = ranked.topk(16, dim=-1).indices  # the candidates it rescores exactly
        torch.testing.assert_close(logits.gather(1, top).double(), ref.gather(1, top), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_features", [16, 40, 960])  # 40: rows padded to 48 inside
def test_group_int8_layer_matches_its_dequantized_weight(out_features: int) -> None:
    from deployments.engine.layers import int8

    if not int8.available(torch.device("cpu")):
        pytest.skip("our kernels are not built here")
    torch.manual_seed(8)
    w = torch.randn(out_features, 96) * torch.rand(out_features, 1)  # rows of different scales
    w[0, :32] = 0  # an all-zero group
    layer = Linear.from_float(w, None, "int8g")
    assert layer.fmt == "int8g" and layer.direct == (out_features % 16 == 0)
    dequantized = layer.dequantize()
    assert dequantized.shape == w.shape and not dequantized[0, :32].any()
    assert (dequantized - w).abs().max() <= w.abs().max() / 254 + 1e-6  # within half a step of each group's grid
    for rows in (1, 7, 13):
        x = torch.randn(rows, 96)
        assert relative_error(layer(x), coded(x, native.OUTLIER)[0] @ dequantized.double().t()) < 1e-5


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] as int8 with an absmax scale per row (LoRALinear's int8 slots)."""
    scale = w.abs().amax(dim=1) / 127
    return (w / scale[:, None]).round().to(torch.int8), scale


@pytest.mark.parametrize("dtype,y_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.int8, torch.float32), (torch.int8, torch.bfloat16)])
def test_lora_add_takes_each_token_through_its_own_adapter(dtype: torch.dtype, y_dtype: torch.dtype) -> None:
    assert native is not None
    torch.manual_seed(6)
    parts, rank, slots, hidden = [48, 16, 16], 4, 3, 64  # a fused q/k/v with 3 adapter slots
    a = torch.randn(len(parts) * slots * rank, hidden)
    bt = torch.randn(slots * rank, sum(parts))  # the kernel's layout of B: [slots * rank, out]
    a_scale = b_scale = torch.empty(0)
    if dtype == torch.int8:
        (a, a_scale), (bt, b_scale) = int8_rows(a), int8_rows(bt)
    else:
        a, bt = a.to(dtype), bt.to(dtype)
    a_f = a.double() * a_scale.double()[:, None] if dtype == torch.int8 else a.double()  # what the kernel should apply
    b = (bt.double() * b_scale.double()[:, None] if dtype == torch.int8 else bt.double()).t()
    token_slots = torch.tensor([0, -1, 2, 2, 1, -1, 0, 0, 0, 0, 0])  # slot 0's six tokens share its rows in two groups
    x = torch.randn(len(token_slots), hidden)
    y = torch.randn(len(token_slots), sum(parts)).to(y_dtype)
    expected = y.double().clone()
    for t, s in enumerate(token_slots.tolist()):
        if s < 0:
            continue
        start = 0
        for p, size in enumerate(parts):
            a_ps = a_f[(p * slots + s) * rank : (p * slots + s + 1) * rank]
            b_ps = b[start : start + size, s * rank : (s + 1) * rank]
            expected[t, start : start + size] += b_ps @ (a_ps @ x[t].double())
            start += size
    native.lora_add(y, x, a, bt, token_slots, parts, rank, slots, a_scale, b_scale)  # in place
    tolerance = 1e-4 if y_dtype == torch.float32 else 1e-2  # a bf16 output is rounded to 8 bits
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance * 10)


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_int8_kernel_matches_a_float64_reference(isa: str) -> None:
    """q8_linear (group scales, both codes) and q8_rank (row scales, first codes) on both instruction paths:
    AVX2 has no u8 x s8 product that cannot saturate on these weights, so it takes |w| and moves w's sign
    onto the activation (maddubs(|w|, sign(a, w)))."""
    from deployments.engine.layers import int8

    module = kernels.load(isa)
    assert module is not None and module.has_q8, kernels._failed.get(isa)
    torch.manual_seed(9)
    w = torch.randn(48, 96) * torch.rand(48, 1)
    w[1, :] = w[1, :].sign() * w.abs().max()  # codes of +-127 in every group (the largest products)
    packed, scales = int8.pack(w)
    dequantized = int8.dequantize(packed, scales, 48).double()
    codes = packed.view(3, 24, 16, 4).transpose(1, 2).reshape(48, 96).double() - 128
    row_scales = torch.rand(48) + 0.5
    for rows in (1, 2, 3, 7, 13):
        x = torch.randn(rows, 96)
        x[0, 40] = 30.0  # an outlier: its group keeps a second code
        assert relative_error(module.q8_linear(x, packed, scales), coded(x, module.OUTLIER)[0] @ dequantized.t()) < 1e-6
        first_codes = coded(x, float("inf"))[0]  # one code in every group
        assert relative_error(module.q8_rank(x, packed, row_scales), first_codes @ (codes * row_scales.double()[:, None]).t()) < 1e-6
