"""An asyncio face for the engine: one background thread per lane runs `step(lane)` (engine/lanes.py: one
thread, or two where lanes apply); each request gets a queue.

Requests and aborts are handed to lane 0's thread through a thread-safe inbox and applied between its
steps. Leaving `generate()` early (the client went away) aborts the request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from deployments.engine.config import EngineConfig
from deployments.engine.engine import LLMEngine
from deployments.engine.request import InvalidRequestError, RequestOutput, SamplingParams
from deployments.engine.stream_interval import StreamInterval, parse_stream_interval


log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_S = 1.0
"""How long the engine thread waits for work before it counts as idle (and runs `on_idle`)."""
STALL_S = 0.005
"""How long a lane with work but nothing schedulable (its blocks held by the other lane) waits to look again."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (it crashed or was shut down); in-flight requests cannot finish."""


@dataclass(frozen=True)
class ThreadSink:
    """Takes a request's outputs, all but the last, on the engine thread that made them, as its step
    ends: `item(output)` for each, then `flush(items)` once per step with the items of every request
    that shares that `flush` (a channel's one write per step; no wakeup of the serving loop)."""

    item: Callable[[RequestOutput], Any]
    flush: Callable[[list[Any]], None]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    sink: Callable[[RequestOutput], None] | None = None
    thread_sink: ThreadSink | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    """On the serving loop: each output to its request's sink if it has one (the last output, and a
    sink's error, still go through the queue and so wake the request's generator), else its queue."""
    for stream, output in items:
        if stream.sink is None or output.finished:
            stream.queue.put_nowait(output)
            continue
        try:
            stream.sink(output)
        except Exception as exc:  # noqa: BLE001 - the request's own generator raises it
            stream.queue.put_nowait(exc)


def _coalesce(
    first: RequestOutput | BaseException, pending: asyncio.Queue[RequestOutput | BaseException]
) -> tuple[RequestOutput | None, BaseException | None]:
    """Merge every output already waiting into one, so a consumer that fell behind gets one chunk
    (one SSE event, one hop per process) instead of many. Returns (merged output, error after it)."""
    if isinstance(first, BaseException):
        return None, first
    merged = first
    while not merged.finished and not pending.empty():
        nxt = pending.get_nowait()
        if isinstance(nxt, BaseException):
            return merged, nxt
        merged = merged.then(nxt)
    return merged, None


class AsyncLLMEngine:
    """Drives an `LLMEngine` from a background thread and streams its outputs to coroutines."""

    def __init__(self, config: EngineConfig, engine_factory: Callable[[EngineConfig], LLMEngine] = LLMEngine) -> None:
        self._inbox: queue.SimpleQueue[tuple[str, tuple]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._config, self._engine_factory = config, engine_factory
        self.engine: LLMEngine
        self.pacing = StreamInterval(parse_stream_interval(config.stream_interval))  # steps per output
        self.on_idle: Callable[[], None] | None = None
        """Called on the engine thread once per idle spell: after some work, IDLE_S with none (the
        replica gives freed heap pages back to the OS then, never between steps)."""
        # The loop thread builds the engine and runs lane 0, the only lane that ever runs torch on more
        # than one thread, so the process has one OpenMP thread pool. A second pool (load on one thread,
        # steps on another) makes libgomp count more threads than cores and stop spinning between parallel
        # regions: SmolLM2 int4 went from 16 to 27 ms per single-stream step (perf/README.md).
        self._lane_threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
        sink: Callable[[RequestOutput], None] | None = None, thread_sink: ThreadSink | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs as they are produced; the last one has a finish_reason.
        With a `sink`, every output but the last is handed to it on the serving loop instead (this
        generator then wakes once, not once per step; an error the sink raises ends it); with a
        `thread_sink`, to that on the engine thread."""
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        self.engine.validate(prompt_token_ids, params)  # raise before anything is queued
        if request_id in self._streams:  # two streams under one id would take each other's tokens
            raise InvalidRequestError(f"request id {request_id!r} is already running", param="request_id")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), sink, thread_sink)
        self._streams[request_id] = stream
        self._send("add", request_id, prompt_token_ids, params, adapter)
        finished = False
        try:
            while not finished:
                item, error = _coalesce(await stream.queue.get(), stream.queue)
                if item is not None:
                    finished = item.finished
                    yield item
                if error is not None:
                    raise error
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread between steps (e.g. `engine.add_adapter`)."""
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send("call", fn, args, future)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the loop thread, end every open stream with `EngineDeadError`, free the engine."""
        self._stopped = True
        for event in self.engine.lanes.wakeups:
            event.set()
        self._thread.join(timeout=60)
        for thread in self._lane_threads:
            thread.join(timeout=60)
        self._fail_all(EngineDeadError("the model was unloaded while this request was running"))
        self.engine.release()

    # --- engine thread -----------------------------------------------------------------------
    def _send(self, command: str, *args: object) -> None:
        self._inbox.put((command, args))
        self._wakeup.set()

    def _build(self) -> bool:
        try:
            self.engine = self._engine_factory(self._config)
            self.engine.warm_up()  # weights paged in before traffic
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._load_error = exc
            return False
        finally:
            self._ready.set()
        return True

    def _run(self) -> None:
        if not self._build():
            return
        lanes = self.engine.lanes
        lanes.wakeups[0] = self._wakeup  # _send wakes lane 0, which drains the inbox
        lanes.threaded = lanes.num_lanes > 1
        for lane in range(1, lanes.num_lanes):  # engine/lanes.py: one thread per lane, each at one torch thread
            thread = threading.Thread(target=self._run_lane, args=(lane,), name=f"engine-lane-{lane}", daemon=True)
            self._lane_threads.append(thread)
            thread.start()
        self._run_lane(0)

    def _run_lane(self, lane: int) -> None:
        lanes, worked = self.engine.lanes, False
        wakeup = lanes.wakeups[lane]
        try:
            while not self._stopped:
                if lane == 0:
                    self._drain_inbox()
                if not lanes.has_work(lane) or lanes.stalled[lane]:
                    self.pacing.flush(lane, self._deliver)
                    woke = wakeup.wait(timeout=STALL_S if lanes.stalled[lane] else IDLE_S)
                    wakeup.clear()
                    lanes.stalled[lane] = False
                    if not woke and worked and lane == 0 and not self.engine.has_unfinished() and (hook := self.on_idle) is not None:
                        worked = False
                        self._idle(hook)
                    continue
                worked = True
                outputs = self.engine.step(lane)
                self.pacing.pace(lane, outputs, lanes.num_running(), self._deliver)
        except Exception as exc:  # noqa: BLE001 - a crashed step must reach every waiting request
            self._stopped = True
            for event in lanes.wakeups:
                event.set()
            self._fail_all(EngineDeadError(f"engine step failed: {exc!r}"))

    def _idle(self, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:  # noqa: BLE001 - housekeeping must not stop the engine
            log.exception("the engine's idle hook failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Outputs for thread sinks go to them here, one flush per sink target; the rest in one hand-over
        per event loop (one wakeup of the serving loop per step, not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        by_flush: dict[Callable[[list[Any]], None], tuple[list[Any], list[_Stream]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            sink = stream.thread_sink
            if sink is None or output.finished:
                by_loop.setdefault(stream.loop, []).append((stream, output))
                continue
            items, streams = by_flush.setdefault(sink.flush, ([], []))
            try:
                items.append(sink.item(output))
                streams.append(stream)
            except Exception as exc:  # noqa: BLE001 - the request's own generator raises it
                stream.put(exc)
        for flush, (items, streams) in by_flush.items():
            try:
                flush(items)
            except Exception as exc:  # noqa: BLE001 - each of these requests' generators raises it
                for stream in streams:
                    stream.put(exc)
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                request_id = args[0]
                try:
                    self.engine.add_request(*args)  # type: ignore[arg-type]
                except Exception as exc:  # noqa: BLE001 - hand the error to its own request only
                    stream = self._streams.get(request_id)  # type: ignore[call-overload]
                    if stream is not None:
                        stream.put(exc)
            elif command == "call":
                fn, fn_args, future = args
                try:
                    future.set_result(fn(*fn_args))  # type: ignore[operator]
                except Exception as exc:  # noqa: BLE001 - raised in the caller
                    future.set_exception(exc)  # type: ignore[union-attr]
            else:
                self.engine.abort(*args)  # type: ignore[arg-type]

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.put(error)
