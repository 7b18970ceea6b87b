"""Lanes on the real engine (deployments/engine/lanes.py): two schedulers stepping on two threads over one
model and one KV pool. Half a step's sequences run on one thread at once on each lane give the logits of
the whole step over both threads; generations through AsyncLLMEngine with lanes complete with every token
(arriving together and staggered, with preemption, with aborts mid-stream, with mixed LoRA adapters), free
every block, and leave lane 0 on both threads once the load is gone; lanes are off where they do not apply."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from deployments.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams, kernels
from deployments.engine.adapter_loader import load_adapter
from deployments.engine.scheduler import SchedulerOutput
from tests.tiny_models import save_lora_adapter

pytestmark = pytest.mark.skipif(kernels.load("native") is None, reason=f"CPU kernels not built here: {kernels._failed.get('native')}")

PROMPTS = ["The quick brown fox", "Ray Serve hosts models", "A paged cache holds", "One two three four five six",
           "Hello", "Tokens stream over SSE to every client", "Lanes", "The sea on a calm night"]


def int4_config(model_dir: Path, **overrides: object) -> EngineConfig:
    settings: dict[str, object] = {"model": str(model_dir), "weights": "int4", "max_num_seqs": 8, "block_size": 4, "num_threads": 2}
    return EngineConfig(**(settings | overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("lane-adapters")
    return [save_lora_adapter(tiny_model_dir, root / name, seed, 8, None) for seed, name in enumerate(["a", "b"], start=1)]


@pytest.mark.parametrize("family", ["llama", "gemma3", "llama-lora"])
def test_two_halves_on_two_threads_give_the_whole_steps_logits(family: str, tiny_model_dir: Path, tiny_gemma_dir: Path,
                                                               adapter_dirs: list[Path]) -> None:
    """With LoRA, each half carries other adapters: a batch shared between the threads would mix them up."""
    lora = family.endswith("lora")
    engine = LLMEngine(int4_config(tiny_gemma_dir if family == "gemma3" else tiny_model_dir, max_loras=2 if lora else 0))
    assert engine.lanes.num_lanes == 2
    adapters: list[str | None] = [None] * len(PROMPTS)
    if lora:
        for name, path in zip(["a", "b"], adapter_dirs):
            engine.add_adapter(load_adapter(path, name, 8))
        adapters = ["a", "a", None, "a", "b", None, "b", "b"]  # halves: mostly a, mostly b
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.encode(prompt), params, adapters[i])
    for _ in range(12):  # prefills, then decodes past the tiny Gemma's sliding window (8)
        engine.step()
    step = engine.scheduler.schedule()
    assert len(step.seqs) == len(PROMPTS) and all(n == 1 for n in step.num_new_tokens)
    whole = engine.runner.execute(step)  # both runs write the same cache slots
    halves = [SchedulerOutput(step.seqs[:4], [1] * 4), SchedulerOutput(step.seqs[4:], [1] * 4)]
    logits: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]

    def lane(k: int) -> None:
        torch.set_num_threads(1)
        logits[k] = engine.runner.execute(halves[k])

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat(logits), whole, rtol=1e-3, atol=1e-3)  # attention's context splits may round differently


async def generate_all(engine: AsyncLLMEngine, prompts: list[str], max_tokens: int, stagger_s: float = 0.0,
                       leave_after: dict[int, int] | None = None) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: str) -> list[int]:
        await asyncio.sleep(i * stagger_s)
        tokens: list[int] = []
        async for out in engine.generate(f"req-{i}", engine.engine.encode(prompt), params):
            tokens += out.new_token_ids
            if leave_after is not None and i in leave_after and len(tokens) >= leave_after[i]:
                break  # the client goes away: the request is aborted, maybe while its lane steps
        return tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


@pytest.mark.parametrize("stagger_s", [0.0, 0.002], ids=["together", "staggered"])
def test_generations_through_two_lane_threads_complete_with_preemption(stagger_s: float, tiny_model_dir: Path) -> None:
    probe = LLMEngine(int4_config(tiny_model_dir))
    block_bytes = probe.runner.kv_cache_bytes // probe.runner.num_blocks
    del probe
    engine = AsyncLLMEngine(int4_config(tiny_model_dir, max_num_seqs=12, kv_cache_bytes=60 * block_bytes))
    try:
        assert engine.engine.lanes.num_lanes == 2 and engine.engine.runner.num_blocks == 60
        # 12 prompts of ~40 tokens + 48 each need ~260 blocks. 48 tokens, not 32: staggered requests on a loaded
        # host overlapped too little for a preemption now and then (0 preemptions in a CI run; 6+ now, loaded)
        prompts = PROMPTS + [p + " again" for p in PROMPTS[:4]]
        results = asyncio.run(generate_all(engine, prompts, 48, stagger_s))
        assert [len(t) for t in results] == [48] * len(prompts)
        stats = engine.engine.stats()
        assert stats["lane_steps"] > 0 and stats["num_preemptions"] > 0
        assert stats["num_used_blocks"] == 0 and stats["num_running"] == stats["num_waiting"] == 0
        one = asyncio.run(generate_all(engine, ["One more"], 4))
        assert len(one[0]) == 4
        assert not engine.engine.lanes.split
        assert asyncio.run(engine.call(torch.get_num_threads)) == 2  # lane 0 alone: both threads again
    finally:
        engine.shutdown()


def test_clients_leaving_mid_stream_abort_while_lanes_run(tiny_model_dir: Path) -> None:
    engine = AsyncLLMEngine(int4_config(tiny_model_dir, max_num_seqs=10))
    try:
        prompts = PROMPTS + ["Two more", "prompts here"]
        leave = {1: 3, 4: 10, 6: 1, 9: 20}
        results = asyncio.run(generate_all(engine, prompts, 40, leave_after=leave))
        for i, tokens in enumerate(results):  # a leaver left after the output that reached its count (outputs may carry several)
            assert leave[i] <= len(tokens) < 40 if i in leave else len(tokens) == 40
        stats = engine.engine.stats()
        assert stats["lane_steps"] > 0 and stats["num_used_blocks"] == 0 and engine.engine.lanes.num_unfinished() == 0
    finally:
        engine.shutdown()


def test_adapters_through_two_lane_threads(tiny_model_dir: Path, adapter_dirs: list[Path]) -> None:
    """Mixed adapters and the base through lanes: the same tokens as the one-batch synchronous engine."""
    engine = AsyncLLMEngine(int4_config(tiny_model_dir, max_num_seqs=10, max_loras=2))
    reference = LLMEngine(int4_config(tiny_model_dir, max_num_seqs=10, max_loras=2))
    try:
        for name, path in zip(["a", "b"], adapter_dirs):
            asyncio.run(engine.call(engine.engine.add_adapter, load_adapter(path, name, 8)))
            reference.add_adapter(load_adapter(path, name, 8))
        prompts = PROMPTS + ["Two more", "prompts here"]
        adapters = ["a", None, "b", "a", "b", None, "a", "b", "a", None]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

        async def one(i: int) -> list[int]:
            tokens: list[int] = []
            async for out in engine.generate(f"r{i}", engine.engine.encode(prompts[i]), params, adapters[i]):
                tokens += out.new_token_ids
            return tokens

        async def all_of() -> list[list[int]]:
            return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))

        got = asyncio.run(all_of())
        for i, prompt in enumerate(prompts):
            reference.add_request(f"r{i}", reference.encode(prompt), params, adapters[i])
        want: dict[str, list[int]] = {}
        while reference.has_unfinished():
            for out in reference.step():
                want.setdefault(out.request_id, []).extend(out.new_token_ids)
        assert engine.engine.stats()["lane_steps"] > 0
        same = sum(got[i] == want[f"r{i}"] for i in range(len(prompts)))
        assert same >= len(prompts) - 1  # one thread against two may round a near-tie the other way
        assert engine.engine.adapters.in_use == {}
    finally:
        engine.shutdown()


def test_lanes_are_off_where_they_do_not_apply(tiny_model_dir: Path) -> None:
    fp32 = LLMEngine(EngineConfig(model=str(tiny_model_dir), weights="fp32", max_num_seqs=8))
    assert fp32.lanes.num_lanes == 1 and fp32.stats()["num_lanes"] == 1  # the reference path
    assert LLMEngine(int4_config(tiny_model_dir, num_threads=1)).lanes.num_lanes == 1
