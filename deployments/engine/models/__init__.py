"""Model construction: our own code for the families we ship, a generic adapter for the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from deployments.engine.weights.store import SafetensorsReader, WeightStore

NATIVE_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}
"""transformers `model_type` -> our model code (GGUF conversions carry no `architectures`)."""


@dataclass
class BuiltModel:
    """A model ready for the runner, and what it is."""

    model: torch.nn.Module
    architecture: str
    implementation: str
    """`native` (our model code) or `transformers` (the generic adapter)."""
    act_dtype: torch.dtype
    num_exact_int4: int = 0
    num_requantized: int = 0


def load_config(directory: Path) -> Any:
    """The checkpoint's transformers config (read once per load and passed around)."""
    return AutoConfig.from_pretrained(str(directory), local_files_only=True)


def is_native(config: Any) -> bool:
    return config.model_type in NATIVE_MODEL_TYPES and getattr(config, "quantization_config", None) is None


def build_model(
    directory: Path, config: Any, fmt: str, device: torch.device, max_positions: int, int4: dict[str, Any] | None = None
) -> BuiltModel:
    """Our model code over the checkpoint's tensors (read one at a time) in format `fmt`."""
    family = NATIVE_MODEL_TYPES[config.model_type]
    text = config.get_text_config(decoder=True)
    store = WeightStore(_strip_language_model(SafetensorsReader(directory)), fmt, device, int4)
    model: torch.nn.Module
    if family == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        from deployments.engine.models.gemma3 import Gemma3ForCausalLM

        model = Gemma3ForCausalLM(store, text, Gemma3RotaryEmbedding(text), max_positions)
    else:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        from deployments.engine.models.llama import LlamaForCausalLM

        model = LlamaForCausalLM(store, text, LlamaRotaryEmbedding(text), max_positions)
    model.eval()
    arch = (config.architectures or [type(model).__name__])[0]
    return BuiltModel(model, arch, "native", store.act_dtype, store.num_exact_int4, store.num_requantized)


def _strip_language_model(reader: SafetensorsReader) -> Any:
    """Multimodal Gemma 3 checkpoints prefix the text model (`model.language_model.`)."""
    if any(k.startswith("model.language_model.") for k in reader):
        return _Renamed(reader, "model.language_model.", "model.")
    return reader


class _Renamed(dict):  # type: ignore[type-arg]
    def __init__(self, reader: SafetensorsReader, old: str, new: str) -> None:
        super().__init__()
        self.reader = reader
        self.names = {k.replace(old, new, 1): k for k in reader}

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader[self.names[name]]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.names)
