"""4-bit GGUF tensors as `Int4Weight`s, decoded exactly from their blocks, by transformers name.

Q4_0, Q4_1 and Q4_K blocks all fit the int4 kernels' `(q - 8) * scale + zero` with groups of 32:
  Q4_0  w = d * (q - 8)            -> scale d,        zero 0
  Q4_1  w = d * q + m              -> scale d,        zero m + 8 d
  Q4_K  w = d * sc * q - dmin * mn -> scale d * sc,   zero 8 d sc - dmin mn   (per 32 of a 256 block)
The codes are the file's nibbles, untouched; scale and zero are computed once in fp32 (products of
an fp16 and a 6-bit integer are exact there), so nothing goes through a float round trip.

Names and layout follow transformers' own GGUF loading (the legacy path that Llama and Gemma 3
take): gguf-py's tensor-name table through `get_gguf_hf_weights_map`, and the architecture's
`TensorProcessor`, applied to row indices, gives the row order (Llama's Q/K reverse permutation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import Q4_K

from deployments.engine.layers.int4 import Int4Weight

INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
GROUP_SIZE = 32


class GgufTensor(NamedTuple):
    """One stored tensor: its GGUF name, type, torch-order shape and raw bytes (a memory map)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


def read_tensor_table(gguf_path: Path) -> tuple[str, list[GgufTensor]]:
    """(general.architecture, every tensor), without reading tensor data.

    Uses transformers' GGUF header parser, which skips the vocabulary (0.05 s for Gemma 3 270M,
    against 12 s for `gguf.GGUFReader`, which builds a field per token); falls back to
    `gguf.GGUFReader` if that private helper is gone.
    """
    try:
        from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table
    except ImportError:
        return _read_with_gguf_reader(gguf_path)
    blob = _mapped(str(gguf_path))
    metadata, count, pos = _read_metadata(blob, str(gguf_path))
    entries, pos = _read_tensor_table(blob, count, pos)
    alignment = int(metadata.get("general.alignment", 32))
    start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, raw_type, offset in entries:
        ggml_type = GGMLQuantizationType(raw_type)
        block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
        nbytes = int(np.prod(shape)) // block_elements * block_bytes
        tensors.append(GgufTensor(name, ggml_type, tuple(shape), blob[start + offset : start + offset + nbytes]))
    return str(metadata["general.architecture"]), tensors


def gguf_file_type(gguf_path: Path) -> str:
    """`GGUF MOSTLY_Q4_1` etc., from the header alone (0.05 s; `gguf.GGUFReader` takes 3-12 s)."""
    from transformers.integrations.gguf import read_gguf_metadata

    file_type = read_gguf_metadata(str(gguf_path))[0].get("general.file_type")
    return "GGUF" if file_type is None else f"GGUF {LlamaFileType(int(file_type)).name}"


def _read_with_gguf_reader(gguf_path: Path) -> tuple[str, list[GgufTensor]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    tensors = [
        GgufTensor(t.name, GGMLQuantizationType(t.tensor_type), tuple(int(n) for n in reversed(t.shape)), t.data.reshape(-1))
        for t in reader.tensors
    ]
    return architecture, tensors


def load_config(gguf_path: Path) -> Any:
    """transformers' config for a GGUF file (slow: 3 s for SmolLM2, 17 s for Gemma 3, most of it
    parsing the vocabulary). Pass a config you already have to the functions below instead."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)


class _StateDictNames:
    """Just what `get_gguf_hf_weights_map` reads of a model: its config and state-dict names.

    With no children it makes one pass over the names; given a real model it recurses into every
    submodule and rebuilds gguf-py's name table each time (7.7 s for SmolLM2's 30 layers).
    """

    def __init__(self, config: Any, names: list[str]) -> None:
        self.config, self._names = config, names

    def state_dict(self) -> dict[str, None]:
        return dict.fromkeys(self._names)

    def named_children(self) -> list[tuple[str, Any]]:
        return []


def _processor_and_names(architecture: str, config: Any) -> tuple[Any, dict[str, str]]:
    """(transformers' TensorProcessor for the architecture, {gguf name: transformers name})."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    with torch.device("meta"):
        names = list(AutoModelForCausalLM.from_config(config).state_dict())
    return processor, get_gguf_hf_weights_map(_StateDictNames(config, names), processor)


def gguf_quant_types(gguf_path: Path, config: Any = None) -> dict[str, str]:
    """{transformers parameter name: GGML type it is stored as, e.g. `Q4_K`} for every mapped tensor."""
    architecture, tensors = read_tensor_table(gguf_path)
    _, names = _processor_and_names(architecture, config if config is not None else load_config(gguf_path))
    return {names[t.name]: t.ggml_type.name for t in tensors if t.name in names}


def read_int4_weights(gguf_path: Path, config: Any = None) -> dict[str, Int4Weight]:
    """{transformers parameter name: Int4Weight} for every tensor stored as Q4_0, Q4_1 or Q4_K.

    `config` is the model's transformers config (loaded from the file when None, which is slow).
    A tensor whose transformers conversion is more than a row reordering is left out (the caller
    quantizes it from the dequantized checkpoint instead).
    """
    architecture, tensors = read_tensor_table(gguf_path)
    processor, names = _processor_and_names(architecture, config if config is not None else load_config(gguf_path))
    weights: dict[str, Int4Weight] = {}
    for tensor in tensors:
        if tensor.ggml_type not in INT4_TYPES or tensor.name not in names or len(tensor.shape) != 2:
            continue
        order = _row_order(processor, tensor, names)
        if order is False:
            continue
        weight = decode_int4(tensor)
        weights[names[tensor.name]] = weight if order is None else weight.permute_rows(torch.from_numpy(order))
    return weights


def _row_order(processor: Any, tensor: GgufTensor, names: dict[str, str]) -> np.ndarray | None | bool:
    """The row permutation transformers applies to this tensor; None if none, False if it does
    anything else (transposes, value changes, renames), found by processing row indices."""
    rows = tensor.shape[0]
    scratch: dict[str, Any] = {"tensors": {}, "config": dict(processor.config)}
    index = np.arange(rows, dtype=np.int64).reshape(rows, 1)
    result = processor.process(weights=index, name=tensor.name, tensor_key_mapping=names, parsed_parameters=scratch)
    if result.name != tensor.name or np.shape(result.weights) != (rows, 1):
        return False
    order = np.asarray(result.weights).reshape(rows)
    if not np.array_equal(np.sort(order), index.reshape(rows)):
        return False
    return None if np.array_equal(order, index.reshape(rows)) else order


def decode_int4(tensor: GgufTensor) -> Int4Weight:
    """A Q4_0 / Q4_1 / Q4_K tensor's codes, scales and zeros (group 32), exactly."""
    block_elements, block_bytes = GGML_QUANT_SIZES[tensor.ggml_type]
    blocks = np.asarray(tensor.data).reshape(-1, block_bytes)
    decode = {
        GGMLQuantizationType.Q4_0: _decode_q4_0,
        GGMLQuantizationType.Q4_1: _decode_q4_1,
        GGMLQuantizationType.Q4_K: _decode_q4_k,
    }[tensor.ggml_type]
    q, scales, zeros = decode(blocks)
    rows, cols = tensor.shape
    return Int4Weight(
        torch.from_numpy(q.reshape(rows, cols)),
        torch.from_numpy(scales.reshape(rows, cols // GROUP_SIZE)),
        torch.from_numpy(zeros.reshape(rows, cols // GROUP_SIZE)),
        GROUP_SIZE,
    )


def _fp16(raw: np.ndarray) -> np.ndarray:
    """Two-byte columns read as float16, widened to float32 (exact)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 order: byte j holds element j (low nibble) and element j + 16 (high nibble)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _decode_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _fp16(blocks[:, 0:2])
    return _nibbles(blocks[:, 2:]), d, np.zeros_like(d)


def _decode_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, m = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    return _nibbles(blocks[:, 4:]), d, m + 8 * d


def _decode_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """256-element super-blocks: fp16 d, dmin; 12 bytes of 6-bit (scale, min) pairs for 8
    sub-blocks; 128 bytes of codes, where byte j of each 32-byte chunk c holds element j of
    sub-block 2c (low nibble) and of sub-block 2c + 1 (high nibble)."""
    n = blocks.shape[0]
    d, dmin = _fp16(blocks[:, 0:2]), _fp16(blocks[:, 2:4])
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))  # gguf-py's unpacking
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256)
    scale = d * sc.astype(np.float32)
    return q, scale, 8 * scale - dmin * mn.astype(np.float32)
