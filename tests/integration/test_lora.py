"""LoRA adapters in the real engine against PEFT itself (fp32, tiny Llama and Gemma 3 bases).

Adapters of one base and the base run mixed in one batch; every greedy output equals
`PeftModel.generate(do_sample=False)` token for token, together and staggered, across preemption
and prefix-cache hits (whose hashes include the adapter). Bad adapters are refused with a reason.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.engine import EngineConfig, LLMEngine, SamplingParams, kernels
from deployments.engine.adapter_loader import AdapterError, load_adapter
from tests.tiny_models import save_lora_adapter

PROMPTS = ["The quick brown fox", "Ray Serve hosts models behind one", "Hi", "Continuous batching admits new requests", "naïve café"]
ADAPTERS = ["a", None, "b", "a", "c"]  # request i runs with ADAPTERS[i] (None: the base)
NEW_TOKENS = 16


def make_adapter(base_dir: Path, out: Path, seed: int, rank: int, targets: list[str] | None = None) -> Path:
    return save_lora_adapter(base_dir, out, seed, rank, targets)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_model_dir, root / "a", 1, 8),
        "b": make_adapter(tiny_model_dir, root / "b", 2, 4, ["q_proj", "v_proj", "down_proj"]),  # a subset of layers, lower rank
        "c": make_adapter(tiny_model_dir, root / "c", 3, 8),
    }


@functools.lru_cache(maxsize=None)
def reference(base_dir: Path, adapter_dirs: tuple[tuple[str, Path], ...]) -> list[list[int]]:
    """PEFT's own greedy tokens for each (prompt, adapter) pair."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    (first, first_dir), *rest = adapter_dirs
    model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    out = []
    for prompt, adapter in zip(PROMPTS, ADAPTERS):
        ids = tokenizer(prompt, return_tensors="pt")
        kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        if adapter is None:
            with model.disable_adapter():
                generated = model.generate(**ids, **kwargs)
        else:
            model.set_adapter(adapter)
            generated = model.generate(**ids, **kwargs)
        out.append(generated[0, ids.input_ids.shape[1] :].tolist())
    return out


def lora_engine(base_dir: Path, adapter_dirs: dict[str, Path], **overrides: object) -> LLMEngine:
    settings: dict[str, object] = {"model": str(base_dir), "weights": "fp32", "max_num_seqs": 3, "max_loras": 3, "max_lora_rank": 8}
    engine = LLMEngine(EngineConfig(**(settings | overrides)))  # type: ignore[arg-type]
    for name, path in adapter_dirs.items():
        engine.add_adapter(load_adapter(path, name, 8))
    return engine


def run(engine: LLMEngine, arrive_every: int | None, tag: str = "") -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens: dict[str, list[int]] = {f"{tag}{i}": [] for i in range(len(PROMPTS))}
    pending = list(enumerate(zip(PROMPTS, ADAPTERS)))
    step = 0
    while pending or engine.has_unfinished():
        if pending and (arrive_every is None or step % arrive_every == 0):
            batch, pending = (pending, []) if arrive_every is None else (pending[:1], pending[1:])
            for i, (prompt, adapter) in batch:
                engine.add_request(f"{tag}{i}", engine.encode(prompt), params, adapter)
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        step += 1
    return [tokens[f"{tag}{i}"] for i in range(len(PROMPTS))]


SCENARIOS = {
    "plain": {},
    "chunked": {"max_num_batched_tokens": 5},
    "preempting": {"kv_cache_bytes": 12 * 4 * 512, "block_size": 4},
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arrive_every", [None, 3], ids=["together", "staggered"])
def test_mixed_adapter_batches_equal_peft(scenario: str, arrive_every: int | None, tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    expected = reference(tiny_model_dir, tuple(adapters.items()))
    engine = lora_engine(tiny_model_dir, adapters, **SCENARIOS[scenario])
    assert len(set(map(tuple, expected))) == len(expected)  # the adapters really change the output
    assert run(engine, arrive_every) == expected
    if scenario == "preempting":
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0 and not engine.adapters.in_use


@pytest.mark.parametrize("arrive_every", [None, 3], ids=["together", "staggered"])
def test_mixed_adapter_batches_equal_peft_through_torchs_ops(
    arrive_every: int | None, tiny_model_dir: Path, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The masked-GEMM path (GPU, or our CPU kernels switched off) gives PEFT's tokens too."""
    monkeypatch.setenv(kernels.ENV, "torch")
    expected = reference(tiny_model_dir, tuple(adapters.items()))
    assert run(lora_engine(tiny_model_dir, adapters), arrive_every) == expected


def test_int4_decode_steps_in_one_call_apply_each_tokens_adapter(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    """int4 weights: decode steps run every layer in one kernel call (decode_layers), LoRA included; the
    tokens equal the per-layer Python loop over the same kernels (and the adapters change them)."""
    engine = lora_engine(tiny_model_dir, adapters, weights="int4")
    model = engine.runner.model
    plan = model._decode_plan()
    assert plan is not None and plan.lora_owner is engine.runner.lora and len(plan.lora) == 16 * len(model.layers)
    assert engine.runner.lora is not None and engine.runner.lora.dtype == torch.int8  # slots int8 where our kernel runs
    one_call = run(engine, 3, "a")
    model._decode_plan = lambda *_: None  # the Python loop over the same kernels
    assert run(engine, 3, "b") == one_call
    assert len(set(map(tuple, one_call))) == len(one_call)


def test_prefix_cache_hits_only_under_the_same_adapter(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    expected = reference(tiny_model_dir, tuple(adapters.items()))
    engine = lora_engine(tiny_model_dir, adapters, block_size=4)
    assert run(engine, None, "first-") == expected
    hits = engine.block_manager.num_prefix_hits
    assert run(engine, None, "again-") == expected  # the same prompts and adapters: cached blocks reused
    assert engine.block_manager.num_prefix_hits > hits
    # One prompt under every adapter in turn: only its own earlier run may be a hit.
    prompt = engine.encode(PROMPTS[3] + " and more words to fill blocks")
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request("x-a", prompt, params, "a")
    while engine.has_unfinished():
        engine.step()
    before = engine.block_manager.num_prefix_hits
    for adapter in ("b", None, "c"):
        engine.add_request(f"x-{adapter}", prompt, params, adapter)
        while engine.has_unfinished():
            engine.step()
    assert engine.block_manager.num_prefix_hits == before


def test_removing_an_adapter_in_use_retires_it_until_its_requests_end(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    engine = lora_engine(tiny_model_dir, {"a": adapters["a"]}, max_loras=1)
    engine.add_request("r", engine.encode("Hi"), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), "a")
    engine.step()
    engine.remove_adapter("a")
    with pytest.raises(AdapterError, match="not loaded"):
        engine.add_request("new", engine.encode("Hi"), SamplingParams(max_tokens=2), "a")
    with pytest.raises(AdapterError, match="slots are in use"):
        engine.add_adapter(load_adapter(adapters["c"], "c", 8))
    while engine.has_unfinished():
        engine.step()
    assert engine.adapters.slot_of == {}  # freed once its request ended
    engine.add_adapter(load_adapter(adapters["c"], "c", 8))
    assert float(engine.runner.lora.layers[0].lora_a.abs().sum()) > 0  # type: ignore[union-attr]


def test_bad_adapters_are_refused_with_a_reason(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    engine = lora_engine(tiny_model_dir, {}, max_lora_rank=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty", "x", 8)
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["a"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(pickled, "pickled", 8)
    with pytest.raises(AdapterError, match="rank 8 is over this server's max_lora_rank of 4"):
        load_adapter(adapters["a"], "a", 4)
    wider = tmp_path / "wider"  # made for a base whose MLP is wider than ours
    shutil.copytree(adapters["b"], wider)
    state = load_file(wider / "adapter_model.safetensors")
    key = next(k for k in state if "down_proj.lora_A" in k)
    state[key] = torch.randn(state[key].shape[0], state[key].shape[1] * 2)
    save_file(state, wider / "adapter_model.safetensors")
    weights = load_adapter(wider, "wider", 4)
    with pytest.raises(AdapterError, match="another base model"):
        engine.add_adapter(weights)
    assert engine.adapters.slot_of == {}  # nothing was half written
    dora = tmp_path / "dora"
    shutil.copytree(adapters["b"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(dora, "dora", 8)
