"""Find a model's files on local disk and load them with transformers, never touching a hub."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.engine.quantization import quantize

PKG_SCHEME = "pkg://"


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
    return path, None


def load_model_and_tokenizer(
    model: str, dtype: str, device: str, chat_template: str | None, quantization: str | None = None
) -> tuple[Any, Any]:
    """Load weights and tokenizer from local files only (GGUF weights are dequantised to `dtype`,
    then quantized again by `quantization` if set)."""
    directory, gguf_file = resolve_model_path(model)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, **extra)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{model!r} has no fast tokenizer; incremental detokenisation needs one")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    network: Any = AutoModelForCausalLM.from_pretrained(
        str(directory), local_files_only=True, dtype=getattr(torch, dtype), **extra
    )
    network.to(device).eval()
    return quantize(network, quantization, device), tokenizer


def describe_quantization(model: str, dtype: str, quantization: str | None = None) -> str:
    """How the weights are stored at the source and what they run as, e.g. `GGUF MOSTLY_Q4_1 -> int8`."""
    directory, gguf_file = resolve_model_path(model)
    dtype = f"{quantization} weights ({dtype} activations)" if quantization else dtype
    if gguf_file is None:
        config = (directory / "config.json").read_text()
        return f"checkpoint quantization_config -> {dtype}" if "quantization_config" in config else dtype
    import gguf  # only GGUF sources need it

    field = gguf.GGUFReader(str(directory / gguf_file)).fields.get("general.file_type")
    if field is None:
        return f"GGUF -> {dtype}"
    file_type = int(field.parts[field.data[0]][0])
    return f"GGUF {gguf.LlamaFileType(file_type).name} -> {dtype}"
