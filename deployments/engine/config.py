"""Engine settings: a frozen dataclass that rejects bad values with a `ValueError` naming them."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.engine.quantization import QUANTIZATION_METHODS

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to load one model and schedule its requests."""

    model: str
    """A local directory (transformers layout), a `.gguf` file, or `pkg://<package>/<file.gguf>`."""
    dtype: str = "float32"
    """Weights and activations dtype; GGUF weights are dequantised to it."""
    device: str = "cpu"
    """`cpu`, `cuda` or `cuda:N`."""
    quantization: str | None = None
    """`int8`: int8 Linear weights, `dtype` activations (torchao weight-only); None keeps `dtype` weights."""
    max_model_len: int = 2048
    """Longest prompt + completion accepted, in tokens (capped by the model's own limit)."""
    max_num_seqs: int = 8
    """How many sequences decode together in one batched forward pass; the rest wait."""
    max_prefill_tokens: int = 2048
    """Prompt tokens admitted per step, so new arrivals do not stall running streams for long."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None uses every core the process may run on (not Ray's OMP_NUM_THREADS)."""
    chat_template: str | None = None
    """A Jinja chat template that overrides (or supplies) the tokenizer's own."""
    default_max_tokens: int = 256
    """Completion length when a request does not say, further capped by the context left."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a directory, a .gguf file or pkg://package/file")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {SUPPORTED_DTYPES}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization={self.quantization!r} is not one of {QUANTIZATION_METHODS} or None")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r} must be 'cpu', 'cuda' or 'cuda:N'")
        for name in ("max_model_len", "max_num_seqs", "max_prefill_tokens", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads!r} must be a positive integer or None")
