"""Stream interval: how many steps' tokens one output of a request carries (vLLM's `stream_interval`).

Every output that leaves the engine costs the serving path the same whatever it carries: a wakeup of
the serving loop, a channel frame, an SSE event rendered and written by the router, read and written
by HAProxy, read and parsed by the client. On a CPU host those processes share the cores with the
engine, so under load fewer, larger outputs are more tokens per second for everyone (10 streams of
SmolLM2 on a 2-core host, `auto` against 1 alternated in one run: +9% over HTTP, +3% in process; perf/README.md,
session 25).

`StreamInterval(n)` merges a request's outputs until they span `n` steps (the engine's default is 1: every
step). `auto` (0) streams every step while fewer than `AUTO_MIN_SEQS` sequences run, and every
`AUTO_INTERVAL` steps from there (~18 ms between a stream's outputs for SmolLM2 at 10 streams on 2 cores). A request's
first token (its TTFT) and its last output are never held, nor an output whose request its lane did not
step again (moved to the other lane, preempted or aborted): each lane's held outputs leave at its next
step or when it stops for lack of work. Thread-safe: each lane's thread calls `pace` after its steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from deployments.engine.request import RequestOutput

AUTO = 0
AUTO_MIN_SEQS = 8
AUTO_INTERVAL = 2
Deliver = Callable[[list[RequestOutput]], None]


def parse_stream_interval(value: int | str) -> int:
    """`"auto"` -> AUTO (0), a positive integer -> itself; anything else raises ValueError."""
    if value == "auto":
        return AUTO
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"stream_interval={value!r} must be 'auto' or a positive integer")
    return value


class StreamInterval:
    """Holds outputs back and merges them (see the module's docstring)."""

    def __init__(self, interval: int = AUTO) -> None:
        self.interval = interval
        self._held: dict[str, tuple[int, RequestOutput, int]] = {}  # request id -> (lane, merged output, steps in it)
        self._lock = threading.Lock()
        self.num_merged = 0  # outputs that left merged into a later one (stats)

    def steps_for(self, num_running: int) -> int:
        """Steps per output with this many sequences running."""
        if self.interval != AUTO:
            return self.interval
        return AUTO_INTERVAL if num_running >= AUTO_MIN_SEQS else 1

    def pace(self, lane: int, outputs: list[RequestOutput], num_running: int, deliver: Deliver) -> None:
        """Deliver what is due among this step's `outputs` of `lane` (and what the lane held and did not step)."""
        steps = self.steps_for(num_running)
        with self._lock:  # delivery too: a request moved between lanes keeps its order
            if steps == 1 and not self._held:
                deliver(outputs)
                return
            due: list[RequestOutput] = []
            stepped = set()
            for out in outputs:
                stepped.add(out.request_id)
                n = 1
                if (held := self._held.pop(out.request_id, None)) is not None:
                    out, n = held[1].then(out), held[2] + 1
                    self.num_merged += 1
                if n >= steps or out.finished or out.num_output_tokens <= 1:
                    due.append(out)
                else:
                    self._held[out.request_id] = (lane, out, n)
            for request_id, (held_lane, out, _) in list(self._held.items()):
                if held_lane == lane and request_id not in stepped:
                    del self._held[request_id]
                    due.append(out)
            if due:
                deliver(due)

    def flush(self, lane: int, deliver: Deliver) -> None:
        """Deliver everything `lane` holds (it is about to wait for work)."""
        if not self._held:
            return
        with self._lock:
            due = [self._held.pop(rid)[1] for rid, (held_lane, _, _) in list(self._held.items()) if held_lane == lane]
            if due:
                deliver(due)

    @property
    def num_held(self) -> int:
        return len(self._held)
