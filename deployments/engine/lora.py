"""LoRA adapters in PEFT's format, served together with their base in one batch.

Adapters are read by `deployments.engine.adapter_loader` (PEFT's files, never pickle). The
runner holds `max_loras` slots, preallocated once per target layer (`LoRALinear`; scale folded into
B; fp32 for the fp32 reference, int8 with a scale per row where our CPU kernel runs the int4/bf16
formats: half of bf16's bytes, which a decode step reads for every adapter in its batch, else
bf16). The base matmul runs once for all rows (Punica/S-LoRA's
point), no weights are merged, and a step with no adapter token skips LoRA entirely. On CPU our
kernel (`lora_add`, a BGMV) takes each token through its own adapter's A and B; elsewhere (GPU, or
`LLM_SERVE_INT4_KERNEL=torch`) every target layer does one small GEMM for A and one per fused part
for B, for the whole mixed batch: `y = base(x) + ((x @ A.T) * mask) @ B.T` over the slots in use,
where `mask` keeps, for each token, only its own adapter's columns (base tokens: none).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from deployments.engine import kernels
from deployments.engine.adapter_loader import AdapterError, LoRAWeights

PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",), "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""Our fused layer -> the PEFT target modules it holds, in output order."""


class LoRABatch:
    """Which adapter slot each token of this step uses (-1: the base), as masks per slot width."""

    def __init__(self, token_slots: list[int], device: torch.device) -> None:
        used = [s for s in token_slots if s >= 0]
        self.lo, self.hi = min(used), max(used) + 1  # only this range of slots is computed
        self.slots = torch.tensor(token_slots, device=device)
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def mask(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[tokens, (hi - lo) * width]: 1 in each token's own slot's columns (built on first use: our
        kernel reads `slots` instead)."""
        key = (width, dtype)
        if key not in self._masks:
            onehot = F.one_hot((self.slots - self.lo).clamp(min=0), self.hi - self.lo)
            onehot.masked_fill_((self.slots < 0).unsqueeze(-1), 0)
            self._masks[key] = onehot.to(dtype).repeat_interleave(width, dim=1)
        return self._masks[key]


class LoRALinear(torch.nn.Module):
    """A base layer plus the LoRA slots of its parts (`part_names`, output sizes `part_sizes`).

    `lora_a [parts * slots * R, in]`: rows by part, then slot, then rank; `lora_b [slots * R, out]`:
    rows by slot then rank, each part's output columns (scale folded in), so a token's update is R
    contiguous axpys in our kernel. No block-diagonal zeros: in the masked-GEMM path a fused layer's
    parts each take one small GEMM over the slots in use."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_a_scale: torch.Tensor  # int8 slots: fp32 per row of lora_a / lora_b; else empty
    lora_b_scale: torch.Tensor

    def __init__(self, base: Any, owner: LoRAManager, part_names: list[str], part_sizes: list[int]) -> None:
        super().__init__()
        self.base, self._owner = base, [owner]  # a list: the manager is not a submodule
        self.part_names, self.part_sizes = part_names, part_sizes
        self.row_starts = [sum(part_sizes[:i]) for i in range(len(part_sizes))]
        R, S = owner.max_rank, owner.num_slots
        rows_a, rows_b = len(part_names) * S * R, S * R
        self.register_buffer("lora_a", torch.zeros(rows_a, base.in_features, dtype=owner.dtype, device=owner.device))
        self.register_buffer("lora_b", torch.zeros(rows_b, base.out_features, dtype=owner.dtype, device=owner.device))
        quantized = owner.dtype == torch.int8
        self.register_buffer("lora_a_scale", torch.zeros(rows_a if quantized else 0, device=owner.device))
        self.register_buffer("lora_b_scale", torch.zeros(rows_b if quantized else 0, device=owner.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._owner[0].batch
        if batch is None:
            return y
        R, S = self._owner[0].max_rank, self._owner[0].num_slots
        if x.device.type == "cpu" and (kernel := kernels.cpu_kernels()):
            # Our kernel reads each token's own A and B (no masked GEMMs over every slot), for steps of
            # any size: SmolLM2's 120 LoRA layers, 6 slots, 5 in use, per step of 16 / 128 / 512 / 1024
            # tokens: 9 / 31 / 124 / 244 ms against the masked GEMMs' 27 / 67 / 366 / 648
            # (perf/bench_lora_kernel.py, perf/README.md).
            flat = y.reshape(-1, y.shape[-1])
            flat = flat if flat.is_contiguous() else flat.contiguous()
            kernel.lora_add(flat, x.reshape(-1, self.base.in_features), self.lora_a, self.lora_b, batch.slots, self.part_sizes, R, S,
                            self.lora_a_scale, self.lora_b_scale)
            return flat.view(y.shape)
        lora_a, lora_b = self._dense()
        cols = slice(batch.lo * R, batch.hi * R)
        mask = batch.mask(R, lora_a.dtype)
        xa = x.to(lora_a.dtype)
        if len(self.part_sizes) == 1:
            h = F.linear(xa, lora_a[cols]).mul_(mask)
            if y.dim() == 2 and y.dtype == h.dtype:
                return torch.addmm(y, h, lora_b[cols])  # the add fused into the GEMM
            return y + (h @ lora_b[cols]).to(y.dtype)
        h = F.linear(xa, lora_a).view(-1, len(self.part_sizes), S * R)[:, :, cols]
        h = h * mask.unsqueeze(1)
        deltas = [
            h[:, p] @ lora_b[cols, start : start + size]
            for p, (start, size) in enumerate(zip(self.row_starts, self.part_sizes))
        ]
        return y + torch.cat(deltas, dim=-1).to(y.dtype)

    def _dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B^T as floats for the masked GEMMs (int8 slots, made where our kernel ran, dequantized
        if it has since been switched off with LLM_SERVE_INT4_KERNEL=torch)."""
        if self.lora_a.dtype != torch.int8:
            return self.lora_a, self.lora_b
        return self.lora_a.float() * self.lora_a_scale[:, None], self.lora_b.float() * self.lora_b_scale[:, None]

    def write(self, slot: int, weights: LoRAWeights | None) -> None:
        """Fill (or with None, clear) `slot` with this layer's parts of `weights`."""
        R, S, P = self._owner[0].max_rank, self._owner[0].num_slots, len(self.part_sizes)
        a_rows = torch.zeros(P * R, self.base.in_features)  # fp32, then stored: part by part, R rows each
        b_rows = torch.zeros(R, self.base.out_features)
        tensors, r, scaling = (weights.tensors, weights.rank, weights.scaling) if weights is not None else ({}, 0, 1.0)
        for p, (module, start, size) in enumerate(zip(self.part_names, self.row_starts, self.part_sizes)):
            pair = tensors.get(module)
            if pair is not None:
                a, b = pair
                a_rows[p * R : p * R + r] = a.float()
                b_rows[:r, start : start + size] = (b.float() * scaling).t()
        a_stored, a_scale = self._encode(a_rows, self.lora_a.dtype)
        for p in range(P):
            row = (p * S + slot) * R
            self.lora_a[row : row + R] = a_stored[p * R : (p + 1) * R]
            if a_scale is not None:
                self.lora_a_scale[row : row + R] = a_scale[p * R : (p + 1) * R]
        b_stored, b_scale = self._encode(b_rows, self.lora_b.dtype)
        self.lora_b[slot * R : (slot + 1) * R] = b_stored
        if b_scale is not None:
            self.lora_b_scale[slot * R : (slot + 1) * R] = b_scale

    @staticmethod
    def _encode(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """values [rows, cols] in the slots' dtype; int8 with an absmax scale per row (else no scale)."""
        if dtype != torch.int8:
            return values.to(dtype), None
        scale = values.abs().amax(dim=1) / 127
        return (values / scale.clamp(min=1e-30)[:, None]).round_().to(torch.int8), scale

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT module name -> (out, in) of the base projection it adapts."""
        return {name: (size, self.base.in_features) for name, size in zip(self.part_names, self.part_sizes)}


class LoRAManager:
    """The runner's adapter slots: wraps the model's target layers once, fills and clears slots,
    and carries the current step's token -> slot masks to every wrapped layer."""

    def __init__(self, model: Any, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self._step = threading.local()  # each lane's thread runs its own step (engine/lanes.py)
        self.layers: list[LoRALinear] = []
        for i, layer in enumerate(model.layers):
            for parent_name, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
                for attr, parts in PARTS.items():
                    base = getattr(parent, attr, None)
                    if base is None:
                        continue
                    names = [f"model.layers.{i}.{parent_name}.{p}" for p in parts]
                    sizes = _part_sizes(base.out_features, parts, layer.self_attn)
                    wrapped = LoRALinear(base, self, names, sizes)
                    setattr(parent, attr, wrapped)
                    self.layers.append(wrapped)
        self.shapes = {name: shape for layer in self.layers for name, shape in layer.expected_shapes().items()}

    def check(self, weights: LoRAWeights) -> None:
        """Raise `AdapterError` unless every module of `weights` is a target of ours of the same shape."""
        for module, (a, b) in weights.tensors.items():
            shape = self.shapes.get(module)
            if shape is None:
                raise AdapterError(f"adapter {weights.name!r}: {module} is not a LoRA target this engine supports")
            if (b.shape[0], a.shape[1]) != shape:
                raise AdapterError(
                    f"adapter {weights.name!r}: {module} is {b.shape[0]}x{a.shape[1]} but the base layer is {shape[0]}x{shape[1]} (another base model?)"
                )

    def write(self, slot: int, weights: LoRAWeights | None) -> None:
        if weights is not None:
            self.check(weights)
        for layer in self.layers:
            layer.write(slot, weights)

    @property
    def batch(self) -> LoRABatch | None:
        """The calling thread's current step's slots (None: base only)."""
        return getattr(self._step, "batch", None)

    def set_batch(self, token_slots: list[int] | None) -> None:
        """This thread's step's slot per token (None or all -1: a base-only step, LoRA skipped). Per thread:
        two lanes run their steps at once, each with its own adapters."""
        if token_slots is None or max(token_slots, default=-1) < 0:
            self._step.batch = None
            return
        self._step.batch = LoRABatch(token_slots, self.device)

    @property
    def slot_bytes(self) -> int:
        tensors = ("lora_a", "lora_b", "lora_a_scale", "lora_b_scale")
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (getattr(layer, name) for name in tensors))


def _part_sizes(out_features: int, parts: tuple[str, ...], attn: Any) -> list[int]:
    if parts == ("q_proj", "k_proj", "v_proj"):
        q = attn.num_heads * attn.head_dim
        kv = attn.num_kv_heads * attn.head_dim
        return [q, kv, kv]
    return [out_features // len(parts)] * len(parts)


class AdapterSlots:
    """Names -> slots with use counts (no torch): an adapter being removed while sequences still use
    it is retired (no new requests) and its slot is freed when the last one ends."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_of: dict[str, int] = {}
        self.in_use: dict[str, int] = {}
        self.retiring: set[str] = set()

    def free_slot(self) -> int | None:
        taken = set(self.slot_of.values())
        return next((s for s in range(self.num_slots) if s not in taken), None)

    def acquire(self, name: str) -> int:
        if name not in self.slot_of or name in self.retiring:
            raise AdapterError(f"adapter {name!r} is not loaded on this replica")
        self.in_use[name] = self.in_use.get(name, 0) + 1
        return self.slot_of[name]

    def release(self, name: str) -> bool:
        """One user fewer; True when a retiring adapter's slot may be cleared now."""
        self.in_use[name] -= 1
        if self.in_use[name] == 0:
            del self.in_use[name]
            return name in self.retiring
        return False
