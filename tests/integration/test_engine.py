"""The real engine on tiny random models, loaded from disk through the real loading code.

Core correctness: greedy output equals `model.generate(do_sample=False)` token for token, for
requests arriving together and staggered, with more requests than batch slots.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from deployments.engine.async_engine import EngineDeadError
from deployments.engine.request import FinishReason

PROMPTS = [
    "The quick brown fox",
    "Ray Serve hosts models behind one",
    "Hi",
    "Continuous batching admits new requests between decode steps, so",
    "naïve café 🙂",
]
NEW_TOKENS = 24


@functools.lru_cache(maxsize=None)
def reference(model_dir: Path) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**ids, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        out.append(generated[0, ids.input_ids.shape[1] :].tolist())
    return out


def run_engine(engine: LLMEngine, arrive_every: int | None) -> list[list[int]]:
    """Greedy-generate every prompt; all at once (None) or one new arrival every N steps."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    pending = list(enumerate(PROMPTS))
    step = 0
    while pending or engine.has_unfinished():
        if pending and (arrive_every is None or step % arrive_every == 0):
            batch = pending if arrive_every is None else pending[:1]
            for i, prompt in batch:
                engine.add_request(str(i), engine.encode(prompt), params)
            pending = [] if arrive_every is None else pending[1:]
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        step += 1
    return [tokens[str(i)] for i in range(len(PROMPTS))]


SCENARIOS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 5},  # prompts prefilled in chunks beside running decodes
    "preempting": {"kv_cache_bytes": 12 * 4 * 512, "block_size": 4},  # 12 blocks: sequences must be preempted
}


def fp32_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    settings: dict[str, object] = {"model": str(model_dir), "weights": "fp32", "max_num_seqs": 3}
    return LLMEngine(EngineConfig(**(settings | overrides)))  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arrive_every", [None, 3], ids=["together", "staggered"])
def test_greedy_equals_generate(family: str, scenario: str, arrive_every: int | None, tiny_model_dir: Path, tiny_gemma_dir: Path) -> None:
    model_dir = tiny_model_dir if family == "llama" else tiny_gemma_dir  # gemma3: sliding-window layers
    engine = fp32_engine(model_dir, **SCENARIOS[scenario])  # 5 prompts, 3 slots: some must wait
    expected = reference(model_dir)
    assert run_engine(engine, arrive_every) == expected
    assert engine.block_manager.num_used_blocks == 0  # every finished sequence's blocks were freed
    if scenario == "preempting":
        assert engine.scheduler.num_preemptions > 0
    # The same prompts again: their full prompt blocks come from the prefix cache, same tokens.
    hits_before = engine.block_manager.num_prefix_hits
    assert run_engine(engine, arrive_every) == expected
    assert engine.block_manager.num_prefix_hits > hits_before


@pytest.mark.parametrize("arrive_every", [None, 3], ids=["together", "staggered"])
def test_generic_adapter_serves_a_non_native_architecture(arrive_every: int | None, tiny_qwen3_dir: Path) -> None:
    engine = fp32_engine(tiny_qwen3_dir, kv_cache_bytes=12 * 4 * 512, block_size=4)
    assert engine.runner.facts["implementation"] == "transformers"
    assert run_engine(engine, arrive_every) == reference(tiny_qwen3_dir)
    assert engine.scheduler.num_preemptions > 0 or arrive_every is not None


def test_stop_strings_seeds_and_text(tiny_model_dir: Path) -> None:
    engine = fp32_engine(tiny_model_dir)
    prompt = engine.encode("The quick")

    def text_of(request_id: str, params: SamplingParams) -> tuple[str, FinishReason | None]:
        engine.add_request(request_id, prompt, params)
        text, reason = "", None
        while engine.has_unfinished():
            for out in engine.step():
                text, reason = text + out.text, out.finish_reason
        return text, reason

    free_text, _ = text_of("free", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    stop = free_text[5:8]
    cut, reason = text_of("cut", SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=(stop,)))
    assert reason is FinishReason.STOP and cut == free_text[: free_text.index(stop)]
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    assert text_of("s1", seeded) == text_of("s2", seeded)


def test_min_tokens_holds_eos_back_only_for_its_own_request(tiny_model_dir: Path) -> None:
    engine = fp32_engine(tiny_model_dir)
    prompt = engine.encode("The quick brown fox")
    engine.add_request("free", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    free = [t for _ in range(8) for out in engine.step() for t in out.new_token_ids]
    eos = free[2]  # the token greedy decoding gives third becomes the end of sequence
    engine.eos_token_ids = engine.scheduler.eos_token_ids = {eos}
    engine.sampler.eos_token_ids = [eos]
    held = SamplingParams(max_tokens=6, min_tokens=6, temperature=0.0)
    engine.add_request("held", prompt, held)  # one greedy batch: min_tokens masks EOS in this row only
    engine.add_request("stops", prompt, SamplingParams(max_tokens=6, temperature=0.0))
    tokens: dict[str, list[int]] = {"held": [], "stops": []}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert tokens["stops"] == free[:3]
    assert len(tokens["held"]) == 6 and eos not in tokens["held"] and tokens["held"][:2] == free[:2]


def test_context_limit_is_enforced_with_numbers(tiny_model_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=64))
    with pytest.raises(ValueError, match=r"64 tokens.*\+ 100 max_tokens"):
        engine.add_request("x", engine.encode("hello"), SamplingParams(max_tokens=100))
    assert engine.resolve_max_tokens(60, None) == 4


async def assert_all_aborted(engine: AsyncLLMEngine) -> None:
    """Every request gone from the engine and every KV block free (an abort reaches the engine thread within a step or two)."""
    for _ in range(100):
        if not engine.engine.has_unfinished():
            break
        await asyncio.sleep(0.01)
    assert not engine.engine.has_unfinished() and engine.engine.block_manager.num_used_blocks == 0


async def test_async_engine_streams_concurrently_and_aborts_on_early_exit(tiny_model_dir: Path) -> None:
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=4))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompt = engine.engine.encode("The quick brown fox")

    async def full(request_id: str) -> int:
        return len([t async for o in engine.generate(request_id, prompt, params) for t in o.new_token_ids])

    async def leave_early() -> None:
        stream = engine.generate("early", prompt, SamplingParams(max_tokens=120, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]

    counts = await asyncio.gather(full("a"), full("b"), full("c"), leave_early())
    assert counts[:3] == [30, 30, 30]
    await assert_all_aborted(engine)
    engine.shutdown()


async def test_a_sink_takes_every_output_but_the_last_and_its_error_ends_the_stream(tiny_model_dir: Path) -> None:
    """With a sink (a channel's push), outputs reach it on the serving loop and the generator wakes only
    for the last one: the same tokens as a plain stream. An error the sink raises ends the stream
    with that error and aborts the request."""
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=4))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = engine.engine.encode("The quick brown fox")
    plain = [t async for o in engine.generate("plain", prompt, params) for t in o.new_token_ids]
    sunk: list[int] = []
    yielded = [o async for o in engine.generate("sunk", prompt, params, sink=lambda o: sunk.extend(o.new_token_ids))]
    assert len(yielded) == 1 and yielded[0].finished
    assert sunk + yielded[0].new_token_ids == plain and len(plain) == 12

    def refuse(_: object) -> None:
        raise ConnectionError("the channel closed")

    with pytest.raises(ConnectionError, match="channel closed"):
        async for _ in engine.generate("refused", prompt, SamplingParams(max_tokens=100, ignore_eos=True), sink=refuse):
            pass
    await assert_all_aborted(engine)
    engine.shutdown()


async def test_the_idle_hook_runs_once_per_idle_spell_and_never_between_steps(tiny_model_dir: Path) -> None:
    """The replica gives freed heap pages back through `on_idle` (deployments/memory.py): after work and
    IDLE_S without any, once; not while requests run, and not again until more work has come and gone."""
    from deployments.engine import async_engine

    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=4))
    calls: list[tuple[float, bool]] = []
    engine.on_idle = lambda: calls.append((time.monotonic(), engine.engine.has_unfinished()))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompt = engine.engine.encode("The quick brown fox")

    async def run(request_id: str) -> float:
        assert len([o async for o in engine.generate(request_id, prompt, params)]) >= 1
        return time.monotonic()

    await asyncio.sleep(async_engine.IDLE_S * 1.5)
    assert calls == []  # idle from the start: nothing was freed yet
    ended = await run("a")
    await asyncio.sleep(async_engine.IDLE_S * 2.5)
    assert len(calls) == 1 and calls[0][0] >= ended + async_engine.IDLE_S * 0.9 and not calls[0][1]
    ended = await run("b")
    await asyncio.sleep(async_engine.IDLE_S * 1.5)
    assert len(calls) == 2 and calls[1][0] >= ended
    engine.shutdown()


async def test_shutdown_ends_open_streams_with_a_clear_error(tiny_model_dir: Path) -> None:
    engine = AsyncLLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=256))
    stream = engine.generate("long", engine.engine.encode("Hi"), SamplingParams(max_tokens=250, ignore_eos=True))
    await stream.__anext__()
    await asyncio.to_thread(engine.shutdown)
    with pytest.raises(EngineDeadError, match="unloaded"):
        async for _ in stream:
            pass
