"""Serving overhead: one workload in process (engine only) and through the full path
(HAProxy -> router -> model deployment, SSE; serve_app/ray_env.py), in the same run, on 127.0.0.1.

Reports HTTP/in-process output throughput at N concurrent streams, TTFT overhead at concurrency 1,
and ITL p99/p50 at N streams; with --sweep it then runs perf/bench_serving.py's sweep against the
same server. Writes perf/results/<name>.json (+ .png with matplotlib).
The two paths take turns (`--rounds`: in process, then HTTP, with the server up and the in-process
engine loaded throughout), and the ratio is the median of the rounds' ratios: a host whose speed
drifts by 20-40% over minutes (session 10's) otherwise decides the ratio by which path ran first.
Also reports the serving path's CPU per output token by part (engine threads, the replica's other
threads, router, HAProxy, the client, the rest of Ray). With --compare-channels the same model is
served twice, with channels (serve_app.channels) on and off, and the two alternate over HTTP.
Run: python perf/bench_overhead.py [--sweep] [--rounds 3] [--compare-channels]
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from perf.common import MODELS  # noqa: E402
from perf.engine_runs import Bench, cpu_features, engine_facts, run_ours  # noqa: E402

MODEL_ID, SOURCE = MODELS["smollm2"]  # --model changes them


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
    before = thread_cpu(MODEL_ID)
    streams = run_ours(bench(args.streams), ids, args.output_len)
    tokens = sum(len(t) for t in streams.token_ids)
    result: dict[str, Any] = {"output_throughput": tokens / streams.wall_s, "wall_s": streams.wall_s,
                              # the engine here is "client (this process)"; the server's processes idle meanwhile
                              "cpu_us_per_token": cpu_us_per_token(before, thread_cpu(MODEL_ID), tokens)}
    if c1:
        single = run_ours(bench(1), ids[: args.c1_requests], args.c1_output_len)
        ttft_ms = sorted(t * 1000 for t in single.ttft_s)
        result.update(c1_ttft_ms_p50=ttft_ms[len(ttft_ms) // 2], c1_ttft_ms=ttft_ms, engine=engine_facts(engine))
    return result


NO_CHANNELS_ID = MODEL_ID + "-no-channels"


def start_server(weights: str, compare_channels: bool = False) -> tuple[str, Any]:
    """The app on 127.0.0.1: our model (channels on, as configured by default) and, to compare, the
    same model again as a second deployment with `channels: false`."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    port = ray_env.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model = {"id": MODEL_ID, "source": SOURCE, "weights": weights, "max_num_seqs": 16, "max_ongoing_requests": 64, "num_cpus": 1}
    models = [model] + ([model | {"id": NO_CHANNELS_ID, "channels": False}] if compare_channels else [])
    serve.run(build_app({"models": models}), name="llm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
            return url, ray
        time.sleep(1)
    raise SystemExit("the server did not become ready")


def thread_cpu(model_id: str) -> dict[tuple[str, int], float]:
    """CPU seconds so far (user + system) of every thread of this process and its children, keyed by
    (role, thread id): the model replica, the router, HAProxy, this process (the HTTP client), another
    model's replica, or the rest of Ray's processes."""
    import psutil

    seconds: dict[tuple[str, int], float] = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            command, threads = " ".join(proc.cmdline()), proc.threads()
        except psutil.Error:
            continue
        if re.search(rf"model-{re.escape(model_id)}(\s|$)", command):
            role = "model replica"
        elif proc.pid == os.getpid():
            role = "client (this process)"
        elif "llm:router" in command:
            role = "router"
        elif "haproxy" in command:
            role = "haproxy"
        else:
            role = "other model replica" if ":model-" in command else "Ray (other processes)"
        for t in threads:
            seconds[(role, t.id)] = t.user_time + t.system_time
    return seconds


def cpu_us_per_token(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], tokens: float) -> dict[str, int]:
    """Per output token, by part; the model replica's two busiest threads over the run are the engine's
    OpenMP team, its other threads the serving loop, gRPC and Ray's."""
    used: dict[str, list[float]] = {}
    for key, total in after.items():
        used.setdefault(key[0], []).append(total - before.get(key, 0.0))
    replica = sorted(used.pop("model replica", []), reverse=True)
    used["model replica: engine threads"], used["model replica: other threads"] = replica[:2], replica[2:]
    return {role: round(1e6 * sum(values) / tokens) for role, values in used.items() if tokens}


async def over_http(args: argparse.Namespace, url: str, prompts: list[str], c1: bool, model_id: str) -> dict[str, Any]:
    def point_args(output_len: int) -> argparse.Namespace:
        return argparse.Namespace(base_url=f"{url}/v1", model=model_id, endpoint="completions", output_len=output_len,
                                  slo_ttft_ms=2000.0, slo_tpot_ms=200.0, seed=0, timeout_s=600.0)

    async with bench_serving.client_session(64) as client:
        await bench_serving.run_point(client, point_args(4), prompts[:2], concurrency=2)  # warm-up
        before = thread_cpu(model_id)
        streams = await bench_serving.run_point(client, point_args(args.output_len), prompts, concurrency=args.streams)
        # where the cores went during the N-stream run, per output token
        streams["cpu_us_per_token"] = cpu_us_per_token(before, thread_cpu(model_id), streams["output_throughput"] * streams["duration_s"])
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
    print("CPU per output token during the streams (us):", json.dumps(streams.get("cpu_us_per_token")))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2", choices=sorted(MODELS), help="which of our two models")
    p.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES, help="the engine's weight format (both paths)")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--c1-requests", type=int, default=5)
    p.add_argument("--c1-output-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="turns of in process then HTTP; the ratio is their median")
    p.add_argument("--compare-channels", action="store_true",
                   help="also serve the model with channels off (serve_app.channels) and alternate the two over HTTP")
    p.add_argument("--sweep", action="store_true", help="then run bench_serving's sweep against the same server")
    p.add_argument("--sweep-prompts", type=int, default=10, help="requests per sweep point")
    p.add_argument("--sweep-output-len", type=int, default=32)
    p.add_argument("--name", default="bench_overhead")
    p.add_argument("--out-dir", default="perf/results")
    args = p.parse_args()
    global MODEL_ID, SOURCE, NO_CHANNELS_ID
    MODEL_ID, SOURCE = MODELS[args.model]
    NO_CHANNELS_ID = MODEL_ID + "-no-channels"
    prompts = bench_serving.build_prompts(args.streams)
    engine = load_engine(args)
    ids = [engine.encode(p) for p in prompts]  # once: every round sends the same prompts
    url, ray = start_server(engine_facts(engine)["weights"], args.compare_channels)
    variants = {"channels": MODEL_ID} | ({"no channels": NO_CHANNELS_ID} if args.compare_channels else {})
    try:
        rounds: list[tuple[dict[str, Any], dict[str, dict[str, Any]]]] = []
        for r in range(args.rounds):  # the first round also measures TTFT at one stream on both paths
            local = in_process(args, engine, ids, c1=r == 0)
            order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternated: the host drifts
            http = {name: bench_serving.run_client(over_http(args, url, prompts, c1=r == 0, model_id=variants[name])) for name in order}
            rounds.append((local, http))
            print(f"round {r + 1}: in process {local['output_throughput']:.1f} tok/s, HTTP "
                  + ", ".join(f"{name} {h['streams']['output_throughput']:.1f}" for name, h in http.items())
                  + f"; the rest of Ray's CPU per token: in process {local['cpu_us_per_token'].get('Ray (other processes)')} us, HTTP "
                  + ", ".join(f"{h['streams']['cpu_us_per_token'].get('Ray (other processes)')}" for h in http.values()), flush=True)
        by_variant = {}
        for name in variants:
            ratios = [h[name]["streams"]["output_throughput"] / loc["output_throughput"] for loc, h in rounds]
            print(f"--- {name}")
            by_variant[name] = report(args, rounds[0][0], rounds[0][1][name], ratios) | {
                "cpu_us_per_token_median": {role: statistics.median(h[name]["streams"]["cpu_us_per_token"].get(role, 0) for _, h in rounds)
                                            for role in rounds[0][1][name]["streams"]["cpu_us_per_token"]}}
            print("median over rounds:", json.dumps(by_variant[name]["cpu_us_per_token_median"]))
        local, http = rounds[0][0], rounds[0][1]["channels"]
        figures = by_variant["channels"] | {"variants": by_variant}
        target = argparse.Namespace(base_url=url, model=MODEL_ID, endpoint="completions")
        environment = bench_serving.environment(target)
        data = {"environment": {**environment, **cpu_features()},
                "workload": vars(args), "in_process": local, "http": http, "figures": figures,
                "rounds": [{"in_process": loc["output_throughput"], "http": {n: v["streams"]["output_throughput"] for n, v in h.items()},
                            "cpu_us_per_token": {"in_process": loc["cpu_us_per_token"]} | {n: v["streams"]["cpu_us_per_token"] for n, v in h.items()}}
                           for loc, h in rounds]}
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
