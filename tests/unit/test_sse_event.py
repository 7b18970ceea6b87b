"""SSE events survive clients that split lines the way Python's str.splitlines() does."""

from __future__ import annotations

import json

from serve_app.streaming import sse_event


def test_unicode_line_breaks_in_text_never_split_an_event() -> None:
    text = "a\u2028b\u2029c\x85d\ne\rf"
    event = sse_event({"text": text})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][len("data: ") :]) == {"text": text}
