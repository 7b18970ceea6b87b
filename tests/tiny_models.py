"""Tiny randomly initialised models and a tiny trained tokenizer, built in-process and saved to disk.

They go through the same loading code as real models (`EngineConfig(model=<dir>)`), in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve hosts models behind one API; tokens stream over server-sent events.",
    "Continuous batching admits new requests between decode steps.",
    "Héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀 and more.",
] * 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (so any UTF-8 text round-trips) with chat and EOS special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(directory: Path, kind: str = "llama", with_chat_template: bool = True) -> Path:
    """Build a seeded random model of the given family and save it with its tokenizer."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    if not with_chat_template:
        tokenizer.chat_template = None
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "gemma3":
        # A sliding window shorter than the test sequences, so the hybrid-attention path is exercised.
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        model = Gemma3ForCausalLM(cfg)
    elif kind == "qwen3":  # no native code for it: served by the generic transformers adapter
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_lora_adapter(base_dir: Path, out: Path, seed: int, rank: int = 8, targets: list[str] | None = None, base_name: str | None = None) -> Path:
    """A PEFT LoRA adapter of `base_dir` with random non-zero A and B (so it changes the output),
    saved in PEFT's format (safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or LORA_TARGETS, init_lora_weights=False)
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft.save_pretrained(out)
    if base_name is not None:  # the model id the service knows the base by (adapter_dir discovery)
        import json

        config_file = out / "adapter_config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": base_name}))
    return out
