"""Lanes: the engine's running sequences split over two schedulers that step independently, each on its
own thread with torch at one thread, over one set of weights and one KV pool.

Why: a step's kernels are short parallel regions (a projection at 10 rows is 20-120 us), each ending at
a barrier. When another process takes one of the two cores (through Ray Serve: the router, HAProxy, the
client, Ray's own processes), the other thread waits at the next barrier for as long: one batch over
both threads lost 2.2x the CPU taken, OpenVINO 1.0x (perf/bench_preemption.py, perf/README.md session
23). Two lanes never wait for each other: a preempted lane stalls only itself, and neither idles through
the other's scheduling, sampling and detokenizing.

How: lane 0 admits every request (its waiting queue is the engine's). Each lane, at its own step
boundary and under `LaneSet.lock`, takes the sequences the other lane handed it and hands over what
balance asks: with at least `LANE_MIN_SEQS` active sequences the lanes split them evenly; below
`LANE_MIN_SEQS - 2` lane 1 hands everything back and lane 0 runs one batch over every thread (one
stream needs both threads for its latency). A sequence changes lanes only between its steps, with its
blocks: the pool and its prefix cache are shared. Lanes apply on CPU where every projection is one of
our kernels' (`decode_layers`: int4, group-wise int8), with or without LoRA adapters; elsewhere the set has
one lane.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from deployments.engine import kernels
from deployments.engine.request import FinishReason, Sequence, SequenceStatus
from deployments.engine.scheduler import Scheduler, SchedulerOutput

LANE_MIN_SEQS = int(os.environ.get("LLM_SERVE_LANE_MIN_SEQS", "8"))
"""Lanes split at this many active sequences and join again below it minus 2 (LLM_SERVE_LANE_MIN_SEQS; 0: never)."""


def lanes_apply(runner: Any) -> bool:
    """Two lanes where they pay: CPU, our kernels built, a native model whose projections are all our
    kernels' (bf16 layers' matmuls want both threads), 2+ threads. LoRA too: each thread's step carries
    its own adapter batch (LoRAManager.set_batch)."""
    if LANE_MIN_SEQS <= 0 or runner.device.type != "cpu":
        return False
    if kernels.cpu_kernels() is None or torch.get_num_threads() < 2 or not getattr(runner.model, "_fusable", False):
        return False
    return runner.model._decode_plan() is not None


class LaneSet:
    """The engine's schedulers (one, or two lanes over one BlockManager) and what moves sequences between
    them. Every call is made under `lock` by the lane named, at its step boundary."""

    def __init__(self, schedulers: list[Scheduler], threads: int, min_seqs: int = LANE_MIN_SEQS) -> None:
        self.schedulers = schedulers
        self.threads = threads  # torch threads of a step run alone (lane 0 while not split)
        self.min_seqs = min_seqs
        self.max_num_seqs = schedulers[0].max_num_seqs
        self.lock = threading.Lock()
        self.incoming: list[list[Sequence]] = [[] for _ in schedulers]  # handed over, taken at the lane's next step
        self.wakeups = [threading.Event() for _ in schedulers]
        self.busy = [False] * len(schedulers)  # a step scheduled and not yet updated
        self.stalled = [False] * len(schedulers)  # work left, none schedulable (blocks held by the other lane)
        self.split = False
        self.threaded = False  # set by a driver that runs each lane on a thread of its own (AsyncLLMEngine)
        self.num_split_steps = 0  # steps run while split (/models: kv_cache.lane_steps)

    @property
    def num_lanes(self) -> int:
        return len(self.schedulers)

    def num_active(self, lane: int) -> int:
        return len(self.schedulers[lane].running) + len(self.incoming[lane])

    def num_running(self) -> int:
        return sum(self.num_active(lane) for lane in range(self.num_lanes))

    def num_unfinished(self) -> int:
        return sum(s.num_unfinished for s in self.schedulers) + sum(len(i) for i in self.incoming)

    def has_work(self, lane: int) -> bool:
        return self.schedulers[lane].num_unfinished > 0 or bool(self.incoming[lane])

    def begin(self, lane: int) -> Scheduler:
        """At lane's step boundary: take what was handed over, balance, set this thread's torch threads."""
        scheduler = self.schedulers[lane]
        if self.num_lanes == 1 or not self.threaded:  # one thread driving both lanes in turn: one batch is faster
            return scheduler
        self._take_incoming(lane)
        other = 1 - lane
        active = self.num_active(0) + self.num_active(1)
        if active >= self.min_seqs:
            self.split = True
        elif active < self.min_seqs - 2:
            self.split = False
        if not self.split and lane == 1:
            self._hand_over(1, 0, list(scheduler.running), list(scheduler.waiting))
        elif self.split:
            surplus = (self.num_active(lane) - self.num_active(other)) // 2
            if surplus > 0:
                self._hand_over(lane, other, scheduler.running[-surplus:], [])
            if lane == 1 and scheduler.waiting:  # preempted here: lane 0 admits
                self._hand_over(1, 0, [], list(scheduler.waiting))
        alone = lane == 0 and not self.split and not self.busy[1] and not self.has_work(1)
        threads = self.threads if alone else 1
        if torch.get_num_threads() != threads:  # per thread: each lane's thread keeps its own count
            torch.set_num_threads(threads)
        scheduler.max_num_seqs = max(0, self.max_num_seqs - self.num_active(other))
        scheduler.num_running_elsewhere = self.num_active(other)
        return scheduler

    def scheduled(self, lane: int, out: SchedulerOutput) -> None:
        self.busy[lane] = not out.is_empty
        self.stalled[lane] = out.is_empty and self.has_work(lane)
        if self.split and not out.is_empty:
            self.num_split_steps += 1

    def end(self, lane: int) -> None:
        """After lane's update: blocks may be free now, so a stalled lane looks again."""
        self.busy[lane] = False
        for other, stalled in enumerate(self.stalled):
            if stalled and other != lane:
                self.wakeups[other].set()

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is. A lane whose step is running keeps the sequence until its
        update (which frees the blocks of finished sequences): its forward pass may still write them."""
        for lane, scheduler in enumerate(self.schedulers):
            if not self.busy[lane]:
                if (seq := scheduler.abort(request_id)) is not None:
                    return seq
                continue
            for seq in [*scheduler.running, *scheduler.waiting]:
                if seq.request_id == request_id and not seq.is_finished:
                    seq.finish(FinishReason.ABORT)
                    return seq
        for pending in self.incoming:
            for seq in pending:
                if seq.request_id == request_id and not seq.is_finished:
                    seq.finish(FinishReason.ABORT)  # its blocks are freed when the lane takes it
                    return seq
        return None

    def _hand_over(self, lane: int, other: int, running: list[Sequence], waiting: list[Sequence]) -> None:
        scheduler = self.schedulers[lane]
        moved = {id(s) for s in running + waiting}
        scheduler.running = [s for s in scheduler.running if id(s) not in moved]
        scheduler.waiting = type(scheduler.waiting)(s for s in scheduler.waiting if id(s) not in moved)
        self.incoming[other].extend(running + waiting)
        self.wakeups[other].set()

    def _take_incoming(self, lane: int) -> None:
        pending, self.incoming[lane] = self.incoming[lane], []
        if not pending:
            return
        scheduler = self.schedulers[lane]
        scheduler.running.extend(s for s in pending if s.status is SequenceStatus.RUNNING)
        scheduler.waiting.extendleft(reversed([s for s in pending if s.status is not SequenceStatus.RUNNING]))
        scheduler.drop_finished()  # aborted while handed over
