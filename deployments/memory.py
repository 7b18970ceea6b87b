"""Measuring what a model really holds (process RSS), refusing a load that cannot fit, and giving
freed heap back to the OS.

Why replicas run with `replica_allocator_env()` (measured with perf/probe_memleak.py, SmolLM2-135M,
20 load/unload cycles in one process): with CPython's default small-object allocator RSS after
unload crept up ~2.8 MiB per cycle (+55 MiB after 20) and the growth was exactly pymalloc arenas
(+50 x 1 MiB). Each load allocates hundreds of thousands of small Python objects; a few hundred of
them outlive the model (caches such as `re`'s that churn, thread-pool bookkeeping, ...), and one
survivor keeps its whole 1 MiB arena mapped. No glibc setting touches that (MALLOC_ARENA_MAX=1:
+58 MiB); sending small objects to glibc instead (PYTHONMALLOC=malloc) still left +25 MiB of
page-level heap fragmentation. Small objects on jemalloc (bundled with Ray) with freed pages purged
right away: +0.9 MiB after 20 cycles.

jemalloc purges nothing by itself (`dirty_decay_ms:-1`): its time-based decay (1 s, as first set) gave back
pages a step was about to use again, and Gemma 3's decode step at 10 streams (10 MB of logits among its
buffers) ran 17-18% slower for the page faults that followed (perf/README.md, session 17). Freed pages go
back to the OS when a model unloads (`release_freed_memory`) and when a replica's engine has been idle a
second (`purge_freed_pages`, the engine's idle hook).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:0,background_thread:false"
_MALLCTL_ARENAS_ALL = 4096  # jemalloc's "every arena" index for arena.<i>.purge
GiB = 1 << 30


def rss_bytes() -> int:
    """This process's resident set size."""
    return int(psutil.Process().memory_info().rss)


def load_footprint(device: str, rss_before: int) -> int:
    """Bytes a load that just finished holds: the process's RSS growth across it on CPU, the CUDA
    bytes allocated by tensors on GPU."""
    if device.startswith("cuda"):
        return gpu_memory(device)["allocated_bytes"]
    return max(0, rss_bytes() - rss_before)


class NotEnoughMemoryError(MemoryError):
    """A load refused before it allocated anything: it needs more than the device has available."""


def available_bytes(device: str) -> int | None:
    """What a load may still take on `device`: the OS's available memory (free plus reclaimable page
    cache) on CPU, the GPU's free memory on CUDA; None where that cannot be read (no CUDA here)."""
    if not device.startswith("cuda"):
        return int(psutil.virtual_memory().available)
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def ensure_fits(need_bytes: Callable[[], int], device: str, what: str) -> None:
    """Raise `NotEnoughMemoryError` naming both numbers when loading `what` needs more than `device`
    has available. Checked before loading because the allocation itself does not fail cleanly: the
    kernel's default overcommit refuses only sizes beyond RAM + swap, and a KV pool between what is
    available and that is zeroed page by page until the OOM killer ends the replica (which Ray then
    restarts into the same load). Without an estimate (unreadable files) nothing is checked: the
    load then reports what is wrong with the files."""
    try:
        need = need_bytes()
    except (OSError, ValueError, KeyError):
        return
    available = available_bytes(device)
    if available is not None and need > available:
        raise NotEnoughMemoryError(
            f"not enough memory to load {what}: it needs {need} bytes ({need / GiB:.1f} GiB) on {device}, "
            f"{available} bytes ({available / GiB:.1f} GiB) are available"
        )


def find_jemalloc() -> str | None:
    """Ray's bundled jemalloc, else the system's; None if neither is installed."""
    spec = importlib.util.find_spec("ray")  # located, not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "core" / "libjemalloc.so"
        if bundled.is_file():
            return str(bundled)
    return ctypes.util.find_library("jemalloc")  # a soname, which LD_PRELOAD accepts


def replica_allocator_env() -> dict[str, str]:
    """Environment for a model replica's process (it must be set before Python starts): Python's small
    objects go to jemalloc, which returns freed pages to the OS; empty if jemalloc is not available."""
    library = find_jemalloc()
    if library is None:
        return {}
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return {"PYTHONMALLOC": "malloc", "LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}


def _jemalloc_mallctl() -> Any:
    process = ctypes.CDLL(None)
    return getattr(process, "mallctl", None)


def release_freed_memory() -> None:
    """Collect garbage, then hand free heap pages back to the OS: jemalloc purges every arena when it
    is the process's allocator; glibc's malloc_trim otherwise (big tensors are freed by munmap
    already, but many small allocations from loading stay in the heap without this)."""
    gc.collect()
    if purge_freed_pages():
        return
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def purge_freed_pages() -> bool:
    """jemalloc's unused pages, every arena, back to the OS (milliseconds: no garbage collection);
    False where jemalloc is not the process's allocator."""
    mallctl = _jemalloc_mallctl()
    if mallctl is None:
        return False
    mallctl(f"arena.{_MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))
    return True


def gpu_memory(device: str) -> dict[str, int]:
    """CUDA bytes allocated by tensors and reserved by torch's caching allocator on `device`."""
    import torch

    if not torch.cuda.is_available():
        return {"allocated_bytes": 0, "reserved_bytes": 0}
    return {"allocated_bytes": int(torch.cuda.memory_allocated(device)), "reserved_bytes": int(torch.cuda.memory_reserved(device))}


def allocator() -> str:
    """What serves this process's heap (and, with PYTHONMALLOC=malloc, Python's small objects)."""
    native = "jemalloc" if _jemalloc_mallctl() is not None else "glibc"
    return f"{native}, pymalloc" if os.environ.get("PYTHONMALLOC") != "malloc" else native
