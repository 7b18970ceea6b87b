"""Fakes that isolate one layer; each stands in for a dependency, never for the thing under test."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.engine.async_engine import EngineDeadError, ThreadSink
from deployments.engine.config import EngineConfig
from deployments.engine.request import FinishReason, InvalidRequestError, RequestOutput, SamplingParams
from deployments.engine.stream_interval import StreamInterval


@dataclass
class _ScriptedRunner:
    """The load facts `ModelServer` reads from a runner."""

    architecture: str = "ScriptedForTests"
    quantization: str = "none"
    weights: str = "fp32"
    weights_reason: str = "scripted test engine"
    kv_cache_bytes: int = 0
    facts: dict[str, Any] = field(default_factory=lambda: {"implementation": "scripted"})

    def weights_bytes(self) -> int:
        return 0


class _ScriptedCore:
    """The `engine.engine` face `ModelServer` uses: encode, resolve_max_tokens, stats, facts.

    A token is one Unicode code point, so the scripted engine can read the prompt back."""

    def __init__(self, config: EngineConfig, has_chat_template: bool) -> None:
        self.config = config
        self.max_model_len = config.max_model_len
        self.has_chat_template = has_chat_template
        self.runner = _ScriptedRunner()
        self.num_running = 0

    def encode(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> list[int]:
        if messages is not None:
            if not self.has_chat_template:
                raise InvalidRequestError("this model has no chat template; use a completion (prompt) request", param="messages")
            text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        else:
            text = prompt or ""
        if not text:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return [ord(c) for c in text]

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        if requested is not None:
            return requested
        return max(1, min(self.config.default_max_tokens, self.max_model_len - num_prompt_tokens))

    def stats(self) -> dict[str, int]:
        return {"block_size": 16, "num_blocks": 0, "num_used_blocks": 0, "num_free_blocks": 0, "kv_cache_bytes": 0,
                "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0,
                "num_running": self.num_running, "num_waiting": 0}


class ScriptedEngine:
    """Stands in for `AsyncLLMEngine` (a `ModelServer` `engine_cls`): streams a scripted reply, one
    word per `delay_s`, so a test of the layers above (HTTP, SSE, the chat page) sees deterministic
    text arrive at a human pace. The reply is `replies[key]` for the key found last in the prompt's
    final user turn, else `default_reply`; each word counts as one token (`max_tokens` cuts it)."""

    def __init__(
        self,
        config: EngineConfig,
        replies: Mapping[str, str] | None = None,
        default_reply: str = "Hello! I am a scripted model.",
        delay_s: float = 0.05,
        load_delay_s: float = 0.0,
        has_chat_template: bool = True,
    ) -> None:
        time.sleep(load_delay_s)  # a load that takes a while (ModelServer runs it in a thread)
        self.engine = _ScriptedCore(config, has_chat_template)
        self.pacing = StreamInterval(1)  # every word its own output
        self.replies = dict(replies or {})
        self.default_reply = default_reply
        self.delay_s = delay_s
        self._active: set[str] = set()
        self._ids = itertools.count()
        self._stopped = False

    @property
    def num_requests(self) -> int:
        return len(self._active)

    def next_request_id(self) -> str:
        return f"scripted-{next(self._ids)}"

    def reply_for(self, prompt_token_ids: list[int]) -> str:
        text = "".join(map(chr, prompt_token_ids))
        last_user = text.rsplit("<|user|>", 1)[-1]
        found = [(last_user.rfind(key), key) for key in self.replies if key in last_user]
        return self.replies[max(found)[1]] if found else self.default_reply

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
        sink: Callable[[RequestOutput], None] | None = None, thread_sink: ThreadSink | None = None,
    ) -> AsyncIterator[RequestOutput]:
        assert adapter is None, f"the scripted model has no adapter {adapter!r}"
        if self._stopped:
            raise EngineDeadError("the engine is shut down")
        words = re.findall(r"\s*\S+", self.reply_for(prompt_token_ids)) or [" "]
        count = min(len(words), params.max_tokens)
        self._active.add(request_id)
        self.engine.num_running += 1
        try:
            for i, word in enumerate(words[:count], start=1):
                await asyncio.sleep(self.delay_s)
                if self._stopped:
                    raise EngineDeadError("the model was unloaded while this request was running")
                reason = None if i < count else (FinishReason.STOP if count == len(words) else FinishReason.LENGTH)
                output = RequestOutput(request_id, [i], word, reason, len(prompt_token_ids), i)
                if thread_sink is not None and reason is None:  # as AsyncLLMEngine: all but the last, there
                    thread_sink.flush([thread_sink.item(output)])
                elif sink is not None and reason is None:  # as AsyncLLMEngine: all but the last to the sink
                    sink(output)
                else:
                    yield output
        finally:
            self._active.discard(request_id)
            self.engine.num_running -= 1

    def shutdown(self) -> None:
        self._stopped = True


class RecordingMetric:
    """Stands in for a Ray metric (what `make_metric` builds) where no Ray runs: keeps every call."""

    def __init__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries: list[float] | None = None) -> None:
        self.kind, self.name, self.tag_keys, self.boundaries = kind, name, tag_keys, boundaries
        self.calls: list[tuple[float, dict[str, str]]] = []  # (value, tags) of each inc/set/observe

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record(value, tags)

    def _record(self, value: float, tags: dict[str, str] | None) -> None:
        tags = dict(tags or {})
        assert set(tags) == set(self.tag_keys), f"{self.name}: tags {sorted(tags)} != tag_keys {sorted(self.tag_keys)}"
        self.calls.append((value, tags))

    def values(self, **tags: str) -> list[float]:
        """The recorded values whose tags include `tags`."""
        return [v for v, t in self.calls if tags.items() <= t.items()]

    def last(self, **tags: str) -> float | None:
        found = self.values(**tags)
        return found[-1] if found else None
