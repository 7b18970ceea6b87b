"""The scheduler and block manager alone, with fake sampled tokens: budgets, chunked prefill,
preemption when the KV pool runs out, prefix-cache hits, finishing rules, aborts."""

from __future__ import annotations

from deployments.engine.block_manager import BlockManager
from deployments.engine.request import FinishReason, SamplingParams, Sequence, SequenceStatus
from deployments.engine.scheduler import Scheduler, SchedulerOutput

EOS = 0


def seq(request_id: str, num_prompt: int = 4, first: int = 1, **params: object) -> Sequence:
    return Sequence(request_id, list(range(first, first + num_prompt)), SamplingParams(**params))  # type: ignore[arg-type]


def scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8, budget: int = 100) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, {EOS})


def run_step(s: Scheduler, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    s.update_from_output(out, [token] * len(out.sample_indices))
    return out


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {q.request_id: n for q, n in zip(out.seqs, out.num_new_tokens)}


def test_admits_up_to_max_num_seqs_then_queues() -> None:
    s = scheduler(max_num_seqs=2)
    for i in range(3):
        s.add(seq(f"r{i}", max_tokens=5))
    out = run_step(s)
    assert scheduled(out) == {"r0": 4, "r1": 4} and [q.request_id for q in s.waiting] == ["r2"]
    assert scheduled(run_step(s)) == {"r0": 1, "r1": 1}  # decodes, one token each; r2 still waits


def test_long_prompt_is_chunked_and_running_streams_keep_decoding() -> None:
    s = scheduler(budget=8)
    s.add(seq("a", num_prompt=3, max_tokens=50))
    run_step(s)
    s.add(seq("long", num_prompt=30, first=100, max_tokens=5))
    chunks = []
    for _ in range(5):
        out = run_step(s)
        assert scheduled(out)["a"] == 1  # a decodes in every step while the prompt is prefilled
        chunks.append(scheduled(out).get("long", 0))
    assert chunks == [7, 7, 7, 7, 2]  # budget 8 minus a's decode token, until the prompt is done
    long = next(q for q in s.running if q.request_id == "long")
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 30


def test_pool_exhaustion_preempts_the_newest_and_every_request_completes() -> None:
    s = scheduler(num_blocks=6, block_size=4, budget=64)  # 24 slots for 3 requests of up to 12 tokens
    seqs = [seq(f"r{i}", num_prompt=4, first=10 * i + 1, max_tokens=8, ignore_eos=True) for i in range(3)]
    for q in seqs:
        s.add(q)
    steps = 0
    while s.num_unfinished and steps < 100:
        run_step(s)
        assert s.block_manager.num_used_blocks <= 6
        steps += 1
    assert all(q.finish_reason is FinishReason.LENGTH and q.num_output_tokens == 8 for q in seqs)
    assert s.num_preemptions >= 1 and s.block_manager.num_used_blocks == 0


def test_shared_prefix_blocks_are_reused_and_counted() -> None:
    s = scheduler(block_size=4)
    s.add(seq("first", num_prompt=10, max_tokens=1))
    run_step(s)  # finishes; its two full blocks stay in the prefix cache
    second = seq("second", num_prompt=10, max_tokens=1)
    s.add(second)
    out = s.schedule()
    assert scheduled(out) == {"second": 2} and second.num_cached_tokens == 8
    assert s.block_manager.num_prefix_hits == 8
    s.update_from_output(out, [7])
    other = seq("other", num_prompt=10, first=50, max_tokens=1)
    s.add(other)
    assert scheduled(s.schedule()) == {"other": 10} and other.num_cached_tokens == 0


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    s = scheduler(block_size=4)
    s.add(seq("a", num_prompt=8, max_tokens=1))
    run_step(s)
    s.add(seq("b", num_prompt=8, max_tokens=1))
    assert scheduled(s.schedule()) == {"b": 4}  # the last full block is recomputed, not the whole prompt


def test_finishes_on_eos_length_and_respects_ignore_eos_and_min_tokens() -> None:
    s = scheduler()
    stop, length, ignore, minimum = seq("stop"), seq("len", max_tokens=2), seq("ign", ignore_eos=True, max_tokens=3), seq("min", min_tokens=2)
    for q in (stop, length, ignore, minimum):
        s.add(q)
    s.update_from_output(s.schedule(), [EOS, 5, EOS, EOS])
    assert stop.finish_reason is FinishReason.STOP and stop.output_token_ids == [EOS]
    assert not ignore.is_finished and not minimum.is_finished
    s.update_from_output(s.schedule(), [5, EOS, EOS])
    assert length.finish_reason is FinishReason.LENGTH and length.num_output_tokens == 2
    assert minimum.finish_reason is None  # 2 tokens so far: EOS allowed only after min_tokens
    s.update_from_output(s.schedule(), [EOS, EOS])
    assert ignore.finish_reason is FinishReason.LENGTH and ignore.num_output_tokens == 3
    assert minimum.finish_reason is FinishReason.STOP
    assert s.num_unfinished == 0 and s.block_manager.num_used_blocks == 0


def test_abort_removes_waiting_and_running_requests_and_frees_blocks() -> None:
    s = scheduler(max_num_seqs=1)
    s.add(seq("run"))
    s.add(seq("wait"))
    run_step(s)
    assert s.block_manager.num_used_blocks > 0
    assert s.abort("wait") is not None and s.abort("run") is not None
    assert s.abort("unknown") is None
    assert s.num_unfinished == 0 and s.schedule().is_empty and s.block_manager.num_used_blocks == 0


def test_sequence_aborted_during_a_step_is_not_updated() -> None:
    s = scheduler()
    a = seq("a")
    s.add(a)
    out = s.schedule()
    s.abort("a")
    s.update_from_output(out, [5])
    assert a.output_token_ids == [] and a.status is SequenceStatus.FINISHED


def test_freed_blocks_with_hashes_are_evicted_when_reallocated() -> None:
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq("a", num_prompt=4)
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.free(a)
    assert len(bm.hash_to_block_id) == 2 and bm.num_free_blocks == 2
    b = seq("b", num_prompt=4, first=9)
    bm.allocate(b, 4)  # takes both blocks: their old hashes must go
    assert bm.hash_to_block_id == {} and bm.num_free_blocks == 0
