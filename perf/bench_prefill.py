"""Prefill attention, alternated in one process: our CPU kernel attending the prompt rows with the decodes
(`deployments.engine.layers.attention.PROMPTS_IN_KERNEL = True`, a step's layers in one `decode_layers` call)
against SDPA per prompt over gathered keys (`False`, the layers looped in Python), on the same engine.

Workloads (each turn a fresh unique head, so no prefix-cache hit): one bench prompt at a time (~50 tokens,
the 1-stream TTFT's prefill), ten bench prompts in one step (a 10-stream wave's first step), and one prompt
of --lengths tokens (chunked at 512 per step). The two modes alternate turn by turn; medians of --rounds.

    python perf/bench_prefill.py [--model smollm2|gemma] [--rounds 8] [--lengths 128,512,2048]

Prints one line per workload; writes perf/results/bench_prefill[_MODEL].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perf.bench_serving import build_prompts  # noqa: E402
from perf.common import MODELS, REPO_ROOT, machine  # noqa: E402

MODES = {"kernel": True, "sdpa": False}


def timed(engine: Any, prompts: list[list[int]], tag: str) -> float:
    """Milliseconds until every prompt's first token (its prefill steps) with max_tokens 1."""
    from deployments.engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--lengths", default="128,512,2048", help="single-prompt lengths in tokens")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from deployments.engine import EngineConfig, LLMEngine
    from deployments.engine.layers import attention

    engine = LLMEngine(EngineConfig(model=MODELS[args.model][1], max_num_seqs=16, enable_prefix_caching=False,
                                    max_model_len=4096, max_num_batched_tokens=512))
    engine.warm_up()
    bench = build_prompts(10 * args.rounds + 10, 0)
    filler = " ".join(f"word{j} is here and there" for j in range(900))
    lengths = [int(n) for n in args.lengths.split(",") if n]

    def workload(name: str, r: int, tag: str) -> list[list[int]]:
        head = f"Request {r}.{tag}: "
        if name == "1 prompt (~50 tokens)":
            return [engine.encode(head + bench[r])]
        if name == "10 prompts in one step":
            return [engine.encode(head + bench[10 * r + i]) for i in range(10)]
        return [engine.encode(head + filler)[: int(name.split()[0])]]

    names = ["1 prompt (~50 tokens)", "10 prompts in one step", *(f"{n} tokens, 1 prompt" for n in lengths)]
    rounds: dict[str, dict[str, list[float]]] = {name: {mode: [] for mode in MODES} for name in names}
    tokens: dict[str, float] = {}
    for name in names:
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                attention.PROMPTS_IN_KERNEL = MODES[mode]
                prompts = workload(name, r, mode)
                tokens[name] = sum(map(len, prompts)) / len(prompts)
                rounds[name][mode].append(timed(engine, prompts, f"{name}-{r}-{mode}"))
        med = {mode: statistics.median(v) for mode, v in rounds[name].items()}
        print(f"{name:24s} (~{tokens[name]:.0f} tokens each): SDPA {med['sdpa']:8.1f} ms   kernel {med['kernel']:8.1f} ms   "
              f"kernel/SDPA {med['kernel'] / med['sdpa']:.3f}", flush=True)
    attention.PROMPTS_IN_KERNEL = True
    summary = {name: {"tokens_per_prompt": tokens[name], **{f"{m}_ms": statistics.median(v) for m, v in by.items()},
                      "ratio": statistics.median(by["kernel"]) / statistics.median(by["sdpa"])} for name, by in rounds.items()}
    out = {"environment": machine(), "model": args.model, "rounds": rounds, "summary": summary}
    suffix = "" if args.model == "smollm2" else f"_{args.model}"
    path = Path(args.out or REPO_ROOT / f"perf/results/bench_prefill{suffix}.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
