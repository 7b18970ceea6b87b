"""OpenAI-API streaming load generator in the spirit of `vllm bench serve`, for any OpenAI-compatible base URL.

A closed-loop concurrency sweep, then open-loop Poisson points at fractions of the saturation req/s (best of the
sweep). Requests stream with temperature 0 and max_tokens = min_tokens = --output-len, ignore_eos (vLLM extensions,
ignored elsewhere) so output lengths are fixed. Writes <out-dir>/<name>.json (+ .png if matplotlib is installed).
Other scripts may import `run_point` and `summarize`. Run: python perf/bench_serving.py -h
"""

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from perf.common import machine  # noqa: E402
from perf.sse_client import SSEClient  # noqa: E402
from perf.serving_report import fmt, point_label, print_table, summary_line, write_plot  # noqa: E402

SENTENCES = [  # ~10 words each; a prompt joins 1-6 of them (seeded)
    "Explain how a language model predicts the next word.", "Write a short poem about the sea on a calm night.",
    "Describe the water cycle to a curious young child.", "What is the capital of France, and why is it famous?",
    "List three reasons why unit tests help a software team.", "Give me a simple recipe for a warm tomato soup.",
    "Summarise the plot of a detective story in two lines.", "Why is the sky blue by day and red at sunset?",
    "Compare trains and planes for a trip of 500 km.", "Suggest a name for a small bakery selling fresh bread.",
    "Tell me how bees show other bees where flowers are.", "Describe a quiet mountain village after the first snow.",
]

T = TypeVar("T")


@dataclass
class Record:
    """One request: times are perf_counter seconds; chunk_times are the content-bearing chunks."""
    start: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    status: int | None = None
    error: str | None = None  # None = ok; else an HTTP status code, "stream_error" or an exception name
    message: str | None = None
    completion_tokens: int | None = None


def log(message: str) -> None:
    print(f"[bench_serving] {message}", file=sys.stderr, flush=True)  # progress goes to stderr


def build_prompts(num_prompts: int, seed: int = 0) -> list[str]:
    """A fixed seeded list of 20 varied prompts (1-6 sentences, ~10-60 words), cycled to num_prompts."""
    rng = random.Random(seed)
    pool = [" ".join(rng.sample(SENTENCES, rng.randint(1, 6))) for _ in range(20)]
    return [pool[i % len(pool)] for i in range(num_prompts)]


def request_body(args: argparse.Namespace, prompt: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.output_len, "min_tokens": args.output_len,
                            "ignore_eos": True, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/completions", {**body, "prompt": prompt}


def chunk_text(event: dict[str, Any], endpoint: str) -> str:
    choice = (event.get("choices") or [{}])[0]
    return ((choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")) or ""


def error_message(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error")
        return str(err.get("message") if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:500]


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run the load generator's coroutine on uvloop where it is installed (it comes with Ray Serve's
    uvicorn): the client shares the cores with the server it measures, and over 8 alternated rounds of 10
    SmolLM2 streams it took 90 us of CPU per token on uvloop against 105 on asyncio's loop (session 15)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def client_session(max_connections: int) -> SSEClient:
    """The load generator's HTTP client (perf/sse_client.py): it shares the cores with the server it measures.
    httpx (pure-Python parsing) took ~0.075 cores at 10 streams against aiohttp's ~0.037 (perf/README.md,
    session 9); at 10 SmolLM2 streams the bench process took 63.5 us of CPU per token with aiohttp against
    42.0 with this client (session 27, 4 alternated rounds)."""
    return SSEClient(max_connections)


async def stream_request(client: SSEClient, args: argparse.Namespace, prompt: str, rec: Record) -> None:
    path, body = request_body(args, prompt)

    def on_data(data: bytes) -> None:
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            rec.error, rec.message = "stream_error", error_message(data)
            return
        if chunk_text(event, args.endpoint):
            rec.chunk_times.append(time.perf_counter())
        if event.get("usage"):
            rec.completion_tokens = event["usage"].get("completion_tokens")

    rec.status, raw = await client.post(args.base_url.rstrip("/") + path, body, on_data)
    if rec.status != 200:
        rec.error, rec.message = str(rec.status), error_message(raw)


async def send_request(client: SSEClient, args: argparse.Namespace, prompt: str) -> Record:
    """One streamed request; never raises (failures become the record's error)."""
    rec = Record(start=time.perf_counter())
    try:
        await asyncio.wait_for(stream_request(client, args, prompt, rec), args.timeout_s)
    except (asyncio.TimeoutError, ValueError, OSError) as exc:
        rec.error, rec.message = type(exc).__name__, str(exc)[:500]
    rec.end = time.perf_counter()
    if rec.error is None and rec.completion_tokens is None:
        rec.completion_tokens = len(rec.chunk_times)
    return rec


def stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(("mean", "p50", "p90", "p99"))
    arr = np.asarray(values) * 1000.0
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}}


def summarize(records: list[Record], duration: float | None = None, slo_ttft_ms: float = 2000.0,
              slo_tpot_ms: float = 200.0) -> dict[str, Any]:
    """Figures of one measurement point; duration defaults to first start .. last end."""
    if duration is None:
        duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    ok = [r for r in records if r.error is None and r.chunk_times]
    errors = dict(Counter(r.error or "no_content" for r in records if r.error is not None or not r.chunk_times))
    ttft = [r.chunk_times[0] - r.start for r in ok]
    e2e = [r.end - r.start for r in ok]
    tpot = [(e - t) / (n - 1) if n > 1 else 0.0 for e, t, n in zip(e2e, ttft, (r.completion_tokens or 0 for r in ok))]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    good = sum(1 for t, p in zip(ttft, tpot) if t * 1000 <= slo_ttft_ms and p * 1000 <= slo_tpot_ms)
    tokens = sum(r.completion_tokens or 0 for r in ok)
    per_s = (lambda n: n / duration if duration > 0 else 0.0)
    return {"requests": len(records), "completed": len(ok), "errors": errors,
            "error_messages": sorted({f"{r.error}: {r.message}" for r in records if r.message})[:5],
            "duration_s": duration, "request_throughput": per_s(len(ok)), "output_throughput": per_s(tokens),
            "output_tokens": tokens, "goodput": per_s(good), "ttft_ms": stats_ms(ttft), "tpot_ms": stats_ms(tpot),
            "itl_ms": stats_ms(itl), "e2e_ms": stats_ms(e2e),
            "raw": {"ttft_ms": [t * 1000 for t in ttft], "e2e_ms": [t * 1000 for t in e2e]}}


async def closed_loop(client: SSEClient, args: argparse.Namespace, prompts: list[str],
                      concurrency: int, deadline: float) -> list[Record]:
    queue = list(reversed(prompts))
    records: list[Record] = []

    async def worker() -> None:
        while queue and time.perf_counter() < deadline:
            records.append(await send_request(client, args, queue.pop()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def open_loop(client: SSEClient, args: argparse.Namespace, prompts: list[str],
                    rate: float, deadline: float, seed: int) -> list[Record]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))
    t0, tasks = time.perf_counter(), []
    for prompt, arrival in zip(prompts, np.cumsum(gaps)):
        await asyncio.sleep(max(0.0, t0 + float(arrival) - time.perf_counter()))
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(send_request(client, args, prompt)))
    return list(await asyncio.gather(*tasks))


async def run_point(client: SSEClient, args: argparse.Namespace, prompts: list[str], *,
                    concurrency: int | None = None, rate: float | None = None,
                    deadline: float = float("inf")) -> dict[str, Any]:
    """Run one point (closed loop at `concurrency`, or Poisson open loop at `rate` req/s) and summarize it."""
    t0 = time.perf_counter()
    if concurrency is not None:
        records = await closed_loop(client, args, prompts, concurrency, deadline)
    elif rate is not None and rate > 0:
        records = await open_loop(client, args, prompts, rate, deadline, getattr(args, "seed", 0))
    else:
        raise ValueError("run_point needs a concurrency or a positive rate")
    point = summarize(records, time.perf_counter() - t0, getattr(args, "slo_ttft_ms", 2000.0),
                      getattr(args, "slo_tpot_ms", 200.0))
    point.update(mode="closed" if concurrency is not None else "poisson", concurrency=concurrency, rate=rate,
                 cut=len(records) < len(prompts))
    return point


async def run_spec(client: SSEClient, args: argparse.Namespace, prompts: list[str], spec: dict[str, Any],
                   points: list[dict[str, Any]], deadline: float) -> dict[str, Any] | str:
    """Run one planned point, or return why it was skipped."""
    if time.perf_counter() >= deadline:
        return "max_duration"
    if "concurrency" in spec:
        return await run_point(client, args, prompts, concurrency=spec["concurrency"], deadline=deadline)
    saturation = max((p["request_throughput"] for p in points if p["mode"] == "closed"), default=0.0)
    if saturation <= 0:
        return "no_saturation_rate"
    point = await run_point(client, args, prompts, rate=spec["fraction"] * saturation, deadline=deadline)
    return {**point, "fraction": spec["fraction"], "saturation_rate": saturation}


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    prompts = build_prompts(args.num_prompts, args.seed)
    deadline = time.perf_counter() + args.max_duration_s
    max_inflight = max(args.concurrency + [args.num_prompts])
    plan = [{"concurrency": c} for c in args.concurrency] + [{"fraction": f} for f in args.poisson_fractions]
    points: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    async with client_session(max_inflight) as client:  # each request times out in send_request
        for spec in plan:
            point = await run_spec(client, args, prompts, spec, points, deadline)
            if isinstance(point, str):
                skipped.append({**spec, "reason": point})
                log(f"skipped {spec}: {point}")
                continue
            points.append(point)
            log(f"{point_label(point)}: {point['completed']}/{args.num_prompts} ok, errors {point['errors']}, "
                f"{point['request_throughput']:.2f} req/s, {point['output_throughput']:.1f} tok/s, "
                f"TTFT p50 {fmt(point['ttft_ms']['p50'])} ms{' (cut)' if point['cut'] else ''}")
    cut = any(s["reason"] == "max_duration" for s in skipped) or any(p["cut"] for p in points)
    return {"points": points, "skipped_points": skipped, "cut": cut}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {**machine(), "client": "perf/sse_client.py", "base_url": args.base_url, "model": args.model,
            "endpoint": args.endpoint}


def number_list(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-prompts", type=int, default=20, help="requests per measurement point")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens = min_tokens, ignore_eos")
    p.add_argument("--concurrency", type=number_list(int), default=[1, 2, 4, 10, 16])
    p.add_argument("--poisson-fractions", type=number_list(float), default=[0.25, 0.5, 0.75, 0.9],
                   help="fractions of the saturation req/s for open-loop points; empty string disables")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    p.add_argument("--timeout-s", type=float, default=300.0, help="per request")
    p.add_argument("--max-duration-s", type=float, default=600.0, help="no new work is launched past it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="bench_serving")
    p.add_argument("--out-dir", default="perf/results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"target {args.base_url} model {args.model} endpoint {args.endpoint}")
    result = run_client(run_all(args))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args), "args": vars(args), **result}
    (out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    print_table(result["points"])
    print(summary_line(result["points"]) + (" [run cut by --max-duration-s]" if result["cut"] else ""))
    write_plot(result["points"], out_dir / f"{args.name}.png")
    print(f"wrote {out_dir / (args.name + '.json')}")


if __name__ == "__main__":
    main()
