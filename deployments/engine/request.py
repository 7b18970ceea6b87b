"""The engine's own request and output types, and the sampling rules (the wire schemas in
serve_app build their bounds from `SAMPLING_BOUNDS`, so a rule is stated here only)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

MAX_TOKENS_LIMIT = 2**31 - 1
"""The largest token count (max_tokens, min_tokens, top_k) anyone may ask for."""
MAX_STOP_STRINGS = 8
SEED_RANGE = (-(2**63), 2**64 - 1)
"""What torch.Generator.manual_seed accepts."""


@dataclass(frozen=True)
class Bounds:
    """The allowed values of one number: `ge`/`gt` below, `le` above (None: no bound on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def contains(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )

    def describe(self) -> str:
        """E.g. "in [0, 2]", "in (0, 1]", ">= 1"."""
        low, bracket = (self.ge, "[") if self.gt is None else (self.gt, "(")
        if low is not None and self.le is not None:
            return f"in {bracket}{_number(low)}, {_number(self.le)}]"
        if low is not None:
            return f"{'>=' if self.gt is None else '>'} {_number(low)}"
        return f"<= {_number(self.le)}" if self.le is not None else "a number"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


SAMPLING_BOUNDS: dict[str, Bounds] = {
    "max_tokens": Bounds(ge=1, le=MAX_TOKENS_LIMIT),
    "temperature": Bounds(ge=0.0, le=2.0),
    "top_p": Bounds(gt=0.0, le=1.0),
    "top_k": Bounds(ge=1, le=MAX_TOKENS_LIMIT),
    "seed": Bounds(ge=SEED_RANGE[0], le=SEED_RANGE[1]),
    "repetition_penalty": Bounds(gt=0.0, le=10.0),
    "frequency_penalty": Bounds(ge=-2.0, le=2.0),
    "presence_penalty": Bounds(ge=-2.0, le=2.0),
    "min_tokens": Bounds(ge=0, le=MAX_TOKENS_LIMIT),
}
"""The range of each numeric `SamplingParams` field."""
NULLABLE_SAMPLING_FIELDS = ("top_k", "seed")
"""None means no top-k cut, and no fixed seed."""


class FinishReason(str, enum.Enum):
    """Why a sequence stopped, spelled as OpenAI spells it."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; every sequence in a batch keeps its own."""

    max_tokens: int = 16
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int | None = None
    """None keeps the whole vocabulary."""
    seed: int | None = None
    repetition_penalty: float = 1.0
    """transformers' semantics: divides positive logits of seen tokens (prompt and output)."""
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    """EOS is masked out until this many tokens were generated."""
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name, bounds in SAMPLING_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in NULLABLE_SAMPLING_FIELDS:
                continue
            if not isinstance(value, (int, float)) or not bounds.contains(value):
                raise InvalidRequestError(f"{name}={value!r} must be {bounds.describe()}", param=name)
        checks = [
            ("min_tokens", self.min_tokens <= self.max_tokens, f"must not exceed max_tokens ({self.max_tokens})"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"takes at most {MAX_STOP_STRINGS} strings"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InvalidRequestError(f"{name}={getattr(self, name)!r} {rule}", param=name)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class InvalidRequestError(ValueError):
    """A request the engine cannot run as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return (type(self), (str(self), self.param))


@dataclass
class Sequence:
    """One request's running state: its tokens so far, how many are in the KV cache, its blocks.

    `token_ids` is the prompt followed by the output so far. `num_computed_tokens` of them have
    their keys and values in the cache (a prompt is computed in chunks; a preempted sequence goes
    back to 0 and is recomputed). `block_table` lists the KV-cache blocks holding them, in order.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at admission (not recomputed)."""
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0
    """Leading blocks of `block_table` already registered in the prefix cache."""
    num_preemptions: int = 0
    adapter: str | None = None
    """The LoRA adapter this sequence runs with (None: the base model)."""
    lora_slot: int = -1
    """The runner's slot holding that adapter (-1: none)."""
    cache_salt: bytes | None = None
    """Mixed into its prefix-cache hashes: KV computed under one adapter is never another's."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: new tokens, new text, and whether it ended."""

    request_id: str
    new_token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def then(self, nxt: RequestOutput) -> RequestOutput:
        """This output and the request's next one as one (a consumer that fell behind, a stream interval)."""
        return RequestOutput(self.request_id, self.new_token_ids + nxt.new_token_ids, self.text + nxt.text,
                             nxt.finish_reason, nxt.num_prompt_tokens, nxt.num_output_tokens)
