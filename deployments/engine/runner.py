"""The model runner: the torch-heavy part. Loads the model, preallocates the paged KV cache once,
turns a `SchedulerOutput` into one flat batch (input ids, positions, slot mapping, block tables),
runs it, and returns the logits of the sequences that sample."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import GenerationConfig

from deployments.engine import kernels
from deployments.engine.config import EngineConfig, serving_dtype
from deployments.engine.layers.attention import build_metadata
from deployments.engine.lora import LoRAManager
from deployments.engine.loader import checkpoint_directory, describe_source, load_generic, load_tokenizer, resolve_model_path
from deployments.engine.models import build_model, is_native, load_config
from deployments.engine.scheduler import SchedulerOutput
from deployments.engine.weights.select import choose_weights


class ModelRunner:
    """Runs packed forward passes over one model; owns the weights and the KV-cache tensors."""

    def __init__(self, config: EngineConfig) -> None:
        if config.device == "cpu":
            # Ray sets OMP_NUM_THREADS from the actor's num_cpus (1 for a fraction), which halves
            # decode speed; default to every core this process may run on.
            torch.set_num_threads(config.num_threads or len(os.sched_getaffinity(0)))
        self.config = config
        self.device = torch.device(config.device)
        self.model: Any  # our native model or the generic adapter: same interface (models/)
        source = resolve_model_path(config.model)
        directory = checkpoint_directory(source)
        self.tokenizer = load_tokenizer(directory, config.chat_template)
        self.generation_config = _generation_config(directory)
        hf_config = load_config(directory)
        native = is_native(hf_config)
        self.max_position_embeddings = getattr(hf_config.get_text_config(decoder=True), "max_position_embeddings", None)
        max_positions = min(config.max_model_len, self.max_position_embeddings or config.max_model_len)
        source_format = describe_source(source, directory)
        stored_4bit = source[1] is not None and "Q4" in source_format
        self.weights, self.weights_reason = choose_weights(
            config.weights, config.device, native, hf_config, config.max_num_seqs, stored_4bit
        )
        self.facts: dict[str, Any] = {"source_format": source_format, "weights": self.weights, "weights_reason": self.weights_reason}
        if native:
            int4 = _gguf_int4(source, directory, hf_config) if self.weights == "int4" else None
            built = build_model(directory, hf_config, self.weights, self.device, max_positions, int4)
            self.model, self.architecture, self.act_dtype = built.model, built.architecture, built.act_dtype
            self.facts |= {"implementation": "native", "int4_exact_from_gguf": built.num_exact_int4, "int4_requantized": built.num_requantized,
                           "linear_formats": _linear_formats(self.model)}
            if self.weights == "int4" and self.device.type == "cpu":
                self.weights_reason += f"; int4 matmul: {kernels.kernel_status()}"
                self.facts["weights_reason"] = self.weights_reason
        else:
            self.act_dtype = getattr(torch, serving_dtype(self.weights))
            self.model = load_generic(directory, self.act_dtype, self.device)
            self.architecture = (self.model.hf.config.architectures or [type(self.model.hf).__name__])[0]
            self.facts |= {"implementation": "transformers"}
        self.quantization = f"{self.facts['source_format']} -> {self.weights}"
        self.lora: LoRAManager | None = None
        if config.max_loras:
            if not native:
                raise ValueError(f"LoRA adapters need our native model code; {self.architecture} runs through transformers")
            # fp32 for the reference; where our CPU kernel runs, int8 slots (a scale per row): a decode step
            # reads every adapter of its batch, and int8 halves bf16's bytes (perf/README.md, session 8).
            lora_dtype = getattr(torch, serving_dtype(self.weights))
            if lora_dtype == torch.bfloat16 and self.device.type == "cpu" and kernels.cpu_kernels() is not None:
                lora_dtype = torch.int8
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, lora_dtype, self.device)
            self.facts["lora_slot_bytes"] = self.lora.slot_bytes
        self._allocate_kv_cache()

    def _allocate_kv_cache(self) -> None:
        """One tensor [layers, 2, slots, kv_heads, head_dim], allocated once and never reshaped: fp32 for
        fp32 weights (the reference), bf16 for the others (half the bytes to read per decode step)."""
        model, cfg = self.model, self.config
        num_layers = len(model.layers) if hasattr(model, "layers") else int(model.config.num_hidden_layers)
        self.kv_dtype = getattr(torch, serving_dtype(self.weights))
        self.facts["kv_cache_dtype"] = str(self.kv_dtype).removeprefix("torch.")
        bytes_per_token = num_layers * 2 * model.num_kv_heads * model.head_dim * torch.finfo(self.kv_dtype).bits // 8
        self.block_size = cfg.block_size
        self.num_blocks = max(1, int(cfg.kv_cache_size(int(bytes_per_token)) // (bytes_per_token * cfg.block_size)))
        shape = (num_layers, 2, self.num_blocks * cfg.block_size, model.num_kv_heads, model.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_cache_bytes = self.kv_cache.numel() * self.kv_cache.element_size()
        model.bind_kv_cache([(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(num_layers)], cfg.block_size)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> torch.Tensor:
        """Run every scheduled token as one flat batch; logits [num sampling seqs, vocab] in the order of
        `scheduler_output.sample_indices`. Two lanes (engine/lanes.py) may call it at once."""
        seqs, counts = scheduler_output.seqs, scheduler_output.num_new_tokens
        order = sorted(range(len(seqs)), key=lambda i: counts[i] > 1)  # decodes first
        input_ids: list[int] = []
        positions: list[list[int]] = []
        token_slots: list[int] = []
        for i in order:
            start = seqs[i].num_computed_tokens
            input_ids.extend(seqs[i].token_ids[start : start + counts[i]])
            positions.append(list(range(start, start + counts[i])))
            token_slots.extend([seqs[i].lora_slot] * counts[i])
        if self.lora is not None:
            self.lora.set_batch(token_slots)
        meta = build_metadata(
            positions, [seqs[i].block_table for i in order], self.block_size, self.model.sliding_window, self.device
        )
        flat_positions = torch.tensor([p for pos in positions for p in pos], device=self.device)
        ids = torch.tensor(input_ids, device=self.device)
        hidden = self.model(ids, flat_positions, meta)
        ends, offset = {}, 0
        for i, pos in zip(order, positions):
            offset += len(pos)
            ends[i] = offset - 1
        rows = torch.tensor([ends[i] for i in scheduler_output.sample_indices], dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden.index_select(0, rows))

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, vocab] at every position of one sequence (teacher forcing), through the same
        paged path; it writes blocks 0.. of the cache, so the engine must be idle (LLMEngine.score)."""
        n = len(token_ids)
        num_blocks = -(-n // self.block_size)
        if num_blocks > self.num_blocks:
            raise ValueError(f"{n} tokens do not fit the KV cache ({self.num_blocks} blocks of {self.block_size})")
        meta = build_metadata([list(range(n))], [list(range(num_blocks))], self.block_size, self.model.sliding_window, self.device)
        positions = torch.arange(n, device=self.device)
        if self.lora is not None:
            self.lora.set_batch(None)
        hidden = self.model(torch.tensor(token_ids, device=self.device), positions, meta)
        return self.model.compute_logits(hidden)

    def weights_bytes(self) -> int:
        """Bytes of parameters and buffers (packed int4/int8 weights by their real storage)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def release(self) -> None:
        """Drop every reference to the weights and the cache so they can be freed."""
        self.model.bind_kv_cache([], self.block_size)
        del self.model, self.tokenizer, self.kv_cache


def _linear_formats(model: torch.nn.Module) -> dict[str, int]:
    """How many of the model's (fused) projections each weight format serves, e.g. {"int4": 27, "int8g": 45}."""
    from deployments.engine.layers.linear import Linear

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, Linear):
            counts[module.fmt] = counts.get(module.fmt, 0) + 1
    return counts


def _generation_config(directory: Any) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    except OSError:
        return None


def _gguf_int4(source: tuple[Any, str | None], cache_dir: Any, hf_config: Any) -> dict[str, Any] | None:
    directory, gguf_file = source
    if gguf_file is None:
        return None
    from deployments.engine.weights.int4_cache import cached_int4_weights

    return cached_int4_weights(directory / gguf_file, cache_dir, hf_config)
