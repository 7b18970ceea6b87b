"""GPTQ checkpoints (the optional `.[gptq]` extra): made here from the shipped SmolLM2, served by the engine.

The checkpoint is quantized on CPU (transformers GPTQConfig -> optimum -> gptqmodel) with a small
calibration set (about a minute), in the background on idle CPU while earlier tests run
(tests/prepare.py), or here if that did not happen; without gptqmodel the module is skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")

from transformers import AutoModelForCausalLM  # noqa: E402

from deployments.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from perf.make_gptq import make_gptq_checkpoint, weights_file_bytes  # noqa: E402
from tests import prepare  # noqa: E402

PROMPT = "The capital of France is"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = prepare.prepared_gptq_checkpoint()  # made in the background on idle CPU (tests/prepare.py)
    if out is None:
        out = tmp_path_factory.mktemp("smollm2-gptq")
        make_gptq_checkpoint(out, samples=prepare.GPTQ_SAMPLES)
    assert weights_file_bytes(out) < 200 * 2**20  # fp32 SmolLM2 is 538 MB; fp32 tied embeddings keep 113 MB
    return out


@pytest.fixture(scope="module")
def engine(gptq_dir: Path) -> LLMEngine:
    # One thread: GPTQ's small int4 matmuls gain nothing from two here, and a busy 2-core box stalls on them.
    return LLMEngine(EngineConfig(model=str(gptq_dir), max_num_seqs=4, num_threads=1))


def greedy(engine: LLMEngine, prompts: list[str]) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), engine.encode(prompt), params)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[str(i)] for i in range(len(prompts))]


def test_linear_layers_are_gptqmodel_quant_layers(engine: LLMEngine) -> None:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    layers = engine.runner.model.hf.model.layers  # the generic adapter: transformers modules, our paged attention
    projections = [m for layer in layers for m in (*layer.self_attn.children(), *layer.mlp.children())
                   if hasattr(m, "in_features")]
    assert len(projections) == 7 * len(layers)
    assert all(isinstance(m, BaseQuantLinear) for m in projections), {type(m).__name__ for m in projections}
    assert engine.runner.quantization == "gptq-4bit-g64 -> fp32" and engine.runner.facts["implementation"] == "transformers"
    assert engine.runner.weights_bytes() < 200 * 2**20


def test_greedy_output_is_sensible_and_stable(engine: LLMEngine, gptq_dir: Path) -> None:
    first = greedy(engine, [PROMPT])[0]
    assert "Paris" in engine.tokenizer.decode(first), engine.tokenizer.decode(first)
    # Same tokens again, and when batched with other requests.
    assert greedy(engine, [PROMPT])[0] == first
    assert greedy(engine, [PROMPT, "def fibonacci(n):"])[0] == first

    # And the same as transformers' own generate on the checkpoint loaded the plain way.
    model = AutoModelForCausalLM.from_pretrained(str(gptq_dir), local_files_only=True).eval()
    ids = engine.tokenizer(PROMPT, return_tensors="pt")
    generated = model.generate(**ids, do_sample=False, max_new_tokens=NEW_TOKENS)[0, ids.input_ids.shape[1] :].tolist()
    eos = engine.tokenizer.eos_token_id
    until_eos = generated[: generated.index(eos) + 1] if eos in generated else generated
    assert [t for t in until_eos if t != eos] == [t for t in first if t != eos]


FIRST_UNLOAD = """
import asyncio, sys, weakref
from deployments.engine import EngineConfig
from deployments.server import ModelServer

async def main():
    server = ModelServer("gptq", EngineConfig(model=sys.argv[1], max_model_len=128), load_on_start=False)
    await server.load()
    model = weakref.ref(server.engine.engine.runner.model)
    await server.unload()
    print("alive" if model() is not None else "freed")

asyncio.run(main())
"""


def test_first_gptq_unload_frees_the_model(gptq_dir: Path) -> None:
    """In a fresh process, where gptqmodel is first imported by the load itself: its import keeps
    the importing frames alive, which held the first model after unload until the loader imported it
    on a thread of its own."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", FIRST_UNLOAD, str(gptq_dir)], cwd=root, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "freed"
