"""Ours against peer engines: one streaming workload, side by side in one run on this host, for both GGUF models.

Seeded bench_serving prompts, 128 output tokens (ignore_eos, temperature 0), at 1 stream (requests one after another)
and 10 streams (closed loop), through one system at a time: llama.cpp's llama-server (HTTP/SSE), OpenVINO GenAI (in
process, no HTTP: perf/peer_openvino.py in its own venv), our AsyncLLMEngine in process, our Ray Serve app (HTTP/SSE).
Output tokens come from usage / engine token counts, never chunk counts; ITL is between content chunks. Every
request starts with its own tag, so no system gets a prefix-cache hit.
With --rounds N every system runs N times, in reversed order every other round (a host whose speed drifts
by 20-40% within minutes otherwise decides the ratios by run order): the table shows each system's median
round, and each ratio is the median of the rounds' ratios (each round against that round's best peer).
Writes perf/results/bench_peer.json + .png. Run: python perf/bench_peer.py -h
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from serve_app import ray_env  # noqa: E402

ray_env.apply()  # loopback, Serve's throughput mode (read when ray is imported)

import httpx  # noqa: E402
import psutil  # noqa: E402

from perf import bench_serving  # noqa: E402
from perf.bench_serving import Record, run_client  # noqa: E402
from perf.common import MODELS, machine  # noqa: E402
from perf.peer_measure import (Plan, Skipped, cpu_seconds, host_yardstick, log, measure, measure_http, other_cores,  # noqa: E402
                               point, port_for, records_of)
from perf.peer_report import median_ratios, median_round, print_report, ratios, write_plot  # noqa: E402

LABELS = {"llama": "llama.cpp llama-server, HTTP/SSE", "openvino": "OpenVINO GenAI, in process (no HTTP)",
          "ours-inproc": "ours, AsyncLLMEngine in process", "ours-http": "ours, Ray Serve HTTP/SSE"}
OPENVINO_PIN = "openvino-genai==2026.4.1.0"


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 600.0) -> bool:
    """Poll url until it answers 200; False if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, SIGKILL it if still there after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)


def start_llama(args: argparse.Namespace, gguf: Path, port: int) -> tuple[subprocess.Popen, str]:
    """llama-server with `run`'s own CPU variant choice, then AVX2 if that one dies (SIGILL on CPUs that
    advertise AVX-512 the AVX-512 build cannot run). No prompt cache: every system computes every prompt."""
    cmd = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np",
           str(args.concurrency), "-c", str(1024 * args.concurrency), "-t", str(len(os.sched_getaffinity(0))),
           "--no-webui", "--no-cache-prompt"]
    for variant in ("auto", "avx2"):
        env = {**os.environ, **({"LLAMA_CPU_VARIANT": variant} if variant != "auto" else {})}
        with open(args.out_dir / "llama-server.log.tmp", "w") as logf:
            proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        if wait_http(f"http://127.0.0.1:{port}/health", proc, 300):
            return proc, variant
        stop(proc)
        log(f"llama-server ({variant} build) exited with {proc.returncode} before /health answered")
    raise Skipped(f"llama-server did not start (log: {args.out_dir / 'llama-server.log.tmp'})")


def run_llama(args: argparse.Namespace, model: str, plan: Plan) -> dict[str, Any]:
    if not args.llama_server.exists():
        raise Skipped(f"{args.llama_server} not found")
    port = port_for(9931)
    proc, variant = start_llama(args, gguf_path(model), port)
    try:
        points = run_client(measure_http(f"http://127.0.0.1:{port}/v1", MODELS[model][0], plan, args.output_len))
    finally:
        stop(proc)
    ver = subprocess.run([str(args.llama_server), "--version"], capture_output=True, text=True, timeout=60)
    return {"points": points, "cpu_variant": variant, "version": (ver.stdout + ver.stderr).strip().split("\n")[0]}


def openvino_python(args: argparse.Namespace) -> tuple[Path, float | None]:
    """The OpenVINO venv's python and, if this run had to make the venv and install the pin, how long it took."""
    py = args.openvino_venv / "bin/python"
    if py.exists() and subprocess.run([str(py), "-c", "import openvino_genai"], capture_output=True).returncode == 0:
        return py, None
    log(f"installing {OPENVINO_PIN} into {args.openvino_venv}")
    t0 = time.perf_counter()
    for step in ([sys.executable, "-m", "venv", "--clear", str(args.openvino_venv)],
                 [str(py), "-m", "pip", "install", "-q", OPENVINO_PIN]):
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise Skipped(f"`{' '.join(step)}` failed: {(done.stderr or done.stdout)[-600:]}")
    return py, time.perf_counter() - t0


def run_openvino(args: argparse.Namespace, model: str, plan: Plan) -> dict[str, Any]:
    py, install_s = openvino_python(args)
    t0, before = time.perf_counter(), cpu_seconds()
    job = {"gguf": str(gguf_path(model)), "prompts_1": plan.get(1, []), "prompts_10": plan.get(args.concurrency, []),
           "concurrency": args.concurrency, "output_len": args.output_len}
    done = subprocess.run([str(py), str(REPO_ROOT / "perf/peer_openvino.py")], input=json.dumps(job),
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise Skipped(f"peer_openvino.py exited {done.returncode}: {done.stderr.strip()[-800:]}")
    data, others = json.loads(done.stdout), other_cores(before, time.perf_counter() - t0)  # over the whole child
    points = {c: point(records_of(recs), args.output_len) | {"other_processes_cores": others}
              for c, recs in data.pop("points").items()}
    return {"points": points, **data, "venv_install_s": install_s, "api": "1 stream: LLMPipeline.generate with a "
            "StreamerBase; N streams: ContinuousBatchingPipeline add_request/step/GenerationHandle.read"}


def gguf_path(model: str) -> Path:
    from deployments.engine.loader import resolve_model_path

    directory, name = resolve_model_path(MODELS[model][1])
    return directory / (name or "")


async def engine_stream(engine: Any, prompt: str, output_len: int) -> Record:
    """One request through AsyncLLMEngine.generate, timed like an SSE stream (one chunk per output)."""
    from deployments.engine import SamplingParams

    rec = Record(start=time.perf_counter(), status=200, completion_tokens=0)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(f"peer-{id(rec)}", engine.engine.encode(prompt), params):
        if out.new_token_ids:
            rec.chunk_times.append(time.perf_counter())
            rec.completion_tokens = (rec.completion_tokens or 0) + len(out.new_token_ids)
    rec.end = time.perf_counter()
    return rec


def run_ours_inproc(args: argparse.Namespace, model: str, plan: Plan) -> dict[str, Any]:
    from deployments.engine import AsyncLLMEngine, EngineConfig

    engine = AsyncLLMEngine(EngineConfig(model=MODELS[model][1], max_num_seqs=args.max_num_seqs, num_threads=args.num_threads))
    config = getattr(engine.engine, "config", None)  # whatever fields the engine in the tree has
    try:
        points = run_client(measure(lambda p, n: engine_stream(engine, p, n), plan, args.output_len))
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    return {"points": points, "engine_config": getattr(config, "__dict__", repr(config))}


@contextlib.contextmanager
def ours_app(args: argparse.Namespace, model: str, variants: dict[str, dict[str, Any]] | None = None) -> Iterator[str]:
    """The real app with only this model, on a local Ray bound to 127.0.0.1, as its URL; Ray is shut down afterwards.
    With `variants` (id -> settings), one deployment of the model per variant instead, under those ids."""
    import ray
    from ray import serve

    from serve_app.app import build_app

    model_id, source = MODELS[model]
    url = f"http://127.0.0.1:{port_for(args.port)}"
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])})
        base = {"id": model_id, "source": source, "max_num_seqs": args.max_num_seqs, "num_threads": args.num_threads,
                "max_ongoing_requests": 64, "num_cpus": 1, "stream_interval": getattr(args, "stream_interval", 1)}
        models = [base | {"id": name} | settings for name, settings in variants.items()] if variants else [base]
        serve.run(build_app({"models": models}), name="llm", route_prefix="/")
        if not wait_http(f"{url}/readyz"):
            raise RuntimeError("the Ray Serve app did not become ready")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        for proc in psutil.Process().children(recursive=True):  # Ray processes that outlived ray.shutdown
            log(f"killing leftover process {proc.pid} ({proc.name()})")
            proc.kill()


def run_ours_http(args: argparse.Namespace, model: str, plan: Plan) -> dict[str, Any]:
    with ours_app(args, model) as url:
        points = run_client(measure_http(f"{url}/v1", MODELS[model][0], plan, args.output_len))
    return {"points": points, "url": url}


RUNNERS = {"llama": run_llama, "openvino": run_openvino, "ours-inproc": run_ours_inproc, "ours-http": run_ours_http}


def background_cores(wait_s: float) -> float:
    """Cores busy system-wide over 1 s while none of ours runs; waits up to wait_s for it to fall under 0.25."""
    deadline = time.monotonic() + wait_s
    while (busy := psutil.cpu_percent(interval=1.0) / 100 * (psutil.cpu_count() or 1)) >= 0.25:
        if time.monotonic() >= deadline:
            log(f"WARNING: other processes keep {busy:.2f} cores busy: every figure of this system will be low")
            break
        time.sleep(4)
    return busy


def run_system(args: argparse.Namespace, model: str, system: str) -> dict[str, Any]:
    """One system on one model, alone on the host; a skip or a failure is recorded, not raised."""
    def prompts(c: int, n: int) -> list[str]:  # a unique head per request: no prefix cache hit anywhere
        return [f"Request {c}.{i}: {p}" for i, p in enumerate(bench_serving.build_prompts(n, args.seed))]

    plan = {1: prompts(1, args.requests_1), args.concurrency: prompts(args.concurrency, args.requests_10)}
    result: dict[str, Any] = {"label": LABELS[system], "background_cores_before": background_cores(args.wait_idle_s)}
    result["host_before"] = host_yardstick()
    log(f"{model} / {system}: start (other processes busy on {result['background_cores_before']:.2f} cores; host {result['host_before']})")
    t0 = time.perf_counter()
    try:
        result.update(RUNNERS[system](args, model, plan))
    except Skipped as exc:
        result["skipped"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one system's failure must not lose the others' figures
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["wall_s"] = time.perf_counter() - t0
    result["host_after"] = host_yardstick()
    if busy := {c: round(p["other_processes_cores"], 2) for c, p in result.get("points", {}).items()
                if p["other_processes_cores"] > 0.2}:
        log(f"WARNING: other processes took CPU during {system} (cores, by concurrency: {busy}): figures are low")
    log(f"{model} / {system}: {result.get('skipped') or result.get('error') or 'done'} in {result['wall_s']:.0f} s")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda t: t.split(","), default=list(MODELS), help=",".join(MODELS))
    p.add_argument("--systems", type=lambda t: t.split(","), default=list(RUNNERS), help=",".join(RUNNERS))
    p.add_argument("--requests-1", type=int, default=5, help="requests one after another at 1 stream")
    p.add_argument("--requests-10", type=int, default=20, help="requests at --concurrency streams (closed loop)")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--output-len", type=int, default=128, help="max_tokens = min_tokens, ignore_eos")
    p.add_argument("--max-num-seqs", type=int, default=16, help="our engine's batch limit (as config/serve.yaml)")
    p.add_argument("--port", type=int, default=8000, help="our Ray Serve HTTP port (another free one if taken)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None, help="our engine's torch threads (default: every core)")
    p.add_argument("--wait-idle-s", type=float, default=120.0, help="before each system, wait up to this for "
                   "other processes' CPU load to go (it is recorded either way)")
    p.add_argument("--llama-server", type=Path, default=REPO_ROOT.parent / "shared/peers/llama-server/run")
    p.add_argument("--openvino-venv", type=Path, default=REPO_ROOT / "perf/.venv-openvino")
    p.add_argument("--rounds", type=int, default=1, help="run every system this many times, alternating the order")
    p.add_argument("--name", default="bench_peer")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "perf/results")
    args = p.parse_args(argv)
    if bad := (set(args.models) - MODELS.keys()) | (set(args.systems) - RUNNERS.keys()):
        p.error(f"unknown model or system: {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rounds = []
    for r in range(args.rounds):
        order = args.systems if r % 2 == 0 else args.systems[::-1]
        rounds.append({m: {s: run_system(args, m, s) for s in order} for m in args.models})
    concs = ["1", str(args.concurrency)]
    results = {m: {s: median_round([rd[m][s] for rd in rounds], concs) for s in args.systems} for m in args.models}
    rat = {m: {c: median_ratios([ratios(rd[m], c) for rd in rounds]) for c in concs} for m in args.models}
    report = {"environment": {**machine(), **{pkg: version(pkg) for pkg in ("torch", "transformers", "ray", "httpx")}},
              "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": results, "ratios": rat, "wall_s": time.perf_counter() - t0}
    if args.rounds > 1:
        report["rounds"] = rounds
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2, default=str))
    print_report(results, rat)
    write_plot(results, concs, args.out_dir / f"{args.name}.png")
    print(f"wrote {args.out_dir / (args.name + '.json')} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
