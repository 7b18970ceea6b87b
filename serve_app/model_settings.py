"""One served model's settings (`applications[].args.models[]` in config/serve.yaml), validated."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator, model_validator

from deployments.engine import EngineConfig
from deployments.engine.config import DEVICE_PATTERN, WeightChoice
from serve_app.schemas import MODEL_ID_PATTERN, parse_duration
from serve_app.schemas.requests import Duration


def _size(value: Any, handler: ValidatorFunctionWrapHandler) -> ByteSize:
    """pydantic's ByteSize, with an error that shows the value (and no `true` taken as 1 byte)."""
    try:
        if not isinstance(value, bool):
            return ByteSize(handler(value))
    except ValidationError:
        pass
    raise ValueError(f"{value!r} is not a size (bytes, or e.g. '512MiB', '16GiB')")


ByteCount = Annotated[ByteSize, WrapValidator(_size)]
"""A size in bytes as configured: an integer >= 0, or a string read by pydantic's ByteSize
('512MiB', '16GiB', '2GB', '1.5 GiB'; kb/mb/gb/tb are powers of 10, kib/mib/gib/tib of 2)."""
MemoryDevice = Literal["cpu", "cuda"]
"""What a memory budget is kept for: host RAM, or each GPU."""


class AutoscalingSettings(BaseModel):
    """Passed to Ray Serve's `autoscaling_config` as is."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, description="Idle time before the last replica goes.")
    metrics_interval_s: float | None = Field(None, gt=0, description="How often replicas report load (Ray default 10).")
    look_back_period_s: float | None = Field(None, gt=0, description="Window the load is averaged over (Ray default 30).")


MIN_ONGOING_FOR_CHANNELS = 4


class ModelSettings(BaseModel):
    """One served model: where its weights are, how it runs, and how much load it accepts."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=MODEL_ID_PATTERN, description="The model name clients send.")
    source: str = Field(min_length=1, description="Model directory, .gguf file, or pkg://package/file.gguf.")
    weights: WeightChoice = Field(
        "auto", description="Weight format; auto: what measures fastest on the host (reported in /models)."
    )
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    max_model_len: int = Field(2048, ge=16)
    max_num_seqs: int = Field(8, ge=1, description="Sequences run together in one step.")
    max_num_batched_tokens: int = Field(256, ge=1, description="Tokens per step: decodes first, then prompt chunks.")
    block_size: int = Field(16, ge=1, le=256, description="Token slots per KV-cache block.")
    kv_cache_bytes: ByteCount | None = Field(
        None, description="KV cache preallocated per replica ('128MiB'); unset: max_num_seqs full sequences, at most 256 MiB."
    )
    enable_prefix_caching: bool = True
    default_max_tokens: int = Field(256, ge=1)
    num_threads: int | None = Field(None, ge=1)
    stream_interval: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        1, description="Engine steps whose tokens one streamed event carries (vLLM's stream_interval; 1: every token as it "
        "comes); auto: every step, or every 2 while 8+ sequences run (fewer events, more tokens/s under load)."
    )
    chat_template: str | None = Field(None, description="Jinja chat template supplied or overriding the model's.")
    load_on_start: bool = True
    autoload: bool = Field(True, description="Load on the first request when unloaded (else 409).")
    keep_alive: Duration = Field(
        "5m", description="Unload after this long unused (seconds or '30s'/'5m'/'1h'; 0: after each request; -1: never)."
    )
    pinned: bool = Field(False, description="Never released for idleness or memory pressure.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica runs at once (engine queue incl.).")
    max_queued_requests: int = Field(64, ge=-1, description="Requests waiting for a replica; beyond: 503.")
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    channels: bool = Field(
        True, description="Stream the router's requests on a replica through one channel (one message per engine step, "
        "not per request); used with max_ongoing_requests >= 4 and no autoscaling (a channel holds one extra slot)."
    )
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs (or a fraction) each replica reserves.")
    pool: str | None = Field(None, description="Set for the members of a pool (from `pools`), not by hand.")
    base: str | None = Field(None, description="A LoRA adapter's base model (the adapter's directory is `source`).")

    @property
    def keep_alive_s(self) -> float | None:
        """Seconds; None: forever."""
        return parse_duration(self.keep_alive)

    @property
    def scales_to_zero(self) -> bool:
        """Ray Serve's autoscaler removes the last replica when idle (it is the idle release then)."""
        return self.autoscaling is not None and self.autoscaling.min_replicas == 0

    @property
    def uses_channels(self) -> bool:
        """Channels (serve_app.channels) for this model: an open channel is one more ongoing call on its
        replica (given as an extra slot), so not for small limits, and not where ongoing calls drive
        an autoscaler."""
        return self.channels and self.max_ongoing_requests >= MIN_ONGOING_FOR_CHANNELS and self.autoscaling is None and self.pool is None

    @property
    def memory_device(self) -> MemoryDevice:
        """The budget this model counts against: "cpu", or "cuda" (per GPU)."""
        return "cpu" if self.device == "cpu" else "cuda"

    @model_validator(mode="after")
    def _check_device(self) -> "ModelSettings":
        if self.device.startswith("cuda") and self.num_gpus <= 0:
            raise ValueError(f"device={self.device!r} needs num_gpus > 0 (got {self.num_gpus})")
        self.engine_config()  # the engine's own rules (e.g. kv_cache_bytes > 0), at start rather than at load
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.source,
            weights=self.weights,
            device=self.device,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size,
            kv_cache_bytes=int(self.kv_cache_bytes) if self.kv_cache_bytes is not None else None,
            enable_prefix_caching=self.enable_prefix_caching,
            num_threads=self.num_threads,
            stream_interval=self.stream_interval,
            chat_template=self.chat_template,
            default_max_tokens=self.default_max_tokens,
        )
