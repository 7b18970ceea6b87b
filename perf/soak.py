"""Soak a running server: N streamed OpenAI completions, sampling the model replica's RSS as they go.

The replica's RSS comes from `GET /models` (`process_rss_bytes` of the model). After a warm-up, one
sample every --every requests; a least-squares slope over the samples says whether RSS trends up.
Only loopback servers are accepted. Writes perf/results/soak.json.
Run: python perf/soak.py --model smollm2 [--requests 1000 --concurrency 8 --max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from perf.common import machine  # noqa: E402
from perf.engine_runs import cpu_features  # noqa: E402

MiB = 1 << 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


async def model_entry(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    """The model's entry in GET /models (status, weights, quantization, process_rss_bytes, ...)."""
    response = await client.get("/models")
    response.raise_for_status()
    entry = next((m for m in response.json()["data"] if m["id"] == model), None)
    if entry is None or entry.get("process_rss_bytes") is None:
        raise SystemExit(f"GET /models has no process_rss_bytes for model {model!r}")
    return dict(entry)


async def replica_rss(client: httpx.AsyncClient, model: str) -> int:
    return int((await model_entry(client, model))["process_rss_bytes"])


async def stream_completion(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> int:
    """One streamed /v1/completions request; returns the number of content events."""
    body = {"model": model, "prompt": f"Request {i}: " + "tell me about streams " * (1 + i % 7),
            "max_tokens": max_tokens, "temperature": 0.0 if i % 2 else 0.8, "seed": i, "stream": True}
    events = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"request {i}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if "error" in json.loads(line[6:]):
                    raise RuntimeError(f"request {i}: stream error {line[:300]}")
                events += 1
    return events


def slope(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ys over xs (bytes per request)."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    xs: list[int] = []
    ys: list[int] = []
    done, started = 0, time.perf_counter()
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout_s) as client:
        served = await model_entry(client, args.model)
        rss_before = int(served["process_rss_bytes"])
        while done < args.requests:
            batch = range(done, min(done + args.concurrency, args.requests))
            await asyncio.gather(*(stream_completion(client, args.model, i, args.max_tokens) for i in batch))
            previous, done = done, batch.stop
            if done >= args.warm_up and done // args.every > previous // args.every:
                xs.append(done)
                ys.append(await replica_rss(client, args.model))
                print(f"[soak] {done:5d} requests: RSS {ys[-1] / MiB:.1f} MiB", file=sys.stderr, flush=True)
    fit = slope(xs, ys) if len(xs) > 1 else 0.0
    return {"environment": {**machine(), **cpu_features()}, "base_url": args.base_url, "model": args.model,
            "served": {k: served.get(k) for k in ("weights", "weights_reason", "quantization", "implementation")},
            "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "warm_up": args.warm_up,
            "duration_s": round(time.perf_counter() - started, 2), "rss_before_bytes": rss_before,
            "series": [{"requests": x, "rss_bytes": y} for x, y in zip(xs, ys)],
            "slope_bytes_per_request": fit, "slope_mib_per_1000_requests": fit * 1000 / MiB,
            "growth_after_warm_up_mib": (ys[-1] - ys[0]) / MiB if ys else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=1000, help="at most 100000")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--warm-up", type=int, default=100)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--out", default=str(REPO_ROOT / "perf" / "results" / "soak.json"))
    args = p.parse_args()
    if urlparse(args.base_url).hostname not in LOOPBACK:
        p.error("--base-url must be a loopback address (127.0.0.1)")
    if not 1 <= args.requests <= 100_000 or args.concurrency < 1 or args.every < 1:
        p.error("--requests must be 1..100000; --concurrency and --every positive")
    result = asyncio.run(soak(args))
    print(f"summary: {args.requests} requests in {result['duration_s']} s, RSS slope "
          f"{result['slope_mib_per_1000_requests']:+.2f} MiB/1000 requests, growth after warm-up "
          f"{result['growth_after_warm_up_mib']} MiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
