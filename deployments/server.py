"""The model server: an ordinary class (Ray Serve decorates it in serve_app.app) owning one engine.

It turns wire requests (plain dicts) into engine requests and engine outputs into chunk dicts,
loads and unloads the engine, and measures what the loaded model holds. Tests build it with no Ray.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from deployments.engine import AsyncLLMEngine, EngineConfig, SamplingParams
from deployments.engine.async_engine import EngineDeadError
from deployments.engine.request import InvalidRequestError
from deployments.errors import BadRequestError, ModelNotLoadedError, ServiceUnavailableError
from deployments.memory import release_freed_memory, rss_bytes

logger = logging.getLogger(__name__)


class ModelStatus(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class ModelServer:
    """Serves one model: load/unload/status and streaming generation."""

    def __init__(
        self,
        model_id: str,
        engine_config: dict[str, Any] | EngineConfig,
        load_on_start: bool = True,
        engine_cls: Callable[[EngineConfig], AsyncLLMEngine] = AsyncLLMEngine,
    ) -> None:
        self.model_id = model_id
        self.config = engine_config if isinstance(engine_config, EngineConfig) else EngineConfig(**engine_config)
        self.engine_cls = engine_cls
        self.engine: AsyncLLMEngine | None = None
        self.state = ModelStatus.UNLOADED
        self.error: str | None = None
        self.facts: dict[str, Any] = {}  # what the last load learned: architecture, quantization, ...
        self.resident_bytes = 0
        self.last_used: float | None = None
        self._lock: asyncio.Lock | None = None
        if load_on_start:
            self._load_sync()

    # --- lifecycle ---------------------------------------------------------------------------
    async def load(self) -> dict[str, Any]:
        """Load the model if it is not loaded; concurrent calls share one load."""
        async with self._transition_lock():
            if self.state is not ModelStatus.LOADED:
                self.state = ModelStatus.LOADING
                await asyncio.to_thread(self._load_sync)
        return self.status()

    async def unload(self) -> dict[str, Any]:
        """Stop the engine (open streams end with an error event) and free the weights."""
        async with self._transition_lock():
            if self.engine is not None:
                self.state = ModelStatus.UNLOADING
                engine, self.engine = self.engine, None
                await asyncio.to_thread(self._release, engine)
            self.state, self.error = ModelStatus.UNLOADED, None
        return self.status()

    def _load_sync(self) -> None:
        self.state = ModelStatus.LOADING
        started, rss_before = time.monotonic(), rss_bytes()
        try:
            engine = self.engine_cls(self.config)
        except Exception as exc:  # noqa: BLE001 - a failed load is a state the API reports, not a crash
            logger.exception("loading %s failed", self.model_id)
            self.state, self.error = ModelStatus.FAILED, f"{type(exc).__name__}: {exc}"
            release_freed_memory()
            return
        core = engine.engine
        self.facts = {
            "architecture": (core.runner.model.config.architectures or [type(core.runner.model).__name__])[0],
            "quantization": core.runner.quantization,
            "context_length": core.max_model_len,
            "has_chat_template": core.has_chat_template,
            "weights_bytes": core.runner.weights_bytes(),
            "load_time_s": round(time.monotonic() - started, 3),
        }
        self.resident_bytes = max(0, rss_bytes() - rss_before)
        self.engine, self.state, self.error = engine, ModelStatus.LOADED, None
        logger.info("loaded %s in %.1fs, %d resident bytes", self.model_id, self.facts["load_time_s"], self.resident_bytes)

    def _release(self, engine: AsyncLLMEngine) -> None:
        engine.shutdown()
        del engine
        release_freed_memory()
        self.resident_bytes = 0

    def _transition_lock(self) -> asyncio.Lock:
        if self._lock is None:  # created lazily: it must belong to the serving event loop
            self._lock = asyncio.Lock()
        return self._lock

    def status(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "id": self.model_id,
            "status": self.state.value,
            "error": self.error,
            "architecture": self.facts.get("architecture"),
            "quantization": self.facts.get("quantization"),
            "context_length": self.facts.get("context_length", self.config.max_model_len),
            "has_chat_template": self.facts.get("has_chat_template") if engine else None,
            "resident_memory_bytes": self.resident_bytes,
            "weights_bytes": self.facts.get("weights_bytes", 0) if engine else 0,
            "process_rss_bytes": rss_bytes(),
            "load_time_s": self.facts.get("load_time_s"),
            "last_used": self.last_used,
            "num_running_requests": engine.num_requests if engine else 0,
            "max_num_seqs": self.config.max_num_seqs,
            "num_threads": torch.get_num_threads(),
        }

    # --- generation --------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream chunk dicts `{text, token_ids, finish_reason, usage}`; the last has a finish_reason.

        `request` is `{"prompt": str} or {"messages": [...]}` plus `"params"` (SamplingParams fields,
        `max_tokens` may be None). Bad requests raise before the first chunk.
        """
        engine = self._require_loaded()
        self.last_used = time.time()
        try:
            prompt_ids = engine.engine.encode(request.get("prompt"), request.get("messages"))
            fields = dict(request.get("params") or {})
            fields["stop"] = tuple(fields.get("stop") or ())
            fields["max_tokens"] = engine.engine.resolve_max_tokens(len(prompt_ids), fields.get("max_tokens"))
            params = SamplingParams(**fields)
            request_id = str(request.get("request_id") or engine.next_request_id())
            async for out in engine.generate(request_id, prompt_ids, params):
                chunk: dict[str, Any] = {"text": out.text, "token_ids": out.new_token_ids, "finish_reason": None}
                if out.finished:
                    chunk["finish_reason"] = out.finish_reason.value if out.finish_reason else None
                    chunk["usage"] = {
                        "prompt_tokens": out.num_prompt_tokens,
                        "completion_tokens": out.num_output_tokens,
                        "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
                    }
                yield chunk
        except InvalidRequestError as exc:
            raise BadRequestError(str(exc), param=exc.param) from None
        except EngineDeadError as exc:
            raise ServiceUnavailableError(f"model {self.model_id!r}: {exc}", code="model_unloaded") from None
        finally:
            self.last_used = time.time()

    def _require_loaded(self) -> AsyncLLMEngine:
        if self.engine is not None and self.state is ModelStatus.LOADED:
            return self.engine
        if self.state in (ModelStatus.LOADING, ModelStatus.UNLOADING):
            raise ServiceUnavailableError(f"model {self.model_id!r} is {self.state.value}", code="model_" + self.state.value)
        detail = f" (last load failed: {self.error})" if self.error else ""
        raise ModelNotLoadedError(
            f"model {self.model_id!r} is {self.state.value}{detail}; POST /load to load it", param="model", code="model_not_loaded"
        )
