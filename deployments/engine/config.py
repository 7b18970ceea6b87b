"""Engine settings: a frozen dataclass that rejects bad values with a `ValueError` naming them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from deployments.engine.stream_interval import parse_stream_interval

WeightFormat = Literal["int4", "bf16", "fp32"]
"""How weights are held in memory once loaded."""
WeightChoice = Literal["auto", WeightFormat]
"""What a config may ask for: a format, or `auto` (the fastest measured at load time)."""
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
WEIGHT_CHOICES: tuple[str, ...] = get_args(WeightChoice)
DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"
DEFAULT_KV_CACHE_CAP_BYTES = 256 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def serving_dtype(weights: str) -> str:
    """The floating dtype (a torch dtype's name) that goes with a weight format, for the KV cache, LoRA
    slots and the generic adapter: float32 for the fp32 reference, bfloat16 for the others (half the
    bytes to read per decode step)."""
    return "float32" if weights == "fp32" else "bfloat16"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load one model and schedule its requests."""

    model: str
    """A local directory (transformers layout), a `.gguf` file, or `pkg://<package>/<file.gguf>`."""
    weights: str = "auto"
    """`int4` (4-bit weights, int8 embeddings, bf16 activations), `bf16`, `fp32` (the reference),
    or `auto`: what measures fastest on this host at load time (the choice and why are reported)."""
    device: str = "cpu"
    """`cpu`, `cuda` or `cuda:N`."""
    max_model_len: int = 2048
    """Longest prompt + completion accepted, in tokens (capped by the model's own limit)."""
    max_num_seqs: int = 8
    """How many sequences run together in one step; the rest wait."""
    max_num_batched_tokens: int = 256
    """Tokens per step (one per decoding sequence, then prompt chunks): bounds how long a new
    prompt can stall the running streams. 256 (OpenVINO GenAI's chunk): against 512, the same tok/s at 10 streams
    and an earlier first token for half a wave of prompts (perf/README.md, session 26)."""
    block_size: int = 16
    """Token slots per KV-cache block."""
    kv_cache_bytes: int | None = None
    """Bytes preallocated for the paged KV cache; None: room for `max_num_seqs` full-length
    sequences, capped at 256 MiB (but always at least one full-length sequence)."""
    enable_prefix_caching: bool = True
    """Share full KV blocks between requests with the same prefix (chat turns, system prompts)."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None uses every core the process may run on (not Ray's OMP_NUM_THREADS)."""
    chat_template: str | None = None
    """A Jinja chat template that overrides (or supplies) the tokenizer's own."""
    default_max_tokens: int = 256
    """Completion length when a request does not say, further capped by the context left."""
    max_loras: int = 0
    """LoRA adapter slots preallocated beside the base (0: no adapters, no LoRA cost at all)."""
    max_lora_rank: int = 16
    """The largest adapter rank a slot holds; a higher-rank adapter is refused."""
    stream_interval: int | str = 1
    """Steps whose tokens one output of a request carries (vLLM's `stream_interval`); `auto`: 1, or 2
    while 8+ sequences run (engine/stream_interval.py). First tokens and last outputs are never held."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a directory, a .gguf file or pkg://package/file")
        if self.weights not in WEIGHT_CHOICES:
            raise ValueError(f"weights={self.weights!r} is not one of {WEIGHT_CHOICES}")
        if not isinstance(self.device, str) or not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"device={self.device!r} must be 'cpu', 'cuda' or 'cuda:N'")
        names = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "default_max_tokens")
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.kv_cache_bytes is not None and (not isinstance(self.kv_cache_bytes, int) or self.kv_cache_bytes < 1):
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes!r} must be a positive integer or None")
        if not isinstance(self.max_loras, int) or self.max_loras < 0:
            raise ValueError(f"max_loras={self.max_loras!r} must be an integer >= 0")
        if not isinstance(self.max_lora_rank, int) or self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank={self.max_lora_rank!r} must be a positive integer")
        parse_stream_interval(self.stream_interval)
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads!r} must be a positive integer or None")

    def kv_cache_size(self, bytes_per_token: int) -> int:
        """Bytes to preallocate for the KV cache, given what one token costs across all layers."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        full = self.max_num_seqs * self.max_model_len * bytes_per_token
        return max(min(full, DEFAULT_KV_CACHE_CAP_BYTES), self.max_model_len * bytes_per_token)
