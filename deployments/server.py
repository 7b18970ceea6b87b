"""The model server: an ordinary class (Ray Serve decorates it in serve_app.app) owning one engine.

It turns wire requests (deployments.protocol) into engine requests and engine outputs into chunks,
loads and unloads the engine, and measures what the loaded model holds. Tests build it with no Ray.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import torch

from deployments.engine import AsyncLLMEngine, EngineConfig, SamplingParams
from deployments.engine.async_engine import EngineDeadError
from deployments.engine.adapter_loader import AdapterError
from deployments.engine.estimate import MemoryEstimate, estimate_memory
from deployments.engine.request import InvalidRequestError
from deployments.channel import ChannelRegistry
from deployments.errors import BadRequestError, ModelLoadingError, ModelNotLoadedError, ModelUnloadingError, ServiceUnavailableError
from deployments.protocol import ChannelBatch, Chunk, GenerateRequest, ReplicaStatus, Routed
from deployments.memory import allocator, ensure_fits, gpu_memory, load_footprint, purge_freed_pages, release_freed_memory, rss_bytes
from deployments.metrics import ReplicaMetrics
from deployments.sinks import channel_sink, channel_thread_sink, to_chunk

logger = logging.getLogger(__name__)


class ModelStatus(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


DRAIN_POLL_S = 0.05


class ModelServer:
    """Serves one model: load/unload/status and streaming generation.

    Its state follows `unloaded -> loading -> loaded -> unloading -> unloaded` (or `failed`, with the
    reason). `reconfigure(user_config)` sets the wanted state; Ray Serve calls it on every replica.
    """

    def __init__(
        self,
        model_id: str,
        engine_config: dict[str, Any] | EngineConfig,
        load_on_start: bool = True,
        engine_cls: Callable[[EngineConfig], AsyncLLMEngine] = AsyncLLMEngine,
        drain_timeout_s: float = 300.0,
    ) -> None:
        self.model_id = model_id
        self.config = engine_config if isinstance(engine_config, EngineConfig) else EngineConfig(**engine_config)
        self.engine_cls = engine_cls
        self.engine: AsyncLLMEngine | None = None
        self.state = ModelStatus.UNLOADED
        self.error: str | None = None
        self.facts: dict[str, Any] = {}  # what the last load learned: architecture, quantization, ...
        self.resident_bytes = 0
        self.measured_bytes: int | None = None  # the last load's footprint, kept after unload
        self.last_used: float | None = None
        self.drain_timeout_s = drain_timeout_s
        self.epoch = 0  # of the last user_config applied
        self.num_loads = 0  # loads started in this replica (a concurrent /load must not add one)
        self._estimate: MemoryEstimate | None = None
        self._lock: asyncio.Lock | None = None
        self.metrics = ReplicaMetrics(self)  # exported through Ray; no-ops without it
        self.replica_name = "local"  # Ray Serve's replica id when deployed (serve_app.app sets it)
        self.channels = ChannelRegistry()  # closed with `channels.close_all()` when this server is done
        if load_on_start:
            self._load_sync()

    # --- lifecycle ---------------------------------------------------------------------------
    async def load(self) -> ReplicaStatus:
        """Load the model if it is not loaded; concurrent calls share one load."""
        async with self._transition_lock():
            if self.state is not ModelStatus.LOADED:
                self.state = ModelStatus.LOADING
                await asyncio.to_thread(self._load_sync)
        return self.status()

    async def unload(self, force: bool = False, reason: str = "manual") -> ReplicaStatus:
        """Stop serving and free the weights. New requests get 503 from now on; requests in flight
        finish first (drain, up to `drain_timeout_s`) unless `force`, which ends them at once with
        an error event."""
        async with self._transition_lock():
            if self.engine is not None:
                self.state = ModelStatus.UNLOADING
                if not force:
                    await self._drain(self.engine)
                engine, self.engine = self.engine, None
                await asyncio.to_thread(self._release, engine)
                logger.info("released %s (reason: %s, force: %s)", self.model_id, reason, force)
            self.state, self.error = ModelStatus.UNLOADED, None
        return self.status()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the wanted state `{"loaded": bool, "force": bool, "reason": str, "epoch": int}`."""
        if user_config.get("loaded", True):
            await self.load()
        else:
            await self.unload(force=bool(user_config.get("force")), reason=str(user_config.get("reason", "manual")))
        self.epoch = int(user_config.get("epoch", self.epoch))

    async def _drain(self, engine: AsyncLLMEngine) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while engine.num_requests and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    def _load_sync(self) -> None:
        self.state = ModelStatus.LOADING
        self.num_loads += 1
        started, rss_before = time.monotonic(), rss_bytes()
        try:  # a load that cannot fit is refused before it allocates (deployments/memory.py)
            ensure_fits(lambda: self.measured_bytes or self.estimate().total_bytes, self.config.device, repr(self.model_id))
            engine = self.engine_cls(self.config)
        except Exception as exc:  # noqa: BLE001 - a failed load is a state the API reports, not a crash
            logger.exception("loading %s failed", self.model_id)
            self.state, self.error = ModelStatus.FAILED, f"{type(exc).__name__}: {exc}"
            release_freed_memory()
            return
        core = engine.engine
        engine.on_idle = purge_freed_pages  # freed pages go back when idle, not between steps (deployments/memory.py)
        release_freed_memory()  # the load's transient buffers (fp32 tensors read, packing) go back first
        self.facts = {
            "architecture": core.runner.architecture,
            "quantization": core.runner.quantization,
            "weights": core.runner.weights,
            "weights_reason": core.runner.weights_reason,
            "implementation": core.runner.facts.get("implementation"),
            "context_length": core.max_model_len,
            "has_chat_template": core.has_chat_template,
            "weights_bytes": core.runner.weights_bytes(),
            "load_time_s": round(time.monotonic() - started, 3),
        }
        self.resident_bytes = self.measured_bytes = load_footprint(self.config.device, rss_before)
        self.metrics.loaded(self.facts["load_time_s"])
        self.engine, self.state, self.error = engine, ModelStatus.LOADED, None
        logger.info("loaded %s in %.1fs, %d resident bytes", self.model_id, self.facts["load_time_s"], self.resident_bytes)

    def _release(self, engine: AsyncLLMEngine) -> None:
        engine.shutdown()
        del engine
        release_freed_memory()
        if self.config.device.startswith("cuda"):
            torch.cuda.empty_cache()  # give the allocator's cached blocks back: reserved bytes fall too
        self.resident_bytes = 0

    def _transition_lock(self) -> asyncio.Lock:
        if self._lock is None:  # created lazily: it must belong to the serving event loop
            self._lock = asyncio.Lock()
            self.metrics.watch()  # the gauges' sampler, on the same loop
        return self._lock

    def estimate(self) -> MemoryEstimate:
        """What a load is expected to hold (read once from the files' headers)."""
        if self._estimate is None:
            self._estimate = estimate_memory(self.config)
        return self._estimate

    def memory_need(self) -> int:
        """Bytes to budget for this model: the measured footprint of its last load if there was one
        (else the estimate of weights and overhead), plus the KV-cache reservation."""
        estimate = self.estimate()
        base = self.measured_bytes if self.measured_bytes is not None else estimate.weights_bytes + estimate.overhead_bytes
        return base + estimate.kv_cache_bytes

    def status(self) -> ReplicaStatus:
        engine = self.engine
        try:
            estimate: dict[str, int] | None = self.estimate().to_dict() | {"need_bytes": self.memory_need()}
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("cannot estimate %s's memory: %s", self.model_id, exc)
            estimate = None
        return ReplicaStatus(
            id=self.model_id,
            status=self.state.value,
            error=self.error,
            architecture=self.facts.get("architecture"),
            quantization=self.facts.get("quantization"),
            weights=self.facts.get("weights") if engine else None,
            weights_reason=self.facts.get("weights_reason") if engine else None,
            implementation=self.facts.get("implementation") if engine else None,
            kv_cache=engine.engine.stats() | {"outputs_merged": engine.pacing.num_merged} if engine else None,
            context_length=self.facts.get("context_length", self.config.max_model_len),
            has_chat_template=self.facts.get("has_chat_template") if engine else None,
            resident_memory_bytes=self.resident_bytes,
            weights_bytes=self.facts.get("weights_bytes", 0) if engine else 0,
            process_rss_bytes=rss_bytes(),
            load_time_s=self.facts.get("load_time_s"),
            last_used=self.last_used,
            num_running_requests=engine.num_requests if engine else 0,
            max_num_seqs=self.config.max_num_seqs,
            stream_interval=self.config.stream_interval,
            num_threads=torch.get_num_threads(),
            device=self.config.device,
            memory_estimate=estimate,
            measured_bytes=self.measured_bytes,
            gpu_memory=gpu_memory(self.config.device) if self.config.device.startswith("cuda") else None,
            epoch=self.epoch,
            num_loads=self.num_loads,
            pid=os.getpid(),
            allocator=allocator(),
        )

    # --- generation --------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest, adapter: str | None = None) -> AsyncIterator[Chunk | Routed]:
        """Stream `Chunk`s; the last has a finish_reason and usage. Bad requests raise before the
        first chunk. `adapter`: a LoRA adapter loaded into this engine (deployments.pool).
        A request that names channels (`request.channels` not None) gets `Routed` first; if one of
        them is open here its chunks go through that channel and this stream carries nothing more."""
        engine = self._require_loaded()
        self.last_used = time.time()
        timer = self.metrics.request(request)
        if request.channels is not None and self.channels.listener is None:
            await self.channels.listen(self.replica_name)
        channel = self.channels.find(request.channels)
        if channel is not None:
            channel.num_running += 1
        # alone, its own stream is one hop shorter than a channel that is a Ray call (not than a socket)
        via_channel = channel is not None and (channel.local or channel.num_running > 1)
        request_id = ""
        try:
            prompt_ids = engine.engine.encode(request.prompt, request.messages)
            fields = dict(request.params)
            fields["stop"] = tuple(fields.get("stop") or ())
            fields["max_tokens"] = engine.engine.resolve_max_tokens(len(prompt_ids), fields.get("max_tokens"))
            params = SamplingParams(**fields)
            request_id = request.request_id or engine.next_request_id()
            # Through a channel, each step's output goes straight in (no wakeup of this generator per token).
            sink = channel_sink(channel, request_id, timer) if via_channel and channel is not None else None
            # through a socket, from the engine thread: the serving loop wakes for the last output only
            thread_sink = channel_thread_sink(channel, request_id, timer) if sink is not None and channel.local else None
            outputs = engine.generate(request_id, prompt_ids, params, adapter, sink=sink, thread_sink=thread_sink)
            async with aclosing(outputs):  # closed (and the engine request aborted) even when we are closed at a yield
                if request.channels is not None:
                    yield Routed(self.replica_name, via_channel, self.channels.path)
                async for out in outputs:
                    if sink is not None:
                        sink(out)
                        continue
                    timer.output(out)
                    yield to_chunk(out)
        except InvalidRequestError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None
        except AdapterError as exc:
            raise ModelNotLoadedError(str(exc), param="model", code="adapter_not_loaded") from None
        except EngineDeadError as exc:
            raise ModelUnloadingError(f"model {self.model_id!r}: {exc}", code="model_unloaded") from None
        finally:
            if channel is not None:
                channel.num_running -= 1
                channel.end_handoff(request_id)  # ended early (aborted, failed): its connection is closed here
            self.last_used = time.time()
            timer.finish()

    async def subscribe(self, channel_id: str, replica: str) -> AsyncIterator[Routed | ChannelBatch]:
        """A caller's channel to this replica (deployments.channel): `Routed` once open, then batches
        of its requests' chunks until the caller closes it. `replica`: the replica the caller meant
        (Ray Serve may hand the call to another one; that one refuses it)."""
        if replica != self.replica_name:
            raise ServiceUnavailableError(f"channel for replica {replica!r} reached {self.replica_name!r}", code="wrong_replica")
        channel = self.channels.open(channel_id)
        try:
            yield Routed(self.replica_name, True)
            async for batch in channel.batches():
                yield batch
        finally:
            self.channels.close(channel_id, channel)

    def _require_loaded(self) -> AsyncLLMEngine:
        if self.engine is not None and self.state is ModelStatus.LOADED:
            return self.engine
        if self.state is ModelStatus.LOADING:
            raise ModelLoadingError(f"model {self.model_id!r} is loading")
        if self.state is ModelStatus.UNLOADING:
            raise ModelUnloadingError(f"model {self.model_id!r} is unloading")
        detail = f" (last load failed: {self.error})" if self.error else ""
        raise ModelNotLoadedError(
            f"model {self.model_id!r} is {self.state.value}{detail}; POST /load to load it", param="model", code="model_not_loaded"
        )
