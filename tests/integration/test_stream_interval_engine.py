"""The stream interval on the real engine (AsyncLLMEngine + engine/stream_interval.py): under load each
request's outputs carry two steps' tokens (`auto`), the same tokens as one per step, its first token alone;
one stream still gets one token per output; lanes and one batch alike."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.engine import AsyncLLMEngine, EngineConfig, SamplingParams, kernels
from deployments.engine.request import RequestOutput

PROMPTS = ["The quick brown fox", "Ray Serve hosts models", "A paged cache holds", "One two three four five six",
           "Hello", "Tokens stream over SSE to every client", "Lanes", "The sea on a calm night", "Two more", "prompts"]
MAX_TOKENS = 24


async def deliveries(engine: AsyncLLMEngine, prompts: list[str]) -> list[list[list[int]]]:
    """Each request's outputs as delivered by the engine (a sink sees every output but the last, uncoalesced)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    # Tokenized first: tokenizing inside each request let the engine thread start stepping the first few
    # requests before the rest arrived (fewer than 8 running: single outputs), now and then.
    token_ids = [engine.engine.encode(prompt) for prompt in prompts]

    async def one(i: int) -> list[list[int]]:
        seen: list[list[int]] = []

        def sink(out: RequestOutput) -> None:
            seen.append(out.new_token_ids)

        async for out in engine.generate(f"r{i}", token_ids[i], params, sink=sink):
            seen.append(out.new_token_ids)  # only the last comes here
        return seen

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def run(config: EngineConfig, prompts: list[str]) -> list[list[list[int]]]:
    engine = AsyncLLMEngine(config)
    try:
        return asyncio.run(deliveries(engine, prompts))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("weights", ["fp32", "int4"], ids=["one-batch", "lanes"])
def test_auto_merges_two_steps_per_output_under_load_with_the_same_tokens(weights: str, tiny_model_dir: Path) -> None:
    if weights == "int4" and kernels.load("native") is None:
        pytest.skip("CPU kernels not built here: no lanes")
    base = {"model": str(tiny_model_dir), "weights": weights, "max_num_seqs": 10, "block_size": 4, "num_threads": 2}
    every_step = run(EngineConfig(**base, stream_interval=1), PROMPTS)  # type: ignore[arg-type]
    paced = run(EngineConfig(**base, stream_interval="auto"), PROMPTS)  # type: ignore[arg-type]
    for ones, pairs in zip(every_step, paced):
        assert [t for o in pairs for t in o] == [t for o in ones for t in o]  # the same tokens, in order
        assert [len(o) for o in ones] == [1] * MAX_TOKENS
        assert len(pairs[0]) == 1  # the first token is not held
        assert max(map(len, pairs)) == 2 and len(pairs) < MAX_TOKENS
        if weights == "fp32":  # one batch: all ten run to the end, so pairs throughout
            assert len(pairs) <= MAX_TOKENS // 2 + 1
        # (lanes: one lane may end its requests first; the other's last tokens then come singly, 5 < 8 running)


def test_one_stream_gets_every_token_as_it_comes(tiny_model_dir: Path) -> None:
    config = EngineConfig(model=str(tiny_model_dir), weights="fp32", max_num_seqs=10, block_size=4, stream_interval="auto")
    (outputs,) = run(config, PROMPTS[:1])
    assert [len(o) for o in outputs] == [1] * MAX_TOKENS


def test_models_view_reports_the_interval_and_the_outputs_it_merged(tiny_model_dir: Path) -> None:
    """What GET /models shows for a replica: its stream_interval, and kv_cache.outputs_merged counting the
    outputs held back under load (none with stream_interval 1)."""
    from deployments.protocol import GenerateRequest
    from deployments.server import ModelServer

    async def serve_all(server: ModelServer) -> None:
        async def one(prompt: str) -> None:
            request = GenerateRequest(params={"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}, prompt=prompt)
            async for _ in server.generate(request):
                pass

        await asyncio.gather(*(one(p) for p in PROMPTS))

    merged = {}
    for interval in (1, "auto"):
        config = EngineConfig(model=str(tiny_model_dir), weights="fp32", max_num_seqs=10, block_size=4, stream_interval=interval)
        server = ModelServer("tiny", config)
        try:
            asyncio.run(serve_all(server))
            status = server.status()
            assert status.stream_interval == interval
            assert status.kv_cache is not None
            merged[interval] = status.kv_cache["outputs_merged"]
        finally:
            asyncio.run(server.unload())
    assert merged[1] == 0 and merged["auto"] >= len(PROMPTS) * (MAX_TOKENS // 2 - 2)
