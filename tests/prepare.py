"""The suite's heavy artefacts, made ahead in one background process that runs only on idle CPU.

Converting the shipped GGUFs (single-threaded: ~20 s for SmolLM2, ~50 s for Gemma 3 here) and
quantizing SmolLM2 with GPTQ (one torch thread, ~50 s) used to run inside the tests that first need
them, while the suite as a whole leaves about half of this 2-core machine idle (`make test`'s
user + sys time is ~49% of two cores). At session start, `start` launches `python -m tests.prepare`
for the jobs the collected tests need, under SCHED_IDLE (nice 19 where that is refused), so it takes
only CPU no test is using; a fixture that needs an artefact calls `wait_for(job)` and gets it, or
makes it itself if the background process failed or was never started. Every artefact is written
atomically (the conversion cache renames a finished folder into place; the GPTQ checkpoint is saved
to a staging folder and renamed), so a test that makes one itself never reads a half-written one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = ("smollm2", "gptq", "gemma")
"""In this order: GPTQ quantizes SmolLM2's conversion; the quality gate (Gemma) runs after the GPTQ tests.
`smollm2` and `gemma` convert the quality gate's models (`perf.quality.MODELS`)."""
GPTQ_SAMPLES = 32

_process: subprocess.Popen[bytes] | None = None
_root: Path | None = None
_jobs: list[str] = []


def gptq_path(root: Path) -> Path:
    return root / "smollm2-gptq"


def start(jobs: list[str]) -> None:
    """Launch the background process for `jobs` (a subset of JOBS), once per session."""
    global _process, _root, _jobs
    if _process is not None or not jobs:
        return
    _root, _jobs = Path(tempfile.mkdtemp(prefix="llm-serve-prepared-")), list(jobs)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    with (_root / "log").open("wb") as log:  # its errors, for a look while the session runs
        _process = subprocess.Popen([sys.executable, "-m", "tests.prepare", str(_root), *jobs], cwd=root, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log, preexec_fn=_idle_priority)


def _idle_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def wait_for(job: str, timeout_s: float = 240) -> bool:
    """True once the background process has done `job`; False at once if it was not asked to, and
    False if it failed or ended without it (the caller then does the job itself). While a test
    waits here the CPU is idle, so the background process has it all (under the tests' 300 s timeout)."""
    if _process is None or _root is None or job not in _jobs:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (_root / f"{job}.done").is_file():
            return True
        if (_root / f"{job}.failed").is_file() or _process.poll() is not None:
            return (_root / f"{job}.done").is_file()
        time.sleep(0.2)
    return False


def prepared_gptq_checkpoint() -> Path | None:
    """SmolLM2's GPTQ checkpoint (GPTQ_SAMPLES calibration texts) if the background process made it."""
    return gptq_path(_root) if wait_for("gptq") and _root is not None else None


def stop() -> None:
    """End the background process (if still running) and remove what it made."""
    global _process, _root, _jobs
    if _process is not None and _process.poll() is None:
        _process.kill()
        _process.wait()
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)
    _process, _root, _jobs = None, None, []


def _run(root: Path, job: str) -> None:
    from deployments.engine.loader import converted_checkpoint, resolve_model_path
    from perf.quality import MODELS

    if job in MODELS:
        directory, gguf_file = resolve_model_path(MODELS[job])
        assert gguf_file is not None
        converted_checkpoint(directory / gguf_file, "float32")
    elif job == "gptq":
        from perf.make_gptq import make_gptq_checkpoint

        staging = root / "gptq.staging"
        make_gptq_checkpoint(staging, samples=GPTQ_SAMPLES)
        staging.rename(gptq_path(root))


def main(root: Path, jobs: list[str]) -> None:
    for job in sorted(jobs, key=JOBS.index):
        try:
            _run(root, job)
        except Exception as exc:  # the test that needs it makes it itself, and fails there if it must
            (root / f"{job}.failed").write_text(f"{type(exc).__name__}: {exc}\n")
        else:
            (root / f"{job}.done").touch()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
