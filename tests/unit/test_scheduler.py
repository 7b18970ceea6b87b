"""The scheduler alone, with fake sampled tokens: admission, budgets, finishing, aborts."""

from __future__ import annotations

from deployments.engine.request import FinishReason, SamplingParams, Sequence, SequenceStatus
from deployments.engine.scheduler import Scheduler

EOS = 0


def seq(request_id: str, num_prompt: int = 4, **params: object) -> Sequence:
    return Sequence(request_id, list(range(1, num_prompt + 1)), SamplingParams(**params))  # type: ignore[arg-type]


def test_admits_up_to_max_num_seqs_then_queues() -> None:
    s = Scheduler(max_num_seqs=2, max_prefill_tokens=100, eos_token_ids={EOS})
    for i in range(3):
        s.add(seq(f"r{i}", max_tokens=5))
    out = s.schedule()
    assert [q.request_id for q in out.prefills] == ["r0", "r1"] and out.decodes == []
    s.update_from_output(out, [7, 7])
    out = s.schedule()
    assert [q.request_id for q in out.decodes] == ["r0", "r1"] and out.prefills == []  # r2 waits
    assert [q.request_id for q in s.waiting] == ["r2"]


def test_new_request_joins_between_decode_steps() -> None:
    s = Scheduler(max_num_seqs=4, max_prefill_tokens=100, eos_token_ids={EOS})
    s.add(seq("a", max_tokens=5))
    s.update_from_output(s.schedule(), [7])
    s.add(seq("b", max_tokens=5))
    out = s.schedule()
    assert [q.request_id for q in out.decodes] == ["a"] and [q.request_id for q in out.prefills] == ["b"]
    s.update_from_output(out, [8, 9])
    assert [q.output_token_ids for q in s.running] == [[7, 8], [9]]


def test_prefill_budget_limits_prompt_tokens_per_step_but_admits_one() -> None:
    s = Scheduler(max_num_seqs=8, max_prefill_tokens=10, eos_token_ids={EOS})
    s.add(seq("big", num_prompt=50))
    s.add(seq("small", num_prompt=3))
    assert [q.request_id for q in s.schedule().prefills] == ["big"]


def test_finishes_on_eos_length_and_respects_ignore_eos_and_min_tokens() -> None:
    s = Scheduler(max_num_seqs=8, max_prefill_tokens=100, eos_token_ids={EOS})
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
    assert s.num_unfinished == 0


def test_abort_removes_waiting_and_running_requests() -> None:
    s = Scheduler(max_num_seqs=1, max_prefill_tokens=100, eos_token_ids={EOS})
    s.add(seq("run"))
    s.add(seq("wait"))
    s.update_from_output(s.schedule(), [5])
    assert s.abort("wait") is not None and s.abort("run") is not None
    assert s.abort("unknown") is None
    assert s.num_unfinished == 0 and s.schedule().is_empty


def test_sequence_aborted_during_a_step_is_not_updated() -> None:
    s = Scheduler(max_num_seqs=2, max_prefill_tokens=100, eos_token_ids={EOS})
    a = seq("a")
    s.add(a)
    out = s.schedule()
    s.abort("a")
    s.update_from_output(out, [5])
    assert a.output_token_ids == [] and a.status is SequenceStatus.FINISHED
