"""One flat batch per step under a token budget (as vLLM v1 and nano-vllm schedule).

A pure object: no torch. Each step, every running sequence that is decoding gets one token, then
sequences still prefilling get a chunk of their prompt, then waiting requests are admitted (their
cached prefix first) while the token budget, `max_num_seqs` and free KV blocks allow. When a
running sequence needs a block and none is free, the most recently admitted sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later (its full
blocks usually still sit in the prefix cache). Requests wait; they never fail for lack of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from deployments.engine.block_manager import BlockManager
from deployments.engine.request import FinishReason, Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work: `num_new_tokens[i]` tokens of `seqs[i]`, starting at its computed count."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def sample_indices(self) -> list[int]:
        """Positions in `seqs` whose chunk reaches their last token: those sample a new token."""
        return [i for i, (s, n) in enumerate(zip(self.seqs, self.num_new_tokens)) if s.num_computed_tokens + n == s.num_tokens]


class Scheduler:
    """Keeps the waiting queue and the running set of one engine, and their KV blocks."""

    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, eos_token_ids: set[int]
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_running_elsewhere = 0
        """Sequences of another lane holding blocks of the same pool (engine/lanes.py): a waiting sequence
        that does not fit now may fit when they finish."""

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is and free its blocks; returns it if it was unfinished."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    # --- scheduling --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decoding sequences first (one token each), then chunks of prompts being prefilled.
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted below while making room for an earlier one
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve(seq, num_new, out):
                continue  # seq itself was preempted
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            budget -= num_new
        self._admit(out, budget)
        return out

    def _reserve(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Find blocks for `num_new` tokens of a running sequence, preempting the most recently
        admitted other sequences if needed; False if `seq` had to be preempted itself."""
        while not self.block_manager.can_allocate(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        if seq in out.seqs:  # scheduled earlier in this step: unschedule it
            index = out.seqs.index(seq)
            del out.seqs[index], out.num_new_tokens[index]
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.num_preempted += 1
        self.waiting.appendleft(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting sequences in arrival order (preempted ones first) while they fit."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                seq.num_computed_tokens = self.block_manager.allocate_cached_prefix(seq)
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = seq.num_computed_tokens
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                self.block_manager.free(seq)  # a waiting sequence holds no blocks: look again next step
                seq.num_computed_tokens = 0
                if not self.running and not out.seqs and not self.num_running_elsewhere:  # the whole pool cannot hold it (validate prevents this)
                    self.waiting.popleft()
                    seq.finish(FinishReason.LENGTH)
                    continue
                break  # wait for running sequences to free blocks
            self.block_manager.allocate(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(num_new)
            budget -= num_new

    # --- results -----------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Advance computed counts, append each sampled token, finish sequences that hit EOS or
        their length limit. `sampled_token_ids` follows `sample_indices`. Returns the sequences
        that got a new token."""
        sampling = scheduler_output.sample_indices
        if len(sampling) != len(sampled_token_ids):
            raise RuntimeError(f"{len(sampled_token_ids)} sampled tokens for {len(sampling)} sampling sequences")
        for seq, num_new in zip(scheduler_output.seqs, scheduler_output.num_new_tokens):
            seq.num_computed_tokens += num_new
        updated = []
        for index, token_id in zip(sampling, sampled_token_ids):
            seq = scheduler_output.seqs[index]
            if seq.is_finished:  # aborted while the step ran
                continue
            seq.append_token(token_id)
            updated.append(seq)
            hit_eos = token_id in self.eos_token_ids and not seq.params.ignore_eos
            if hit_eos and seq.num_output_tokens > seq.params.min_tokens:
                seq.finish(FinishReason.STOP)  # EOS stays in the ids (generate() and vLLM count it)
            elif seq.num_output_tokens >= seq.params.max_tokens:
                seq.finish(FinishReason.LENGTH)
        for seq in scheduler_output.seqs:
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq)
        self.drop_finished()
        return updated

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a sequence for a reason found outside the scheduler (a stop string, an abort)."""
        seq.finish(reason)
        self.drop_finished()

    def drop_finished(self) -> None:
        for seq in [s for s in self.running if s.is_finished] + [s for s in self.waiting if s.is_finished]:
            self.block_manager.cache_full_blocks(seq)
            self.block_manager.free(seq)
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self.running = [s for s in self.running if not s.is_finished]
