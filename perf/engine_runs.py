"""The workloads `bench_engine.py` times: our engine in each weight format (`ours-fp32`, `ours-bf16`,
`ours-int4`) and transformers' baselines on their own fp32 model from the same checkpoint (naive
`generate` one by one, static left-padded `generate`, continuous batching `generate_batch`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from deployments.engine import EngineConfig, LLMEngine, SamplingParams

Ids = list[list[int]]
WEIGHT_VARIANTS = {"ours-fp32": "fp32", "ours-bf16": "bf16", "ours-int4": "int4"}
"""Our engine, one variant per weight format (`EngineConfig.weights`)."""
BASELINES = ("naive", "static", "cb")
"""transformers on its own model (loaded once by `load_reference`)."""
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx")
OURS_NOTE = {"ttft_note": "from add_request (a request is added when a slot is free)"}
NOTES = {
    **{name: dict(OURS_NOTE) for name in WEIGHT_VARIANTS},
    "naive": {"ttft_note": "from t=0 (all submitted at once); TPOT measured per token with a streamer"},
    "static": {"ttft_note": "first batched step from t=0; TPOT = (last - first step) / (L - 1)"},
    "cb": {"call": "model.generate_batch(inputs=prompt_ids, generation_config=GenerationConfig(do_sample=False, "
           "max_new_tokens=L, eos_token_id=-1), record_timestamps=True, max_new_tokens=L); the manager is built "
           "in the warm-up (persistent_manager=True, ContinuousBatchingConfig(max_requests_per_batch=C)) and "
           "reused by the timed call; TTFT from the call; wall includes the manager's start/stop"},
}


def cpu_features() -> dict[str, Any]:
    """torch's CPU kernel level and the CPU flags the fast int4/bf16 kernels key on (`amx`: any amx_* flag)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    present = {name: name in flags for name in CPU_FLAGS if name != "amx"}
    present["amx"] = any(f.startswith("amx") for f in flags)
    return {"torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "cpu_flag_present": present}


@dataclass
class Bench:
    """What a variant runs on: our engine (ours-*) or transformers' reference model (baselines),
    whichever is loaded, plus the tokenizer, the workload's concurrency and per-variant notes."""

    concurrency: int
    device: torch.device
    tokenizer: Any
    engine: LLMEngine | None = None
    reference: Any = None
    notes: dict[str, dict[str, Any]] = field(default_factory=lambda: {k: dict(v) for k, v in NOTES.items()})
    cb_config: ContinuousBatchingConfig | None = None

    @property
    def model(self) -> Any:
        if self.reference is None:
            raise RuntimeError("no transformers reference model is loaded")
        return self.reference

    def generation_config(self, output_len: int) -> GenerationConfig:
        pad = self.tokenizer.pad_token_id
        return GenerationConfig(do_sample=False, max_new_tokens=output_len, eos_token_id=-1, pad_token_id=pad)


def load_engine(model: str, weights: str, device: str, concurrency: int, threads: int | None) -> LLMEngine:
    """Our engine on `model` in one weight format, sized for `concurrency` streams."""
    return LLMEngine(EngineConfig(model=model, weights=weights, device=device, max_num_seqs=concurrency,
                                  num_threads=threads))


def load_reference(directory: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """transformers' own model from the checkpoint directory (for a GGUF: the engine's cached conversion)."""
    model: Any = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def engine_facts(engine: LLMEngine) -> dict[str, Any]:
    """What the engine serves: weight format and why, source format, bytes, KV cache."""
    runner = engine.runner
    return {"weights": runner.weights, "weights_reason": runner.weights_reason, "quantization": runner.quantization,
            "weights_bytes": runner.weights_bytes(), "facts": runner.facts, "config": dict(engine.config.__dict__)}


@dataclass
class RunResult:
    wall_s: float
    ttft_s: list[float]
    tpot_s: list[float]
    token_ids: Ids


class TokenTimer(BaseStreamer):
    """Records when each generation step ends (the first `put` is the prompt and is skipped)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


def tpot(first: float, last: float, num_tokens: int) -> float:
    return (last - first) / (num_tokens - 1) if num_tokens > 1 else 0.0


def run_ours(bench: Bench, prompt_ids: Ids, output_len: int) -> RunResult:
    engine, params = bench.engine, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    if engine is None:
        raise RuntimeError("no engine is loaded")
    pending = list(range(len(prompt_ids)))
    tokens: Ids = [[] for _ in prompt_ids]
    added: dict[int, float] = {}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    done: set[int] = set()
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and len(added) - len(done) < bench.concurrency:
            i = pending.pop(0)
            added[i] = time.perf_counter()
            engine.add_request(str(i), prompt_ids[i], params)
        for out in engine.step():
            i, now = int(out.request_id), time.perf_counter()
            if out.new_token_ids:
                tokens[i].extend(out.new_token_ids)
                first.setdefault(i, now)
                last[i] = now
            if out.finished:
                done.add(i)
    wall, order = time.perf_counter() - start, range(len(prompt_ids))
    tpots = [tpot(first[i], last[i], len(tokens[i])) for i in order]
    return RunResult(wall, [first[i] - added[i] for i in order], tpots, tokens)


@torch.inference_mode()
def run_naive(bench: Bench, prompt_ids: Ids, output_len: int) -> RunResult:
    config, ttft, tpots, tokens = bench.generation_config(output_len), [], [], []
    start = time.perf_counter()
    for ids in prompt_ids:
        timer, input_ids = TokenTimer(), torch.tensor([ids], device=bench.device)
        out = bench.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
                                   streamer=timer)
        tokens.append(out[0, len(ids):].tolist())
        ttft.append(timer.times[0] - start)  # every request was submitted at t=0
        tpots.append(tpot(timer.times[0], timer.times[-1], len(timer.times)))
    return RunResult(time.perf_counter() - start, ttft, tpots, tokens)


@torch.inference_mode()
def run_static(bench: Bench, prompt_ids: Ids, output_len: int) -> RunResult:
    tokenizer, timer = bench.tokenizer, TokenTimer()
    tokenizer.padding_side = "left"
    start = time.perf_counter()
    batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(bench.device)
    out = bench.model.generate(**batch, generation_config=bench.generation_config(output_len), streamer=timer)
    tokens = out[:, batch["input_ids"].shape[1]:].tolist()
    wall, n = time.perf_counter() - start, len(prompt_ids)
    return RunResult(wall, [timer.times[0] - start] * n, [tpot(timer.times[0], timer.times[-1], output_len)] * n,
                     tokens)


def cb_config(concurrency: int, prompt_ids: Ids, output_len: int) -> ContinuousBatchingConfig:
    """Sized for the full workload as generate_batch's own hints would be, with C requests per batch."""
    config = ContinuousBatchingConfig(max_requests_per_batch=concurrency)
    blocks = math.ceil((max(len(ids) for ids in prompt_ids) + output_len) / config.page_size) + 1
    config.max_blocks_per_request = blocks + blocks % 2
    return config


@torch.no_grad()
def run_cb(bench: Bench, prompt_ids: Ids, output_len: int, warmup: bool = False) -> RunResult:
    model, notes = bench.model, bench.notes["cb"]
    notes["attn_implementation_loaded"] = model.config._attn_implementation
    kwargs: dict[str, Any] = {"continuous_batching_config": bench.cb_config} if warmup else {}
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompt_ids, generation_config=bench.generation_config(output_len),
                                   record_timestamps=True, persistent_manager=warmup, max_new_tokens=output_len,
                                   **kwargs)
    wall, outs = time.perf_counter() - start, list(results.values())
    errors = [o.error for o in outs if o.error is not None]
    if len(outs) != len(prompt_ids) or errors:
        model.destroy_cached_continuous_batching_manager()
        raise RuntimeError(f"generate_batch returned {len(outs)}/{len(prompt_ids)} results, errors: {errors[:3]}")
    window = max(o.lifespan[1] for o in outs) - min(o.created_time for o in outs)
    notes.update(generation_window_s=window,
                 output_tokens_per_s_in_window=sum(len(o.generated_tokens) for o in outs) / window)
    ttft = [o.timestamps[0] - start for o in outs]
    tpots = [tpot(o.timestamps[0], o.timestamps[-1], len(o.timestamps)) for o in outs]
    return RunResult(wall, ttft, tpots, [list(o.generated_tokens) for o in outs])
