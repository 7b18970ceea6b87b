"""StreamInterval (engine/stream_interval.py): which outputs leave after a step, merged how."""

from __future__ import annotations

import threading

import pytest

from deployments.engine.request import FinishReason, RequestOutput
from deployments.engine.stream_interval import AUTO, AUTO_MIN_SEQS, StreamInterval, parse_stream_interval


def out(request_id: str, n: int, finished: bool = False) -> RequestOutput:
    """The output that brought request `request_id` its n-th token (token id n, text 't<n>')."""
    return RequestOutput(request_id, [n], f"t{n}", FinishReason.LENGTH if finished else None, 5, n)


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[RequestOutput]] = []

    def __call__(self, outputs: list[RequestOutput]) -> None:
        self.batches.append(list(outputs))

    def of(self, request_id: str) -> list[RequestOutput]:
        return [o for batch in self.batches for o in batch if o.request_id == request_id]


def test_parse() -> None:
    assert parse_stream_interval("auto") == AUTO and parse_stream_interval(3) == 3
    for bad in (0, -1, "2", True, 1.5):
        with pytest.raises(ValueError, match="stream_interval"):
            parse_stream_interval(bad)  # type: ignore[arg-type]


def test_interval_one_delivers_every_output_as_it_comes() -> None:
    pacing, sink = StreamInterval(1), Sink()
    for n in range(1, 5):
        pacing.pace(0, [out("a", n), out("b", n)], num_running=16, deliver=sink)
    assert [[o.new_token_ids for o in b] for b in sink.batches] == [[[n], [n]] for n in range(1, 5)]
    assert pacing.num_merged == 0 and pacing.num_held == 0


def test_auto_streams_every_step_below_the_threshold_and_every_second_from_it() -> None:
    pacing, sink = StreamInterval(AUTO), Sink()
    for n in range(1, 4):  # a light load: one token per output
        pacing.pace(0, [out("a", n)], num_running=AUTO_MIN_SEQS - 1, deliver=sink)
    assert [o.new_token_ids for o in sink.of("a")] == [[1], [2], [3]]
    sink.batches.clear()
    for n in range(4, 10):  # loaded: two steps per output
        pacing.pace(0, [out("a", n)], num_running=AUTO_MIN_SEQS, deliver=sink)
    assert [o.new_token_ids for o in sink.of("a")] == [[4, 5], [6, 7], [8, 9]]
    assert [o.text for o in sink.of("a")] == ["t4t5", "t6t7", "t8t9"]
    assert sink.of("a")[-1].num_output_tokens == 9 and pacing.num_merged == 3


def test_first_token_and_last_output_are_never_held() -> None:
    pacing, sink = StreamInterval(4), Sink()
    pacing.pace(0, [out("a", 1)], num_running=16, deliver=sink)
    assert [o.new_token_ids for o in sink.of("a")] == [[1]]  # time to first token is not paced
    pacing.pace(0, [out("a", 2)], num_running=16, deliver=sink)
    pacing.pace(0, [out("a", 3, finished=True)], num_running=16, deliver=sink)
    last = sink.of("a")[-1]
    assert last.new_token_ids == [2, 3] and last.finished and pacing.num_held == 0


def test_an_output_its_lane_does_not_step_again_leaves_at_that_lanes_next_step() -> None:
    """Moved to the other lane, preempted or aborted: not held past its lane's next step."""
    pacing, sink = StreamInterval(2), Sink()
    pacing.pace(0, [out("a", 1), out("b", 1)], num_running=16, deliver=sink)
    pacing.pace(0, [out("a", 2), out("b", 2)], num_running=16, deliver=sink)  # both held
    pacing.pace(1, [out("c", 2)], num_running=16, deliver=sink)  # lane 1's step leaves lane 0's alone
    assert [o.new_token_ids for o in sink.of("a")] == [[1]]
    pacing.pace(0, [out("b", 3)], num_running=16, deliver=sink)  # "a" was not stepped: it leaves now
    assert [o.new_token_ids for o in sink.of("a")] == [[1], [2]] and sink.of("b")[-1].new_token_ids == [2, 3]
    pacing.pace(1, [out("a", 3)], num_running=16, deliver=sink)  # "a" runs on lane 1 now: order kept
    pacing.pace(1, [out("a", 4)], num_running=16, deliver=sink)
    assert [t for o in sink.of("a") for t in o.new_token_ids] == [1, 2, 3, 4]


def test_flush_delivers_only_that_lanes_outputs() -> None:
    pacing, sink = StreamInterval(3), Sink()
    pacing.pace(0, [out("a", 2)], num_running=16, deliver=sink)
    pacing.pace(1, [out("b", 2)], num_running=16, deliver=sink)
    assert sink.batches == [] and pacing.num_held == 2
    pacing.flush(1, sink)
    assert [o.request_id for o in sink.batches[-1]] == ["b"] and pacing.num_held == 1
    pacing.flush(0, sink)
    assert [o.request_id for o in sink.batches[-1]] == ["a"] and pacing.num_held == 0


def test_two_lane_threads_lose_and_reorder_nothing() -> None:
    pacing, sink = StreamInterval(AUTO), Sink()
    lock = threading.Lock()

    def deliver(outputs: list[RequestOutput]) -> None:
        with lock:
            sink(outputs)

    def lane(index: int) -> None:
        ids = [f"{index}-{i}" for i in range(6)]
        for n in range(1, 201):
            pacing.pace(index, [out(r, n, finished=n == 200) for r in ids], num_running=12, deliver=deliver)

    threads = [threading.Thread(target=lane, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index in (0, 1):
        for i in range(6):
            outputs = sink.of(f"{index}-{i}")
            assert [t for o in outputs for t in o.new_token_ids] == list(range(1, 201))
            assert len(outputs) == 101 and outputs[-1].finished  # the first alone, then pairs
    assert pacing.num_held == 0
