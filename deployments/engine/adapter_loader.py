"""LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`
(pickle files are refused: they can run code), read and checked into `LoRAWeights` for the engine's
slots (deployments/engine/lora.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deployments.engine.loader import PICKLE_SUFFIXES


class AdapterError(ValueError):
    """An adapter that cannot be served as asked (missing, pickled, unsupported, wrong shape)."""

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (str(self),))


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter read from disk: per PEFT module name (e.g. `model.layers.0.self_attn.q_proj`)
    its `A [r, in]` and `B [out, r]`, and the scale PEFT applies (`alpha / r`, or `/ sqrt(r)`)."""

    name: str
    rank: int
    scaling: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_adapter(path: str | Path, name: str, max_rank: int) -> LoRAWeights:
    """Read and check a PEFT LoRA adapter directory; raises `AdapterError` saying what is wrong."""
    directory = Path(path).expanduser()
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: no adapter_config.json in its directory")
    if not weights_file.is_file():
        if any(p.suffix.lower() in PICKLE_SUFFIXES for p in directory.iterdir()):
            raise AdapterError(f"adapter {name!r}: only pickle weight files (refused: they can run code); save it with safetensors")
        raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors in its directory")
    config = json.loads(config_file.read_text())
    rank, alpha = int(config.get("r", 0)), float(config.get("lora_alpha", config.get("r", 1)))
    unsupported = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')!r} (only LORA)"),
        (bool(config.get("use_dora")), "DoRA"),
        (bool(config.get("modules_to_save")), "modules_to_save"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r}"),
        (bool(config.get("rank_pattern") or config.get("alpha_pattern")), "per-module ranks (rank_pattern/alpha_pattern)"),
        (bool(config.get("fan_in_fan_out")), "fan_in_fan_out"),
    ]
    for bad, what in unsupported:
        if bad:
            raise AdapterError(f"adapter {name!r}: {what} is not supported")
    if not 1 <= rank <= max_rank:
        raise AdapterError(f"adapter {name!r}: rank {rank} is over this server's max_lora_rank of {max_rank}" if rank > max_rank else f"adapter {name!r}: rank {rank} is invalid")
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise AdapterError(f"adapter {name!r}: adapter_model.safetensors could not be read ({type(exc).__name__})") from None
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return LoRAWeights(name, rank, scaling, _pair_tensors(name, state, rank))


def _pair_tensors(name: str, state: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module = key.removeprefix("base_model.model.")
        for half in ("lora_A", "lora_B"):
            suffix = f".{half}.weight"
            if module.endswith(suffix):
                halves.setdefault(module[: -len(suffix)], {})[half] = tensor
                break
        else:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (unsupported)")
    pairs = {}
    for module, ab in halves.items():
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(f"adapter {name!r}: {module} has no matching rank-{rank} A/B pair")
        pairs[module] = (a, b)
    if not pairs:
        raise AdapterError(f"adapter {name!r}: no LoRA weights in adapter_model.safetensors")
    return pairs
