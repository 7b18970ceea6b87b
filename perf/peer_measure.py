"""How bench_peer times one system: a closed loop of streamed requests per concurrency, the figures of
each point, and the CPU that processes other than the one measured took meanwhile."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from perf import bench_serving
from perf.bench_serving import Record, summarize

Plan = dict[int, list[str]]  # concurrency -> prompts, run in order
Send = Callable[[str, int], Awaitable[Record]]  # (prompt, output_len) -> one timed request


class Skipped(Exception):
    """A system that cannot run here; the reason goes into the JSON."""


def log(message: str) -> None:
    print(f"[bench_peer] {message}", file=sys.stderr, flush=True)


def port_for(preferred: int) -> int:
    """The preferred port on 127.0.0.1 if it is free, else any free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def closed_loop(send: Send, prompts: list[str], concurrency: int, output_len: int) -> list[Record]:
    """Every prompt once, at most `concurrency` in flight; a new request starts when one ends."""
    queue, records = list(reversed(prompts)), []

    async def worker() -> None:
        while queue:
            records.append(await send(queue.pop(), output_len))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def records_of(raw: list[dict[str, Any]]) -> list[Record]:
    """Records a worker process sent as JSON (peer_openvino.py's, bench_interleave.py's)."""
    return [Record(start=r["start"], end=r["end"], chunk_times=r["chunk_times"], status=200,
                   completion_tokens=r["completion_tokens"]) for r in raw]


def point(records: list[Record], output_len: int) -> dict[str, Any]:
    """bench_serving's figures, plus requests that got other than output_len tokens, and tokens per chunk."""
    fig = summarize(records)
    fig.pop("raw", None)
    chunks = sum(len(r.chunk_times) for r in records if r.error is None)
    fig["short_requests"] = sum(1 for r in records if r.error is None and r.completion_tokens != output_len)
    fig["tokens_per_chunk"] = fig["output_tokens"] / chunks if chunks else None
    return fig


async def measure(send: Send, plan: Plan, output_len: int) -> dict[str, Any]:
    """A short warm-up (2 x 4 tokens), then each point of the plan, with the CPU other processes took meanwhile."""
    await closed_loop(send, [f"Warm-up. {p}" for p in next(iter(plan.values()))[:2]], 2, 4)
    points = {}
    for c, prompts in plan.items():
        t0, before = time.perf_counter(), cpu_seconds()
        points[str(c)] = point(await closed_loop(send, prompts, c, output_len), output_len)
        points[str(c)]["other_processes_cores"] = other_cores(before, time.perf_counter() - t0)
    return points


def host_yardstick(seconds: float = 0.25) -> dict[str, float]:
    """How fast the host computes and copies right now, on every core: fp32 GFLOP/s of 256x256 torch matmuls, GB/s
    (read + write) of a 64 MiB copy and, where our kernels are built, G multiply-adds/s of our int4 kernel
    (`_int4_yardstick`; the one that saw the slow state the matmul missed). This host's speed drifts by 20-40%
    over minutes, both ways, without steal time (perf/README.md, session 21); taken before and after each
    system's turn, it says which rounds compared systems that ran on a faster or slower host.

    It runs on a thread of its own that ends with it: torch work on this process's main thread would leave an
    OpenMP pool there, and our in-process engine's pool beside it makes libgomp stop spinning between parallel
    regions (SmolLM2 at 1 stream ran at 110-120 tok/s instead of 180-200 after one 64 MiB copy on the main
    thread; perf/README.md, session 21)."""
    import torch

    figures: dict[str, float] = {}

    def run() -> None:
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        src, dst = torch.randn(16 << 20), torch.empty(16 << 20)
        torch.mm(a, b)  # first calls, untimed
        dst.copy_(src)
        tests = [("matmul_gflops", lambda: torch.mm(a, b), 2 * 256**3), ("copy_gbps", lambda: dst.copy_(src), 2 * src.numel() * 4)]
        if (ours := _int4_yardstick()) is not None:
            tests.append(("int4_gmacs", *ours))
        for name, work, per_call in tests:
            calls, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < seconds:
                work()
                calls += 1
            figures[name] = round(per_call * calls / elapsed / 1e9, 1)

    thread = threading.Thread(target=run, name="host-yardstick")
    thread.start()
    thread.join()
    return figures


def _int4_yardstick() -> tuple[Callable[[], Any], int] | None:
    """Our int4 kernel on 10 rows of SmolLM2's gate_up shape (N 3072, K 576), random weights in L2: the compute a
    10-stream decode step is made of; None where our kernels are not built."""
    import torch

    from deployments.engine import kernels

    if (ours := kernels.cpu_kernels()) is None:
        return None
    packed = torch.randint(0, 256, (3072 // 16, 576 // 4, 32), dtype=torch.uint8)
    scales, x = (torch.rand(2, 3072 // 16, 576 // 32, 16) * 0.01).half(), torch.randn(10, 576)
    return (lambda: ours.q4_linear(x, packed, scales, 2.0)), 10 * 3072 * 576


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds the host has been busy, and those of this process with its descendants (live or reaped)."""
    host, me = psutil.cpu_times(), psutil.Process()
    times = me.cpu_times()
    own = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            own += child.cpu_times().user + child.cpu_times().system
    return host.user + host.nice + host.system + host.irq + host.softirq, own


def other_cores(before: tuple[float, float], wall_s: float) -> float:
    """Cores that processes not ours kept busy since `before` (a cpu_seconds() reading)."""
    (host0, own0), (host1, own1) = before, cpu_seconds()
    return max(0.0, (host1 - host0) - (own1 - own0)) / wall_s


async def measure_http(base_url: str, model_id: str, plan: Plan, output_len: int) -> dict[str, Any]:
    """The plan as streamed /v1/completions (bench_serving.send_request: max_tokens = min_tokens, ignore_eos)."""
    async with bench_serving.client_session(64) as client:
        def send(prompt: str, n: int) -> Awaitable[Record]:
            ns = argparse.Namespace(base_url=base_url, model=model_id, endpoint="completions", output_len=n,
                                    timeout_s=900.0)
            return bench_serving.send_request(client, ns, prompt)
        return await measure(send, plan, output_len)
