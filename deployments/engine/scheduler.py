"""Iteration-level scheduling (as in Orca and vLLM): between two decode steps, admit waiting requests.

A pure object: no torch. The runner executes what `schedule()` returns; the sampled token ids come
back through `update_from_output()`, which also decides which sequences are finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from deployments.engine.request import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work: sequences already in the batch decode one token; new ones are prefilled."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)

    @property
    def sequences(self) -> list[Sequence]:
        """In the order the runner returns sampled tokens: decodes first, then prefills."""
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Keeps the waiting queue and the running batch of one engine."""

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, eos_token_ids: set[int]) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is; returns it if it was still unfinished."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                seq.finish(FinishReason.ABORT)
                self._drop_finished()
                return seq
        return None

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(decodes=list(self.running))
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) + len(out.prefills) < self.max_num_seqs:
            seq = self.waiting[0]
            # Always admit one prompt per step even if it alone exceeds the budget.
            if out.prefills and seq.num_prompt_tokens > budget:
                break
            self.waiting.popleft()
            budget -= seq.num_prompt_tokens
            seq.status = SequenceStatus.RUNNING  # running from now on, so an abort can find it
            out.prefills.append(seq)
        self.running.extend(out.prefills)
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, sampled_token_ids: list[int]) -> None:
        """Append each sampled token and finish sequences that hit EOS or their length limit."""
        seqs = scheduler_output.sequences
        if len(seqs) != len(sampled_token_ids):
            raise RuntimeError(f"{len(sampled_token_ids)} sampled tokens for {len(seqs)} sequences")
        for seq, token_id in zip(seqs, sampled_token_ids):
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.output_token_ids.append(token_id)
            hit_eos = token_id in self.eos_token_ids and not seq.params.ignore_eos
            if hit_eos and seq.num_output_tokens > seq.params.min_tokens:
                # EOS stays in the token ids (generate() and vLLM's usage count it); it adds no text.
                seq.finish(FinishReason.STOP)
            elif seq.num_output_tokens >= seq.params.max_tokens:
                seq.finish(FinishReason.LENGTH)
        self._drop_finished()

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a running sequence for a reason found outside the scheduler (a stop string)."""
        seq.finish(reason)
        self._drop_finished()

    def _drop_finished(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self.running = [s for s in self.running if not s.is_finished]
