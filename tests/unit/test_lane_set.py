"""Two lanes' bookkeeping (deployments/engine/lanes.py) with real schedulers over one BlockManager and fake
sampled tokens, driven as the engine drives them: split at LANE_MIN_SEQS active sequences, even halves,
joined again below it minus 2; an abort during a lane's step; a waiting request that fits only once the
other lane frees its blocks; torch's thread count per lane."""

from __future__ import annotations

import torch

from deployments.engine.block_manager import BlockManager
from deployments.engine.lanes import LaneSet
from deployments.engine.request import FinishReason, SamplingParams, Sequence
from deployments.engine.scheduler import Scheduler, SchedulerOutput

EOS = 0


def lane_set(num_blocks: int = 256, max_num_seqs: int = 16, min_seqs: int = 8) -> LaneSet:
    manager = BlockManager(num_blocks, 4)
    lanes = LaneSet([Scheduler(manager, max_num_seqs, 256, {EOS}) for _ in range(2)], threads=2, min_seqs=min_seqs)
    lanes.threaded = True
    return lanes


def add(lanes: LaneSet, request_id: str, num_prompt: int = 4, max_tokens: int = 50, first: int = 1) -> Sequence:
    prompt = list(range(first, first + num_prompt))
    seq = Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    lanes.schedulers[0].add(seq)
    return seq


def begin(lanes: LaneSet, lane: int) -> tuple[Scheduler, SchedulerOutput]:
    with lanes.lock:
        scheduler = lanes.begin(lane)
        out = scheduler.schedule()
        lanes.scheduled(lane, out)
    return scheduler, out


def finish_step(lanes: LaneSet, lane: int, scheduler: Scheduler, out: SchedulerOutput) -> None:
    with lanes.lock:
        scheduler.update_from_output(out, [7] * len(out.sample_indices))
        lanes.end(lane)


def step(lanes: LaneSet, lane: int) -> SchedulerOutput:
    scheduler, out = begin(lanes, lane)
    if not out.is_empty:
        finish_step(lanes, lane, scheduler, out)
    return out


def active(lanes: LaneSet) -> list[int]:
    return [lanes.num_active(0), lanes.num_active(1)]


def test_lanes_split_evenly_at_min_seqs_and_join_below_it() -> None:
    previous = torch.get_num_threads()
    try:
        lanes = lane_set()
        for i in range(7):
            add(lanes, f"r{i}")
        step(lanes, 0)  # 7 admitted: below 8, one batch over both threads
        assert active(lanes) == [7, 0] and not lanes.split and torch.get_num_threads() == 2
        add(lanes, "r7")
        step(lanes, 0)  # r7 admitted: 8 active
        step(lanes, 0)  # split: half handed to lane 1, lane 0 at one thread
        assert lanes.split and active(lanes) == [4, 4] and torch.get_num_threads() == 1
        assert lanes.wakeups[1].is_set()
        out = step(lanes, 1)
        assert len(out.seqs) == 4 and lanes.num_split_steps >= 2
        for seq in list(lanes.schedulers[1].running)[:3]:  # lane 1 drops to 1: 5 active, below 8 - 2
            lanes.abort(seq.request_id)
        step(lanes, 1)  # lane 1 hands its last sequence back and idles
        assert not lanes.split and active(lanes) == [5, 0] and not lanes.has_work(1)
        step(lanes, 0)
        assert torch.get_num_threads() == 2  # lane 0 alone again: both threads
        assert lanes.schedulers[0].max_num_seqs == 16
    finally:
        torch.set_num_threads(previous)


def test_an_abort_during_a_lanes_step_frees_its_blocks_after_the_step() -> None:
    lanes = lane_set(min_seqs=2)
    for i in range(4):
        add(lanes, f"r{i}")
    step(lanes, 0)
    step(lanes, 0)  # split: two each
    scheduler, out = begin(lanes, 1)
    victim = out.seqs[0]
    held = list(victim.block_table)
    assert lanes.busy[1] and held
    with lanes.lock:
        found = lanes.abort(victim.request_id)
    assert found is victim and victim.finish_reason is FinishReason.ABORT
    manager = lanes.schedulers[0].block_manager
    assert all(manager.blocks[b].ref_count == 1 for b in held)  # its forward pass may still write them
    finish_step(lanes, 1, scheduler, out)
    assert victim.block_table == [] and victim not in scheduler.running
    assert all(manager.blocks[b].ref_count == 0 for b in held)


def test_a_request_waits_while_the_other_lane_holds_the_blocks() -> None:
    lanes = lane_set(num_blocks=12, min_seqs=2)  # 48 slots
    for i in range(2):
        add(lanes, f"r{i}", num_prompt=16, max_tokens=8, first=100 * i + 1)
    step(lanes, 0)
    step(lanes, 0)  # split: r1 to lane 1
    step(lanes, 1)
    with lanes.lock:
        lanes.abort("r0")  # lane 0 now runs nothing; lane 1 holds r1's 5 blocks
    big = add(lanes, "big", num_prompt=40, max_tokens=4, first=1000)  # its 10 blocks fit only without r1's
    out = step(lanes, 0)
    assert out.is_empty and lanes.stalled[0]
    assert big.status.value == "waiting" and not big.is_finished  # not given up as too long for the pool
    while lanes.num_unfinished():
        for lane in (0, 1):
            step(lanes, lane)
    assert big.num_output_tokens == 4 and lanes.schedulers[0].block_manager.num_used_blocks == 0
