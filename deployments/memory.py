"""Measuring what a model really holds: process RSS, and giving freed heap back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

import psutil


def rss_bytes() -> int:
    """This process's resident set size."""
    return int(psutil.Process().memory_info().rss)


def release_freed_memory() -> None:
    """Collect garbage, then ask glibc to return free heap pages (big tensors are freed by munmap
    already, but many small allocations from loading stay in the heap without this)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def gpu_memory(device: str) -> dict[str, int]:
    """CUDA bytes allocated by tensors and reserved by torch's caching allocator on `device`."""
    import torch

    if not torch.cuda.is_available():
        return {"allocated_bytes": 0, "reserved_bytes": 0}
    return {"allocated_bytes": int(torch.cuda.memory_allocated(device)), "reserved_bytes": int(torch.cuda.memory_reserved(device))}
