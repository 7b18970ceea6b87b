"""Token embeddings and the LM head for the quantized formats: one exact 8-bit table that also ranks
the vocabulary, whose best candidates are then rescored exactly.

Why: the head decides the argmax. On SmolLM2 an int8 per-row or bf16 head (input rounded to bf16)
moved greedy agreement with fp32 from 98% to 95-97%, under our 97% gate, while an fp32 head costs
12 ms per step at batch 1 (113 MB read). So the vocabulary is ranked in int8 and the top
`num_rescored` candidates of every row are scored again in fp32 from the exact table. A 4-bit
ranking copy was faster but its tail logits raised perplexity 3.1% (2.2% rescoring the top 128);
int8's and bf16's tails keep it within 0.8% (perf/quality.py). Greedy picks the fp32 argmax whenever
it is among the candidates; sampling sees exact logits for the likely tokens.

The exact table is int8 codes with one fp32 scale per 32 values (absmax): a GGUF Q8_0 embedding
(d * q per 32) is recovered exactly from its dequantized values, and any other table keeps 8 bits
per value with a fine-grained scale. Lookups (embeddings) read it too. Where our q8 kernel runs
(AVX-512 VNNI; AVX2 since session 10) the table is held in its packed layout (layers/int8.py) and ranks the vocabulary
itself (`q8_rank`: group scales, the activations' first code): no second copy. Session 6 held a
per-row int8 ranking copy beside it, 28 MB more for SmolLM2 (resident / file 1.51 -> 1.22 on a reload,
perf/README.md). Elsewhere (our kernels not built) a per-row int8 (or, for large vocabularies, bf16) copy ranks
it through torch: on an AVX2 host, 10 rows took 12.3 ms for SmolLM2 and 171 ms for Gemma 3's bf16 copy,
q8_rank 3.9 and 19.2 ms (session 10).
"""

from __future__ import annotations

import torch

from deployments.engine import kernels
from deployments.engine.layers import int8
from deployments.engine.layers.linear import Linear

GROUP = 32
LARGE_VOCAB = 65536
"""Without our q8 kernel, above this many rows the ranking copy is bf16: torch's int8 kernel's cost
grows with every row of the batch (Gemma 3's 262k-row head: 92 ms per step at 10 streams with it,
59 ms with bf16; perf/README.md); below it int8 keeps small models lean."""


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [V, H] and fp32 absmax scales [V, H / 32] with w ~= codes * scale per group."""
    v, h = w.shape
    groups = w.float().view(v, h // GROUP, GROUP)
    scales = groups.abs().amax(-1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (groups / scales.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return codes.view(v, h), scales


def scaled_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 rows [..., H] from their codes (as floats, [..., H]) and their groups' scales [..., H / GROUP]."""
    return (codes.unflatten(-1, (-1, GROUP)) * scales.unsqueeze(-1)).flatten(-2)


def packed_rows(ids: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the packed table (layers/int8.py: row v is block v // 16, lane v % 16) as fp32
    [*ids.shape, H], in torch: the kernels' `table_rows` where they are built."""
    block, lane = ids // int8.ROWS, ids % int8.ROWS
    picked = codes.view(codes.shape[0], -1, int8.ROWS, 4)[block, :, lane, :].flatten(-2).float() - 128
    return scaled_rows(picked, scales[block, :, lane])


class VocabTable(torch.nn.Module):
    """Embedding lookups and the (tied or untied) LM head over one 8-bit table."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, num_rescored: int = 16) -> None:
        super().__init__()
        if weight.shape[1] % GROUP:
            raise ValueError(f"hidden size {weight.shape[1]} is not a multiple of {GROUP}")
        self.num_embeddings, self.embedding_dim = (int(n) for n in weight.shape)
        self.packed = int8.available(weight.device)  # the q8 kernel's layout: it ranks with the table itself
        self.rank: torch.nn.Module | None = None
        if self.packed:
            codes, scales = int8.pack(weight)  # the same codes and scales as quantize_groups, in 16-row blocks
        else:
            codes, scales = quantize_groups(weight)
            fmt = "int8" if weight.shape[0] <= LARGE_VOCAB else "bf16"
            self.rank = Linear.from_float(weight, None, fmt)  # a ranking copy; the tail stays as ranked
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.num_rescored = min(num_rescored, weight.shape[0])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact fp32 rows [*ids.shape, H]."""
        if self.packed and ids.device.type == "cpu" and (kernel := kernels.cpu_kernels()) is not None:
            return kernel.table_rows(ids, self.codes, self.scales)  # type: ignore[no-any-return]
        if self.packed:
            return packed_rows(ids, self.codes, self.scales)
        return scaled_rows(self.codes[ids].float(), self.scales[ids])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids)

    def ranking(self, x: torch.Tensor) -> torch.Tensor:
        """Approximate fp32 logits [n, V] for every token of the vocabulary."""
        if self.rank is not None:
            return self.rank(x).float()  # type: ignore[no-any-return]
        rank = kernels.load("native").q8_rank  # type: ignore[union-attr]
        return rank(x.reshape(-1, self.embedding_dim).float(), self.codes, self.scales)[:, : self.num_embeddings]  # type: ignore[no-any-return]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V]: int8 ranking, the top `num_rescored` per row rescored exactly."""
        approx = self.ranking(x)
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
