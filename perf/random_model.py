"""Write a randomly initialised model of a real model's shape (as vLLM's dummy load format does), for
timings where real weights cannot travel (e.g. to a lent GPU: weights over 64 MiB cannot be sent).

Run: python perf/random_model.py --shape llama-3.2-1b --out /tmp/llama-3.2-1b [--dtype bfloat16]
then: python perf/bench_engine.py --model /tmp/llama-3.2-1b --device cuda --dtype bfloat16 --variants ours,static
The tokenizer is the tests' tiny byte-level BPE: token ids stay below its vocabulary, which is all a
throughput benchmark needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.tiny_models import build_tokenizer  # noqa: E402

SHAPES = {
    # Llama-3.2-1B's published shape (config.json of meta-llama/Llama-3.2-1B).
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, head_dim=64),
    # A small shape to check the script itself on a CPU.
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, head_dim=64),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    tokenizer = build_tokenizer()
    config = LlamaConfig(**SHAPES[args.shape], eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(t.numel() for t in model.parameters())
    print(f"wrote {out}: {args.shape}, {params / 1e6:.0f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
