"""What CPU taken by other processes costs a 10-stream engine: ours and OpenVINO GenAI, in process, with and
without synthetic load beside them, in short alternated turns.

Why: through Ray Serve our engine shares the host's two cores with the serving path (router, HAProxy, the
client) and Ray's own processes. If the engine lost only the CPU those take, it would lose ~1x their share;
this measures how much it really loses per unit of CPU taken (the amplification), for ours and for
OpenVINO's threading, with the same load beside each. The load is `--burners` processes that each wake
every `--period-ms` and spin for `--burn-ms` (the serving path wakes per token and per step). Each turn is
bench_interleave's: 20 requests at 10 streams, 128 tokens, SmolLM2; the systems not in the turn are stopped
(SIGSTOP), as are the burners in the turns without load. Per turn: tok/s and the burners' measured CPU.

  python perf/bench_preemption.py --rounds 6 [--systems ours,openvino] [--burners 4 --period-ms 2.5 --burn-ms 0.1]

Writes perf/results/<name>.json: per system the median throughput with and without load, the loss, the
load's share of the two cores, and their ratio (loss / share: 1 = the engine loses exactly the CPU taken).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from perf import bench_interleave as bi  # noqa: E402
from perf import bench_peer  # noqa: E402
from perf.bench_serving import build_prompts  # noqa: E402
from perf.common import MODELS  # noqa: E402
from perf.peer_measure import log  # noqa: E402

BURNER = """import sys, time
period, burn = float(sys.argv[1]) / 1e3, float(sys.argv[2]) / 1e3
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < burn:
        pass
    time.sleep(max(0.0, period - (time.perf_counter() - t)))
"""


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    source, gguf = MODELS["smollm2"][1], str(bench_peer.gguf_path("smollm2"))
    workers: dict[str, bi.Worker] = {}
    ours = [sys.executable, bi.__file__, "--worker-ours", source, str(args.concurrency), str(args.max_num_seqs),
            str(args.stream_interval)]
    if "ours" in args.systems:
        workers["ours"] = bi.Worker(ours)
    if "ours-one-batch" in args.systems:  # the step's kernels over both threads, without decode lanes (engine/lanes.py)
        workers["ours-one-batch"] = bi.Worker(ours, env={"LLM_SERVE_LANE_MIN_SEQS": "0"})
    if "openvino" in args.systems:
        py_ov, _ = bench_peer.openvino_python(args)
        workers["openvino"] = bi.Worker([str(py_ov), str(REPO_ROOT / "perf/peer_openvino.py"), "--serve", gguf, str(args.concurrency)])
    burners = [subprocess.Popen([sys.executable, "-c", BURNER, str(args.period_ms), str(args.burn_ms)]) for _ in range(args.burners)]
    burner_pids = [b.pid for b in burners]
    turns: dict[str, dict[str, list[dict[str, float]]]] = {s: {"quiet": [], "load": []} for s in workers}
    try:
        def one_turn(system: str, loaded: bool, tag: str) -> dict[str, float]:
            prompts = [f"Request {tag}.{i}: {p}" for i, p in enumerate(build_prompts(args.requests, args.seed))]
            others = set().union(*(w.pids() for s, w in workers.items() if s != system))
            with bi.stopped(others | (set() if loaded else set(burner_pids))):
                c0, t0 = cpu_s(burner_pids), time.perf_counter()
                fig = bi.point(workers[system].turn(prompts, args.output_len), args.output_len)
                share = (cpu_s(burner_pids) - c0) / (time.perf_counter() - t0) / args.cores
            return {"tok_s": fig["output_throughput"], "load_share": share if loaded else 0.0, "itl_p50_ms": fig["itl_ms"]["p50"]}

        with bi.stopped(set(burner_pids)):
            for system in workers:
                one_turn(system, False, f"warm.{system}")
        plan = [(s, loaded) for s in workers for loaded in (False, True)]
        for r in range(args.rounds):
            for system, loaded in (plan if r % 2 == 0 else plan[::-1]):
                fig = one_turn(system, loaded, f"{r}.{system}.{loaded}")
                turns[system]["load" if loaded else "quiet"].append(fig)
                log(f"round {r} {system} {'load' if loaded else 'quiet'}: {fig['tok_s']:.1f} tok/s, load {100 * fig['load_share']:.1f}% of the cores")
    finally:
        for b in burners:
            b.kill()
        for w in workers.values():
            w.close()
    summary = {}
    for system, t in turns.items():
        quiet, load = [x["tok_s"] for x in t["quiet"]], [x["tok_s"] for x in t["load"]]
        loss = 1 - statistics.median(a / b for a, b in zip(load, quiet))
        share = statistics.median(x["load_share"] for x in t["load"])
        summary[system] = {"quiet_tok_s": statistics.median(quiet), "load_tok_s": statistics.median(load), "loss": loss,
                           "load_share": share, "amplification": loss / share if share else None}
    return {"turns": turns, "summary": summary}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", type=lambda s: s.split(","), default=["ours", "openvino"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--burners", type=int, default=4)
    p.add_argument("--period-ms", type=float, default=2.5)
    p.add_argument("--burn-ms", type=float, default=0.1)
    p.add_argument("--cores", type=int, default=len(psutil.Process().cpu_affinity() or [0]))
    bi.add_turn_args(p, "bench_preemption")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    path = bi.write_report(args, result, t0, ("torch", "transformers"))
    for system, s in result["summary"].items():
        print(f"{system:9s} quiet {s['quiet_tok_s']:.1f} tok/s, with load {s['load_tok_s']:.1f}: loss {100 * s['loss']:.1f}% for "
              f"{100 * s['load_share']:.1f}% of the cores taken (x{s['amplification']:.2f})")
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
