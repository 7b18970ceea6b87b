"""SmolLM2 at 10 streams, in short turns alternated many times in one run: OpenVINO GenAI (in process),
ours through Ray Serve over HTTP/SSE, and ours in process.

Why: this host changes speed by itself for 10-60 s at a time (perf/README, session 21), and bench_peer.py
gives each system one 10-45 s turn per round, so a round can compare one system's fast minute with
another's slow one. Here every system stays loaded and the turns are a few seconds each, alternated
(each of the six orders in turn), so each meets the host's states alike. Each turn has the machine to
itself: the other systems' processes are stopped (SIGSTOP) for its length and continued after it -- for
OpenVINO's turns and ours in process, that is every process of the Ray session too, so they run as
bench_peer runs them, with no Ray on the host.

Workload per turn (bench_peer's): seeded bench_serving prompts with a unique head per request, 128 output
tokens (ignore_eos, greedy), a closed loop of --requests at --concurrency streams. tok/s of a turn = its
output tokens over the span from its first request's start to its last one's end.
Writes perf/results/<name>.json. Run: python perf/bench_interleave.py --rounds 12
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from perf import bench_peer  # noqa: E402  (applies Ray's loopback environment first)
from perf.bench_serving import Record, build_prompts, run_client  # noqa: E402
from perf.common import MODELS, machine  # noqa: E402
from perf.peer_measure import closed_loop, log, measure_http, point, records_of  # noqa: E402

import psutil  # noqa: E402

SYSTEMS = ("openvino", "ours-http", "ours-inproc")
ORDERS = list(itertools.permutations(SYSTEMS))  # every order in turn: no system always follows the same one


def worker_ours(source: str, concurrency: int, max_num_seqs: int, stream_interval: int | str = 1) -> None:
    """Ours in process, as a worker: one AsyncLLMEngine kept loaded; the same line protocol as
    peer_openvino.py --serve (a job per stdin line, its records as one JSON line)."""
    from deployments.engine import AsyncLLMEngine, EngineConfig

    engine = AsyncLLMEngine(EngineConfig(model=source, max_num_seqs=max_num_seqs, stream_interval=stream_interval))
    loop = asyncio.new_event_loop()  # one loop for the engine's life
    print(json.dumps({"ready": "ours"}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        send = lambda p, n: bench_peer.engine_stream(engine, p, n)  # noqa: E731
        loop.run_until_complete(closed_loop(send, job["prompts"][:2], 2, 4))  # warm-up, as OpenVINO's turn does
        records = loop.run_until_complete(closed_loop(send, job["prompts"], concurrency, job["output_len"]))
        print(json.dumps([{"start": r.start, "end": r.end, "chunk_times": r.chunk_times,
                           "completion_tokens": r.completion_tokens} for r in records]), flush=True)


class Worker:
    """A system that runs in a process of its own and answers one JSON line per job."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: TextIO = self.proc.stdin
        self.stdout: TextIO = self.proc.stdout
        ready = self.stdout.readline()
        if not ready:
            raise RuntimeError(f"{cmd[1]} ended before it was ready (exit {self.proc.wait()})")
        log(f"ready: {ready.strip()}")

    def turn(self, prompts: list[str], output_len: int) -> list[Record]:
        self.stdin.write(json.dumps({"prompts": prompts, "output_len": output_len}) + "\n")
        self.stdin.flush()
        return records_of(json.loads(self.stdout.readline()))

    def pids(self) -> set[int]:
        with contextlib.suppress(psutil.Error):
            return {self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))}
        return set()

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=60)


@contextlib.contextmanager
def stopped(pids: set[int]) -> Iterator[None]:
    """SIGSTOP these processes for the block, SIGCONT after it (whatever happens)."""
    frozen = []
    try:
        for pid in sorted(pids):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).send_signal(signal.SIGSTOP)
                frozen.append(pid)
        yield
    finally:
        for pid in frozen:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).send_signal(signal.SIGCONT)


def summary(turns: list[dict[str, Any]]) -> dict[str, Any]:
    tps = [t["output_throughput"] for t in turns]
    itl = [t["itl_ms"]["p50"] for t in turns if t.get("itl_ms")]
    return {"turns": len(turns), "tok_s_median": statistics.median(tps), "tok_s_min": min(tps), "tok_s_max": max(tps),
            "itl_p50_ms_median": statistics.median(itl) if itl else None}


def ratio_stats(num: list[float], den: list[float]) -> dict[str, Any]:
    per_round = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(per_round), "pooled": sum(num) / sum(den), "min": min(per_round),
            "max": max(per_round), "rounds_at_or_above_1": sum(r >= 1.0 for r in per_round), "per_round": per_round}


def run(args: argparse.Namespace) -> dict[str, Any]:
    source, gguf = MODELS["smollm2"][1], str(bench_peer.gguf_path("smollm2"))
    py_ov, _ = bench_peer.openvino_python(args)
    workers = {"openvino": Worker([str(py_ov), str(REPO_ROOT / "perf/peer_openvino.py"), "--serve", gguf, str(args.concurrency)]),
               "ours-inproc": Worker([sys.executable, __file__, "--worker-ours", source, str(args.concurrency), str(args.max_num_seqs),
                                            str(args.stream_interval)])}
    turns: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    with bench_peer.ours_app(args, "smollm2") as url:
        try:
            def one_turn(system: str, tag: str) -> dict[str, Any]:
                prompts = [f"Request {tag}.{i}: {p}" for i, p in enumerate(build_prompts(args.requests, args.seed))]
                worker_pids = set().union(*(w.pids() for w in workers.values()))
                ray_pids = {c.pid for c in psutil.Process().children(recursive=True)} - worker_pids  # as of now
                others = set().union(*(w.pids() for s, w in workers.items() if s != system))
                with stopped(others | (set() if system == "ours-http" else ray_pids)):
                    if system == "ours-http":
                        fig = run_client(measure_http(f"{url}/v1", MODELS["smollm2"][0], {args.concurrency: prompts}, args.output_len))
                        return fig[str(args.concurrency)]  # type: ignore[no-any-return]
                    return point(workers[system].turn(prompts, args.output_len), args.output_len)

            for system in SYSTEMS:  # warm-up turns, not kept
                one_turn(system, f"warm.{system}")
            for r in range(args.rounds):
                order = ORDERS[r % len(ORDERS)]
                for system in order:
                    fig = one_turn(system, f"{r}.{system}")
                    turns[system].append(fig)
                    log(f"round {r} {system}: {fig['output_throughput']:.1f} tok/s, ITL p50 {fig['itl_ms']['p50']:.2f} ms")
        finally:  # before ours_app's end, which kills every child process left
            for w in workers.values():
                w.close()
    tps = {s: [t["output_throughput"] for t in turns[s]] for s in SYSTEMS}
    return {"turns": turns, "summary": {s: summary(turns[s]) for s in SYSTEMS},
            "ratios": {"ours-http / openvino": ratio_stats(tps["ours-http"], tps["openvino"]),
                       "ours-inproc / openvino": ratio_stats(tps["ours-inproc"], tps["openvino"]),
                       "ours-http / ours-inproc": ratio_stats(tps["ours-http"], tps["ours-inproc"])}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12)
    add_turn_args(p, "bench_interleave")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--port", type=int, default=8000)
    return p.parse_args(argv)


def stream_interval_arg(value: str) -> int | str:
    """`auto` or a step count, as given on a command line."""
    return value if value == "auto" else int(value)


def add_turn_args(p: argparse.ArgumentParser, name: str) -> None:
    """The turn's workload and where results go (shared with bench_preemption.py)."""
    p.add_argument("--requests", type=int, default=20, help="requests per turn (closed loop at --concurrency)")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=16, help="our engine's batch limit (as config/serve.yaml)")
    p.add_argument("--stream-interval", type=stream_interval_arg, default=1,
                   help="our engine's steps per streamed output, in process and over HTTP alike (auto: 2 from 8 sequences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--openvino-venv", type=Path, default=REPO_ROOT / "perf/.venv-openvino")
    p.add_argument("--name", default=name)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "perf/results")


def write_report(args: argparse.Namespace, result: dict[str, Any], t0: float, packages: tuple[str, ...]) -> Path:
    """perf/results/<name>.json: the host, the workload, the result and the wall time."""
    report = {"environment": {**machine(), **{pkg: version(pkg) for pkg in packages}},
              "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              **result, "wall_s": time.perf_counter() - t0}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def main(argv: list[str] | None = None) -> None:
    if sys.argv[1:2] == ["--worker-ours"]:  # bench_interleave.py --worker-ours SOURCE CONCURRENCY MAX_NUM_SEQS STREAM_INTERVAL
        worker_ours(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), stream_interval_arg(sys.argv[5]))
        return
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    path = write_report(args, result, t0, ("torch", "transformers", "ray"))
    print_result(result)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


def print_result(result: dict[str, Any], width: int = 12) -> None:
    """Each system's median tok/s and ITL p50, then each ratio's per-round statistics."""
    for s, fig in result["summary"].items():
        print(f"{s:{width}s} tok/s median {fig['tok_s_median']:.1f} ({fig['tok_s_min']:.1f}-{fig['tok_s_max']:.1f}), "
              f"ITL p50 {fig['itl_p50_ms_median']:.2f} ms over {fig['turns']} turns")
    for name, r in result["ratios"].items():
        print(f"{name:{width + 12}s} median {r['median']:.3f}, pooled {r['pooled']:.3f}, rounds {r['min']:.2f}-{r['max']:.2f}, "
              f"{r['rounds_at_or_above_1']}/{len(r['per_round'])} rounds >= 1")


if __name__ == "__main__":
    main()
