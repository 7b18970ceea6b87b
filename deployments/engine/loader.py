"""Find a model's files on local disk and load them with transformers, never touching a hub."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


PKG_SCHEME = "pkg://"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight files in Python's pickle format: loading one can run any code it carries, so none is read."""
ModelSource = tuple[Path, "str | None"]
"""(directory, GGUF file name or None), as `resolve_model_path` finds it."""


def resolve_model_path(model: str) -> tuple[Path, str | None]:
    """Return (directory, gguf file name or None) for a directory, a .gguf path or pkg://package/file.

    A `pkg://` source names a file shipped inside an installed Python package. The package is located
    without importing it (some weight packages import heavy runtimes we do not use); a package that
    ships its file in parts and offers `assemble()` is asked to write the whole file once.
    """
    if model.startswith(PKG_SCHEME):
        package, _, file_name = model[len(PKG_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model package {package!r} is not installed (source {model!r})")
        shipped = Path(next(iter(spec.submodule_search_locations))) / file_name
        if shipped.is_file():
            return shipped.parent, shipped.name
        assemble = getattr(importlib.import_module(package), "assemble", None)
        if assemble is None:
            raise FileNotFoundError(f"{file_name!r} is not in package {package!r} and it has no assemble()")
        assembled = Path(assemble())
        return assembled.parent, assembled.name
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a model directory with config.json")
    refuse_pickle_only(path)
    return path, None


def refuse_pickle_only(directory: Path) -> None:
    """A checkpoint directory must hold its weights as safetensors; pickle files are never loaded."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{directory} holds its weights only as pickle files ({', '.join(pickled[:3])}), which are refused "
            "because unpickling can run arbitrary code; give the model as safetensors or GGUF"
        )
    raise FileNotFoundError(f"{directory} has no safetensors weights")


def checkpoint_directory(source: ModelSource) -> Path:
    """The transformers checkpoint to read: the directory itself, or a GGUF file's conversion."""
    directory, gguf_file = source
    return converted_checkpoint(directory / gguf_file, "float32") if gguf_file is not None else directory


def load_tokenizer(directory: Path, chat_template: str | None) -> Any:
    """The fast tokenizer of a checkpoint directory (local files only), with an optional template."""
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{directory} has no fast tokenizer; incremental detokenisation needs one")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_generic(directory: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """Any transformers causal LM on our paged attention (GPTQ checkpoints import gptqmodel first)."""
    from deployments.engine.models.hf_generic import HFGenericCausalLM

    _import_quantization_backend(directory)
    return HFGenericCausalLM(directory, dtype, device)


def _import_quantization_backend(directory: Path) -> None:
    """Import gptqmodel for a GPTQ checkpoint on a thread of its own, before loading. Its first import
    keeps the importing frame stack alive; imported inside `from_pretrained` (or from any frame above
    it), that stack holds the first model after unload (measured: 16 of ~300 MiB freed on the first
    unload). A fresh thread's stack holds nothing of ours."""
    config = directory / "config.json"
    stored = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if stored and stored.get("quant_method") == "gptq" and importlib.util.find_spec("gptqmodel") is not None:
        importer = threading.Thread(target=importlib.import_module, args=("gptqmodel",), name="import-gptqmodel")
        importer.start()
        importer.join()


def conversion_cache_root() -> Path:
    """Where converted GGUF checkpoints live: $LLM_SERVE_CACHE_DIR, else ~/.cache/llm-serve."""
    return Path(os.environ.get("LLM_SERVE_CACHE_DIR") or Path.home() / ".cache" / "llm-serve") / "converted"


def converted_checkpoint(gguf_path: Path, dtype: str) -> Path:
    """A transformers checkpoint (safetensors + tokenizer files) converted from `gguf_path`.

    transformers dequantises GGUF tensors and converts the tokenizer on every load (17 s for
    SmolLM2-135M, about 50 s for Gemma 3 270M here); doing it once and loading safetensors after is
    the whole difference. Keyed by the file's sha256 and the dtype; written to a temporary folder
    and renamed into place, so a crash never leaves a half-written entry.
    """
    target = conversion_cache_root() / f"{gguf_path.stem}-{_sha256(gguf_path)[:16]}-{dtype}"
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    extra = {"gguf_file": gguf_path.name, "local_files_only": True}
    with one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **extra)
        network = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=getattr(torch, dtype), **extra)
    # save_pretrained refuses models loaded from GGUF (it treats them as quantized), though the
    # weights are plain dequantised tensors by now: write config + safetensors directly.
    network.config.__dict__.pop("quantization_config", None)
    network.config.save_pretrained(staging)
    network.generation_config.save_pretrained(staging)
    safetensors.torch.save_model(network, str(staging / "model.safetensors"))
    tokenizer.save_pretrained(staging)
    del network
    try:
        staging.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def one_gguf_reader() -> Iterator[None]:
    """transformers parses the file's metadata anew for the config, the tokenizer and the weights, each
    time a `gguf.GGUFReader` (a field per vocabulary entry: 17 s for Gemma 3's 262k tokens here); within
    this block every reader of one file is the first, read-only one. One block at a time per process
    (the lock): two threads restoring each other's patch would leave one installed for good."""
    import gguf

    with _gguf_reader_patch:
        original = gguf.GGUFReader
        readers: dict[tuple[str, str], Any] = {}

        def shared_reader(path: Any, mode: str = "r") -> Any:
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = original(path, mode)
            return readers[key]

        gguf.GGUFReader = shared_reader  # type: ignore[misc,assignment]
        try:
            yield
        finally:
            gguf.GGUFReader = original  # type: ignore[misc]


_gguf_reader_patch = threading.Lock()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_source(source: ModelSource, checkpoint: Path) -> str:
    """How the weights are stored at the source, e.g. `GGUF MOSTLY_Q4_1`, `gptq-4bit-g64`, `safetensors`.
    `checkpoint` is `checkpoint_directory(source)`, passed in: for a GGUF, finding it hashes the file."""
    directory, gguf_file = source
    if gguf_file is None:
        stored = json.loads((directory / "config.json").read_text()).get("quantization_config")
        if not stored:
            return "safetensors"
        if stored.get("quant_method") == "gptq":  # e.g. `gptq-4bit-g64`
            return f"gptq-{stored.get('bits')}bit-g{stored.get('group_size')}"
        return f"{stored.get('quant_method', 'quantized')} checkpoint"
    from deployments.engine.weights.int4_cache import gguf_file_type

    return gguf_file_type(directory / gguf_file, checkpoint)
