"""Replica-side metrics of one model, exported through Ray's metrics agent (Prometheus, dashboard).

Every series is named `llm_serve_*` (Ray prefixes `ray_` on export) and tagged with `model`; inside
a Ray Serve replica `ray.serve.metrics` adds `deployment`, `replica` and `application`. Without a
connected Ray (tests, scripts) every metric is a no-op, and Ray is never imported from here, so the
model server stays usable and testable without it.

Per request (recorded in-process, no RPC per token): queue time, time to first token, inter-token
latency, end-to-end latency, prompt and generated tokens. Sampled every `interval_s` by one asyncio
task while the replica lives: model state, resident bytes, running and waiting sequences, KV-cache use.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import weakref
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Histogram bucket boundaries, in seconds.
QUEUE_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5]
E2E_BUCKETS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]
LOAD_BUCKETS = [0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]
# attribute: (kind, name, description, histogram buckets)
SERIES: dict[str, tuple[str, str, str, list[float] | None]] = {
    "queue_time": ("Histogram", "llm_serve_request_queue_time_seconds",
                   "Seconds from the router handing a request to Ray Serve until its replica started it.", QUEUE_BUCKETS),
    "ttft": ("Histogram", "llm_serve_time_to_first_token_seconds",
             "Seconds from the router handing a request over to its first token (queue time included).", TTFT_BUCKETS),
    "itl": ("Histogram", "llm_serve_inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request (one observation per streamed output: its gap over its tokens).", ITL_BUCKETS),
    "e2e": ("Histogram", "llm_serve_e2e_request_latency_seconds",
            "Seconds from the router handing a request over to its last token (queue time included).", E2E_BUCKETS),
    "prompt_tokens": ("Counter", "llm_serve_prompt_tokens", "Prompt tokens of requests that produced output.", None),
    "generation_tokens": ("Counter", "llm_serve_generation_tokens", "Tokens generated.", None),
    "load_duration": ("Histogram", "llm_serve_model_load_duration_seconds", "Seconds each successful model load took.", LOAD_BUCKETS),
    "state": ("Gauge", "llm_serve_model_state", "1 for the model's current state on this replica, 0 for the other states.", None),
    "resident_bytes": ("Gauge", "llm_serve_model_resident_bytes",
                       "Bytes the loaded model holds (RSS growth across the load; CUDA allocated bytes on GPU).", None),
    "running": ("Gauge", "llm_serve_num_running_seqs", "Sequences the engine runs (in its batch).", None),
    "waiting": ("Gauge", "llm_serve_num_waiting_seqs", "Sequences waiting in the engine for a batch slot or KV blocks.", None),
    "kv_usage": ("Gauge", "llm_serve_kv_cache_usage_ratio", "Fraction of the KV-cache blocks in use (0 to 1).", None),
    "kv_used_blocks": ("Gauge", "llm_serve_kv_cache_used_blocks", "KV-cache blocks in use.", None),
}
# The wire request's field with the router's wall-clock time of handing it to Ray Serve.


class NoOpMetric:
    """Stands in for a Ray metric where no Ray is connected."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


def ray_metrics_module() -> Any | None:
    """`ray.serve.metrics` when this process is connected to Ray, else None (never imports Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray.serve import metrics

    return metrics


def make_metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries: list[float] | None = None) -> Any:
    """A Ray `Counter`, `Gauge` or `Histogram` (by `kind`), or a no-op without Ray."""
    module = ray_metrics_module()
    if module is None:
        return NoOpMetric()
    if kind == "Histogram":
        return module.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
    return getattr(module, kind)(name, description=description, tag_keys=tag_keys)


class Watched(Protocol):
    """What the sampler reads from the model server."""

    model_id: str
    state: Any  # an enum.Enum; its class lists every state
    resident_bytes: int
    engine: Any  # an AsyncLLMEngine or None


class ReplicaMetrics:
    """One model server's metrics; `request()` times a request, `watch()` starts the sampler."""

    queue_time: Any
    ttft: Any
    itl: Any
    e2e: Any
    prompt_tokens: Any
    generation_tokens: Any
    load_duration: Any
    state: Any
    resident_bytes: Any
    running: Any
    waiting: Any
    kv_usage: Any
    kv_used_blocks: Any

    def __init__(self, server: Watched, interval_s: float = 1.0) -> None:
        self._server = weakref.ref(server)
        self.tags = {"model": server.model_id}
        self.interval_s = interval_s
        self.enabled = ray_metrics_module() is not None
        self._sampler: asyncio.Task[None] | None = None
        for attr, (kind, name, description, buckets) in SERIES.items():
            tag_keys = ("model", "state") if attr == "state" else ("model",)
            setattr(self, attr, make_metric(kind, name, description, tag_keys, buckets))

    # --- events ------------------------------------------------------------------------------
    def request(self, request: Any) -> RequestTimer:
        """Start timing a request the replica accepted (a `GenerateRequest`: records its queue time)."""
        self.watch()
        sent_at = getattr(request, "sent_at", None)
        queued_s = max(0.0, time.time() - float(sent_at)) if isinstance(sent_at, (int, float)) else 0.0
        if sent_at is not None:
            self.queue_time.observe(queued_s, tags=self.tags)
        return RequestTimer(self, queued_s)

    def loaded(self, load_time_s: float) -> None:
        self.load_duration.observe(load_time_s, tags=self.tags)

    # --- sampled gauges ----------------------------------------------------------------------
    def watch(self) -> None:
        """Start the sampler on the running event loop, once (a no-op without Ray or a loop)."""
        if not self.enabled or (self._sampler is not None and not self._sampler.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sampler = loop.create_task(self._sample_forever())

    async def _sample_forever(self) -> None:
        while (server := self._server()) is not None:
            try:
                self.sample(server)
            except Exception:  # noqa: BLE001 - a failed sample must not stop the next ones
                logger.exception("sampling metrics of %s failed", self.tags["model"])
            del server  # hold no reference while sleeping
            await asyncio.sleep(self.interval_s)

    def sample(self, server: Watched) -> None:
        """Set the gauges from the server and its engine's stats (cheap reads, no locks)."""
        for state in type(server.state):
            self.state.set(1.0 if state is server.state else 0.0, tags=self.tags | {"state": str(state.value)})
        self.resident_bytes.set(float(server.resident_bytes), tags=self.tags)
        engine = server.engine
        stats = engine.engine.stats() if engine is not None else {}
        num_blocks = stats.get("num_blocks", 0)
        self.running.set(float(stats.get("num_running", 0)), tags=self.tags)
        self.waiting.set(float(stats.get("num_waiting", 0)), tags=self.tags)
        self.kv_used_blocks.set(float(stats.get("num_used_blocks", 0)), tags=self.tags)
        self.kv_usage.set(stats.get("num_used_blocks", 0) / num_blocks if num_blocks else 0.0, tags=self.tags)


class RequestTimer:
    """One request's timings: `output()` for every engine output, `finish()` once at the end."""

    def __init__(self, metrics: ReplicaMetrics, queued_s: float) -> None:
        self.metrics = metrics
        self.queued_s = queued_s
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.last_at = self.started
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0

    def output(self, out: Any) -> None:
        """Record an engine `RequestOutput` (it may carry several tokens when the consumer lagged)."""
        now, num_new = time.monotonic(), len(out.new_token_ids)
        m = self.metrics
        if self.first_at is None:
            self.first_at = now
            m.ttft.observe(self.queued_s + now - self.started, tags=m.tags)
        elif num_new:  # one observation per output: the gap spread over the tokens it carries
            m.itl.observe((now - self.last_at) / num_new, tags=m.tags)
        self.last_at = now
        self.num_prompt_tokens, self.num_output_tokens = out.num_prompt_tokens, out.num_output_tokens

    def finish(self) -> None:
        """End-to-end latency and token counts; nothing for a request that produced no output."""
        if self.first_at is None:
            return
        m = self.metrics
        m.e2e.observe(self.queued_s + self.last_at - self.started, tags=m.tags)
        if self.num_prompt_tokens:  # Ray counters take only positive increments
            m.prompt_tokens.inc(self.num_prompt_tokens, tags=m.tags)
        if self.num_output_tokens:
            m.generation_tokens.inc(self.num_output_tokens, tags=m.tags)
