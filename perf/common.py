"""What every benchmark records about where it ran, so results can be compared honestly."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def machine() -> dict[str, Any]:
    """Git SHA, Python, platform, CPU model and core count."""
    return {"git_sha": git_sha(), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count()}
