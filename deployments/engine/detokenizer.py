"""Incremental detokenisation with stop strings, on top of tokenizers' `DecodeStream`.

`DecodeStream` buffers tokens until they form valid UTF-8 (a character split across byte-fallback
tokens is never emitted half-way) and, primed with the prompt ids, keeps leading spaces right.
Text that could still turn out to be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns one sequence's tokens into text deltas whose concatenation is its whole text."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: tuple[str, ...]) -> None:
        self._backend = tokenizer._tokenizer  # the Rust tokenizer behind a fast transformers tokenizer
        self._stream = DecodeStream(ids=list(prompt_token_ids), skip_special_tokens=True)
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""
        self._num_emitted = 0

    def push(self, token_id: int) -> bool:
        """Decode one more token; True when a stop string appeared (the text is cut before it)."""
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return False
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += piece
        hits = [at for at in (self.text.find(stop, search_from) for stop in self._stop) if at != -1]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def pop_delta(self, finished: bool) -> str:
        """The text not yet emitted, less a tail that might begin a stop string (unless finished)."""
        hold = 0 if finished else max(self._max_stop_len - 1, 0)
        end = max(self._num_emitted, len(self.text) - hold)
        delta = self.text[self._num_emitted : end]
        self._num_emitted = end
        return delta
