"""Decode lanes: a step of decodes alone, split in two halves that run side by side, each on one
thread, instead of every kernel of the step split over both threads.

Why: the step's kernels are short parallel regions (a projection at 10 rows is 20-120 us), each ending
at a barrier. When another process takes one of the two cores (through Ray Serve: the router, HAProxy,
the client, Ray's own processes), the other thread waits at the next barrier for as long: the engine
lost 2.2x the CPU taken, OpenVINO 1.0x (perf/bench_preemption.py, perf/README.md session 23). Two
halves with one join per step have one wait instead of ~180, and no thread idles through the other's
Python. Only for steps of decodes (every row one token), with at least LANE_MIN_SEQS sequences, where every
projection is one of our CPU kernels' (int4 and group-wise int8: `decode_layers`); bf16 layers (torch's
matmuls) and LoRA (its adapter state is per step, not per half) keep one batch over both threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from deployments.engine import kernels

LANE_MIN_SEQS = int(os.environ.get("LLM_SERVE_LANE_MIN_SEQS", "8"))
"""A decode step of at least this many sequences runs as two lanes (LLM_SERVE_LANE_MIN_SEQS; 0: never)."""


class DecodeLanes:
    """Runs a decode step's two halves on the engine thread and one helper thread, torch (and so our
    kernels) at one thread for the step: torch's thread count is per process, and no region of the step
    may wake the OpenMP team's worker, which would then spin beside the two lanes."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.num_steps = 0  # steps run as lanes (tests read it)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-lane")

    @classmethod
    def for_runner(cls, runner: Any) -> DecodeLanes | None:
        """Lanes where they apply: CPU, our kernels built, a native model with fused glue, no LoRA, 2+ threads."""
        module = kernels.cpu_kernels() if runner.device.type == "cpu" else None
        if LANE_MIN_SEQS <= 0 or module is None or runner.lora is not None:
            return None
        if torch.get_num_threads() < 2 or not getattr(runner.model, "_fusable", False):
            return None
        if runner.model._decode_plan() is None:  # a projection through torch (bf16 layers): its matmuls want both threads
            return None
        return cls(torch.get_num_threads())

    def execute(self, runner: Any, scheduler_output: Any) -> torch.Tensor:
        """Logits in `sample_indices` order, as ModelRunner.execute returns them."""
        seqs = scheduler_output.seqs
        self.num_steps += 1
        half = (len(seqs) + 1) // 2
        torch.set_num_threads(1)  # until a step of another kind (ModelRunner.execute restores it)
        other = self.pool.submit(runner.forward, seqs[half:], [1] * (len(seqs) - half), range(len(seqs) - half))
        first = runner.forward(seqs[:half], [1] * half, range(half))
        logits = torch.cat([first, other.result()])
        order = scheduler_output.sample_indices
        if order == list(range(len(seqs))):
            return logits
        return logits.index_select(0, torch.tensor(order, dtype=torch.long))

    def restore(self) -> None:
        """Torch's thread count back for a step that is not split."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def close(self) -> None:
        self.restore()
        self.pool.shutdown(wait=True)
