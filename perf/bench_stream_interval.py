"""SmolLM2 at 10 streams with `stream_interval` 1 and `auto`, alternated in one run, over HTTP and in process.

Over HTTP one Ray Serve app serves SmolLM2 twice (`smollm2-every-step`, `smollm2-auto`: two replicas, the
same engine settings but the stream interval); in process two engine workers (bench_interleave's). Each
turn is one system (interval x path) in bench_interleave's manner: a closed loop of --requests at
--concurrency, the other path's processes stopped meanwhile, the four systems in a rotated order each
round, so the host's fast and slow spells fall on all alike. Reports each system's median tok/s and ITL
p50 (per event) and the per-round ratios auto / 1 on each path.
Writes perf/results/<name>.json. Run: python perf/bench_stream_interval.py --rounds 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from perf import bench_interleave as bi  # noqa: E402  (bench_peer first: Ray's loopback environment)
from perf import bench_peer  # noqa: E402
from perf.bench_serving import build_prompts, run_client  # noqa: E402
from perf.common import MODELS  # noqa: E402
from perf.peer_measure import log, measure_http, point  # noqa: E402

import psutil  # noqa: E402

INTERVALS = {"every-step": 1, "auto": "auto"}
SYSTEMS = [f"{path}-{name}" for name in INTERVALS for path in ("http", "inproc")]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_id, source = MODELS["smollm2"]
    workers = {f"inproc-{name}": bi.Worker([sys.executable, bi.__file__, "--worker-ours", source, str(args.concurrency),
                                            str(args.max_num_seqs), str(interval)]) for name, interval in INTERVALS.items()}
    variants = {f"{model_id}-{name}": {"stream_interval": interval} for name, interval in INTERVALS.items()}
    turns: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    with bench_peer.ours_app(args, "smollm2", variants) as url:
        try:
            def one_turn(system: str, tag: str) -> dict[str, Any]:
                prompts = [f"Request {tag}.{i}: {p}" for i, p in enumerate(build_prompts(args.requests, args.seed))]
                worker_pids = set().union(*(w.pids() for w in workers.values()))
                ray_pids = {c.pid for c in psutil.Process().children(recursive=True)} - worker_pids
                path, name = system.split("-", 1)
                if path == "http":
                    with bi.stopped(worker_pids):
                        fig = run_client(measure_http(f"{url}/v1", f"{model_id}-{name}", {args.concurrency: prompts}, args.output_len))
                        return fig[str(args.concurrency)]  # type: ignore[no-any-return]
                with bi.stopped(ray_pids | (worker_pids - workers[system].pids())):
                    return point(workers[system].turn(prompts, args.output_len), args.output_len)

            for system in SYSTEMS:  # warm-up turns, not kept
                one_turn(system, f"warm.{system}")
            for r in range(args.rounds):
                order = SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]
                for system in order:
                    fig = one_turn(system, f"{r}.{system}")
                    turns[system].append(fig)
                    log(f"round {r} {system}: {fig['output_throughput']:.1f} tok/s, ITL p50 {fig['itl_ms']['p50']:.2f} ms")
        finally:
            for w in workers.values():
                w.close()
    tps = {s: [t["output_throughput"] for t in turns[s]] for s in SYSTEMS}
    ratios = {f"{path} auto / every-step": bi.ratio_stats(tps[f"{path}-auto"], tps[f"{path}-every-step"]) for path in ("http", "inproc")}
    ratios |= {f"http / inproc, {name}": bi.ratio_stats(tps[f"http-{name}"], tps[f"inproc-{name}"]) for name in INTERVALS}
    return {"turns": turns, "summary": {s: bi.summary(turns[s]) for s in SYSTEMS}, "ratios": ratios}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    bi.add_turn_args(p, "bench_stream_interval")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    path = bi.write_report(args, result, t0, ("torch", "transformers", "ray"))
    bi.print_result(result, width=18)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
