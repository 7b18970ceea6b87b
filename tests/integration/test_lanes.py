"""Decode lanes (deployments/engine/lanes.py): a decode step of enough sequences runs as two halves side
by side, each on one thread. The same step's logits must match the one-batch step's, the lanes must
really run (and hand torch's thread count back for other steps), and whole generations through them
must complete with every token, prompts arriving together and staggered, with preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deployments.engine import EngineConfig, LLMEngine, SamplingParams, kernels
from deployments.engine import lanes as lanes_module

pytestmark = pytest.mark.skipif(kernels.load("native") is None, reason=f"CPU kernels not built here: {kernels._failed.get('native')}")

PROMPTS = ["The quick brown fox", "Ray Serve hosts models", "A paged cache holds", "One two three four five six",
           "Hello", "Tokens stream over SSE to every client", "Lanes", "The sea on a calm night"]


def int4_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    settings: dict[str, object] = {"model": str(model_dir), "weights": "int4", "max_num_seqs": 8, "block_size": 4, "num_threads": 2}
    return LLMEngine(EngineConfig(**(settings | overrides)))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_lanes_step_matches_the_one_batch_step(family: str, tiny_model_dir: Path, tiny_gemma_dir: Path) -> None:
    engine = int4_engine(tiny_model_dir if family == "llama" else tiny_gemma_dir)
    lanes = engine.runner.lanes
    assert lanes is not None and lanes_module.LANE_MIN_SEQS <= len(PROMPTS)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.encode(prompt), params)
    for _ in range(12):  # prefills, then decodes past the tiny Gemma's sliding window (8)
        engine.step()
    assert lanes.num_steps > 0  # decode steps of 8 sequences ran as lanes
    assert engine.stats()["decode_lane_steps"] == lanes.num_steps  # /models shows it (kv_cache's counters)
    assert torch.get_num_threads() == 1  # a lanes step holds torch at one thread
    step = engine.scheduler.schedule()
    assert len(step.seqs) == len(PROMPTS) and all(n == 1 for n in step.num_new_tokens)
    split = engine.runner.execute(step)  # both runs write the same cache slots
    engine.runner.lanes = None
    torch.set_num_threads(2)
    whole = engine.runner.execute(step)
    assert split.shape == whole.shape == (len(PROMPTS), whole.shape[1])
    torch.testing.assert_close(split, whole, rtol=1e-3, atol=1e-3)  # attention's context splits may round differently
    engine.runner.lanes = lanes
    lanes.restore()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("arrive_every", [None, 1], ids=["together", "staggered"])
def test_generations_through_lanes_complete_with_preemption(arrive_every: int | None, tiny_model_dir: Path) -> None:
    runner = int4_engine(tiny_model_dir).runner
    block_bytes = runner.kv_cache_bytes // runner.num_blocks
    engine = int4_engine(tiny_model_dir, kv_cache_bytes=40 * block_bytes)  # 8 x ~30 tokens need ~64 blocks: preemption
    assert engine.runner.num_blocks == 40
    lanes = engine.runner.lanes
    assert lanes is not None
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    waiting, step = list(enumerate(PROMPTS)), 0
    while waiting or engine.has_unfinished():
        if waiting and (arrive_every is None or step % arrive_every == 0):
            for i, prompt in waiting if arrive_every is None else waiting[:1]:
                engine.add_request(str(i), engine.encode(prompt), params)
            waiting = [] if arrive_every is None else waiting[1:]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    assert sorted(tokens) == [str(i) for i in range(len(PROMPTS))]
    assert all(len(t) == 24 for t in tokens.values())
    assert lanes.num_steps > 0
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0
    torch.set_num_threads(1)  # as a lanes step leaves it
    engine.score(engine.encode("Teacher forcing"))  # scoring runs over both threads again
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    engine.add_request("after", engine.encode("One more"), SamplingParams(max_tokens=2, temperature=0.0))
    while engine.has_unfinished():  # a step of one sequence: one batch, torch's threads handed back
        engine.step()
    assert torch.get_num_threads() == 2


def test_lanes_are_off_where_they_do_not_apply(tiny_model_dir: Path) -> None:
    fp32 = LLMEngine(EngineConfig(model=str(tiny_model_dir), weights="fp32", max_num_seqs=8))
    assert fp32.runner.lanes is None and fp32.stats()["decode_lane_steps"] == 0  # the reference path
    assert int4_engine(tiny_model_dir, num_threads=1).runner.lanes is None
    assert int4_engine(tiny_model_dir, max_loras=2).runner.lanes is None
