"""Our compiled CPU kernels, built on first use by torch's C++ extension builder: `matmul.cpp` (int4
layers, int8 vocabulary ranking), `attention.cpp` (paged decode attention), `lora.cpp` (LoRA for mixed
batches), `glue.cpp` (a layer's norms, rotary, cache write and activation, fused), `vocab.cpp` (top
candidates rescored, argmax), `decode.cpp` (a decode step's layers in one call), `codes.h` (what they share), `module.cpp` (the Python module).

The build (about 40-60 s on two cores) is cached per source, ISA and torch version under
`$LLM_SERVE_CACHE_DIR/kernels` (default ~/.cache/llm-serve/kernels); `make install` builds it once
(`python -m deployments.engine.kernels`), so replicas only load it. `-march=native` picks the
host's instructions: AVX-512 VNNI where present, else AVX2 (with AVX-VNNI where present).

Where it cannot be built or run (no compiler, a CPU without AVX2/F16C, not x86), or with
`LLM_SERVE_INT4_KERNEL=torch`, every one of them gives way to torch's own ops, as before (int4 and
int8 matmuls, gather + matmul attention, masked LoRA GEMMs); `kernel_status()` says which run and
why, and `/models` shows it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("matmul.cpp", "attention.cpp", "lora.cpp", "glue.cpp", "vocab.cpp", "decode.cpp", "module.cpp", "codes.h")]
ENV = "LLM_SERVE_INT4_KERNEL"
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c", "-mno-avx512f", "-DLLM_KERNELS_MATMUL_ONLY"]}
"""`native` is what the engine uses; `avx2` builds the AVX2 paths of the matmuls and the attention (the
only ISA-specific code) on any x86 host, for the tests that compare the two: half the build."""
# module.cpp first: ninja starts jobs in this order, and it is the longest (torch/extension.h), so the
# others compile beside it rather than after it (the AVX2 build 52 -> ~35 s on two cores).
ISA_SOURCES = {"native": ("module.cpp", "matmul.cpp", "attention.cpp", "lora.cpp", "glue.cpp", "vocab.cpp", "decode.cpp"), "avx2": ("module.cpp", "matmul.cpp", "attention.cpp")}

_lock = threading.Lock()
_built: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("LLM_SERVE_CACHE_DIR") or Path.home() / ".cache" / "llm-serve") / "kernels"


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model name and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join(lines)


def build_name(isa: str) -> str:
    digest = hashlib.sha256()
    for part in (*(p.read_bytes() for p in SOURCES), b"-fopenmp", isa.encode(), torch.__version__.encode(), _cpu_key().encode() if isa == "native" else b""):
        digest.update(part)
    return f"llm_serve_q4_{isa}_{digest.hexdigest()[:12]}"


def load(isa: str = "native") -> ModuleType | None:
    """The built module (`q4_linear`, `isa`), or None where it cannot be built; built once per process."""
    with _lock:
        if isa in _built:
            return _built[isa]
        if isa in _failed:
            return None
        try:
            module = _build(isa)
        except Exception as exc:  # no compiler, unsupported CPU, ...: fall back to torch's kernel
            reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            _failed[isa] = reason
            log.warning("int4 CPU kernel (%s) unavailable, using torch's: %s", isa, reason)
            return None
        _built[isa] = module
        return module


def _build(isa: str) -> ModuleType:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"not an x86-64 CPU ({platform.machine()})")
    from torch.utils import cpp_extension

    name = build_name(isa)
    directory = cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    # torch's builder runs `ninja` from PATH; in a venv not activated, it sits next to our python.
    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    # -fopenmp: at::parallel_for runs on torch's OpenMP team (torch ships libgomp.so.1, and the loader
    # reuses the already-loaded soname: one thread pool); without it the kernel would run on one thread.
    return cpp_extension.load(  # type: ignore[no-any-return]
        name=name, sources=[str(HERE / p) for p in ISA_SOURCES[isa]], extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS[isa]], extra_ldflags=["-fopenmp"],
        build_directory=str(directory), verbose=False,
    )


def cpu_kernels() -> ModuleType | None:
    """Our kernels as the engine uses them on CPU, or None for torch's (`LLM_SERVE_INT4_KERNEL=torch`).
    Called per layer per step: after the first build it costs one environment lookup."""
    if os.environ.get(ENV, "auto") == "torch":
        return None
    return _built.get("native") or load("native")


def kernel_status() -> str:
    """One line for /models: which int4 CPU kernel runs, and why."""
    if os.environ.get(ENV, "auto") == "torch":
        return f"torch _weight_int4pack_mm_for_cpu ({ENV}=torch)"
    module = _built.get("native")
    if module is not None:
        return f"ours, activations as int8 codes, two in outlier groups ({module.isa})"
    if "native" in _failed:
        return f"torch _weight_int4pack_mm_for_cpu (ours unavailable: {_failed['native']})"
    return "not loaded"

