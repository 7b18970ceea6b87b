"""Token embeddings and the LM head for the quantized formats: one exact 8-bit table, and a fast
per-row int8 copy to rank the vocabulary, whose best candidates are then rescored exactly.

Why: the head decides the argmax. On SmolLM2 an int8 per-row or bf16 head (input rounded to bf16)
moved greedy agreement with fp32 from 98% to 95-97%, under our 97% gate, while an fp32 head costs
12 ms per step at batch 1 (113 MB read). So the full vocabulary is ranked by a per-row int8
copy (`_weight_int8pack_mm`: 28 MB for SmolLM2; bf16 for large vocabularies, see LARGE_VOCAB) and the
top `num_rescored` candidates of every row are scored again in fp32 from the exact table. A 4-bit
ranking copy was faster but its tail logits raised perplexity 3.1% (2.2% rescoring the top 128);
int8's and bf16's tails keep it within 0.6% (perf/quality.py). Greedy picks the fp32 argmax whenever it is among the
candidates; sampling sees exact logits for the likely tokens.

The exact table is int8 codes with one fp32 scale per 32 values (absmax): a GGUF Q8_0 embedding
(d * q per 32) is recovered exactly from its dequantized values, and any other table keeps 8 bits
per value with a fine-grained scale. Lookups (embeddings) read it too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from deployments.engine import kernels
from deployments.engine.layers.linear import Linear

GROUP = 32
LARGE_VOCAB = 65536
"""Without our int8 kernel (`Int8Rank`), above this many rows the ranking copy is bf16: torch's int8
kernel's cost grows with every row of the batch (Gemma 3's 262k-row head: 92 ms per step at 10
streams with it, 59 ms with bf16; perf/README.md); below it int8 keeps small models lean (SmolLM2:
RSS/file 1.49 with int8, 1.77 with bf16). Our kernel ranks any vocabulary in int8: half bf16's bytes."""


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [V, H] and fp32 absmax scales [V, H / 32] with w ~= codes * scale per group."""
    v, h = w.shape
    groups = w.float().view(v, h // GROUP, GROUP)
    scales = groups.abs().amax(-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (groups / scales.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return codes.view(v, h), scales


class VocabTable(torch.nn.Module):
    """Embedding lookups and the (tied or untied) LM head over one 8-bit table."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, num_rescored: int = 16) -> None:
        super().__init__()
        if weight.shape[1] % GROUP:
            raise ValueError(f"hidden size {weight.shape[1]} is not a multiple of {GROUP}")
        codes, scales = quantize_groups(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        ours = weight.device.type == "cpu" and Int8Rank.available()
        self.rank_fmt = "int8" if weight.shape[0] <= LARGE_VOCAB or ours else "bf16"
        self.rank: torch.nn.Module = Linear.from_float(weight, None, self.rank_fmt)  # ranks the vocabulary; the tail stays as ranked
        if self.rank_fmt == "int8" and ours:
            self.rank = Int8Rank(self.rank)  # the same codes and scales, through our kernel
        self.num_rescored = min(num_rescored, weight.shape[0])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact fp32 rows [*ids.shape, H]."""
        codes = self.codes[ids].float()
        return (codes.unflatten(-1, (-1, GROUP)) * self.scales[ids].unsqueeze(-1)).flatten(-2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V]: int8 ranking, the top `num_rescored` per row rescored exactly."""
        approx = self.rank(x).float()
        if approx.device.type == "cpu" and (kernel := kernels.cpu_kernels()) is not None:  # topk + rescoring in one pass
            approx = approx.contiguous()
            kernel.rescore_top(approx, x.float(), self.codes, self.scales, self.num_rescored)
            return approx
        top = approx.topk(self.num_rescored, dim=-1).indices  # [n, k]
        exact = torch.matmul(self.rows(top), x.float().unsqueeze(-1)).squeeze(-1)  # [n, k]
        return approx.scatter_(1, top, exact)


class VocabHead(torch.nn.Module):
    """The LM head view of a `VocabTable`: a tied model's head shares the embedding's table (not
    registered twice); an untied head owns its own table."""

    def __init__(self, table: VocabTable, owned: bool = False) -> None:
        super().__init__()
        self._table = [table]
        if owned:
            self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._table[0].logits(x)


class Int8Rank(torch.nn.Module):
    """A per-row int8 ranking layer run by our CPU kernel (`q8_linear`, AVX-512 VNNI): the codes of an
    int8 `Linear` stored + 128 in 16-row blocks, its scales as fp32. At 10 rows it ranks SmolLM2's
    49k-row vocabulary in ~1.5 ms where torch's weight-only int8 kernel, whose cost grows with every
    row, takes ~9 ms (perf/README.md); the activations are two int8 codes (~16 bits), so the ranking
    is that of the int8 weights themselves."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, layer: Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes, scales = layer.weight, layer.scales.float()
        pad = -self.out_features % 16
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad, self.in_features)])
            scales = torch.cat([scales, scales.new_zeros(pad)])
        unsigned = (codes.to(torch.int16) + 128).to(torch.uint8)
        blocks = unsigned.view(-1, 16, self.in_features // 4, 4).transpose(1, 2)  # [N/16, K/4, 16 rows, 4]
        self.register_buffer("weight", blocks.reshape(-1, self.in_features // 4, 64).contiguous())
        self.register_buffer("scales", scales.contiguous())
        self._q8: Callable[..., torch.Tensor] = kernels.load("native").q8_rank  # type: ignore[union-attr]

    @staticmethod
    def available() -> bool:
        module = kernels.cpu_kernels()
        return module is not None and bool(module.has_q8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._q8(x.reshape(-1, self.in_features), self.weight, self.scales)[:, : self.out_features]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        if fn(torch.empty(0)).device.type != "cpu":
            raise NotImplementedError("Int8Rank is a CPU kernel's layout: build the model on the target device instead")
        return super()._apply(lambda t: t if fn(t).dtype != t.dtype else fn(t), recurse)
