"""The wire between the router and the model replicas: typed, picklable, no Ray or FastAPI import.

A request goes down as a `GenerateRequest`; chunks come back as `Chunk` (the last one has a
`finish_reason` and `Usage`), on the request's own stream or, batched per engine step with the
caller's other requests on that replica, through a channel (`Routed`, `ChannelBatch`); `ReplicaStatus` answers status/load/unload. Errors are the classes in
deployments.errors, matched with `isinstance`. The router adds `LoadProgress` items of its own while
a model autoloads (they never cross the wire). Each rule (sampling ranges, durations, byte sizes)
lives in one place: sampling ranges in deployments.engine.request (SAMPLING_BOUNDS), weight formats,
devices and dtypes in deployments.engine.config, durations in serve_app.schemas.requests (Duration),
byte sizes in serve_app.model_settings (ByteCount: pydantic's ByteSize).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: a prompt or chat messages, and SamplingParams fields (`max_tokens` may be None)."""

    request_id: str = ""  # empty: the replica names it
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    sent_at: float | None = None  # wall clock when the router handed it to Ray Serve (queue time)
    # The caller's open channels (deployments.channel). None: a caller that does not speak the channel
    # protocol (in process, pools): chunks come on the request's own stream and no `Routed` is sent.
    channels: tuple[str, ...] | None = None

    def stamped(self, sent_at: float) -> "GenerateRequest":
        return dataclasses.replace(self, sent_at=sent_at)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class Chunk:
    """New text (and its token ids) of one request; the last chunk has `finish_reason` and `usage`."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class Routed:
    """A replica's first item for a request that names channels (and for a channel itself): which
    replica took it, and whether the request's chunks come through one of the caller's channels
    instead of its own stream."""

    replica: str
    via_channel: bool = False
    channel_path: str | None = None  # the replica's socket for channels from this host (deployments.channel)


@dataclass(frozen=True)
class Handback:
    """A request's client connection given back by the replica it was handed to (deployments.handoff):
    `raw` is the end of an event it could not finish writing (the router writes it first, as is);
    `body_bytes` the bytes of the events it wrote or began, HTTP chunk framing aside (the access log's count)."""

    raw: bytes = b""
    body_bytes: int = 0


# What a channel carries per message: the chunks of the caller's requests on this replica since the
# last message, as (request_id, chunk) in order, and the handbacks of connections handed to it.
ChannelBatch = list[tuple[str, Chunk | Handback]]


# Characters Python's str.splitlines() (and so requests' iter_lines and many SSE clients) treat as
# line breaks, which json.dumps(ensure_ascii=False) leaves raw inside strings: escaped, so a token like
# U+2028 or U+0085 never splits an event.
_LINE_BREAKS = {ord(c): f"\\u{ord(c):04x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # built once, not per event


def sse_json(data: Any) -> str:
    """Compact JSON with the line breaks SSE clients split on escaped: the one encoding of every SSE event,
    the router's (serve_app.streaming) and a replica's writing into a handed-over connection alike."""
    return _encode(data).translate(_LINE_BREAKS)


def merge_chunks(first: Chunk, second: Chunk) -> Chunk:
    """One chunk for two consecutive ones of a request (a consumer that fell behind gets one event)."""
    return Chunk(first.text + second.text, first.token_ids + second.token_ids, second.finish_reason, second.usage)


@dataclass(frozen=True)
class LoadProgress:
    """Router-side: the model is loading for this request (rendered as an SSE comment)."""

    message: str


@dataclass(frozen=True)
class ReplicaStatus:
    """What a model replica reports about itself (GET /models shows it, plus the router's view)."""

    id: str
    status: str
    error: str | None = None
    architecture: str | None = None
    quantization: str | None = None
    weights: str | None = None
    weights_reason: str | None = None
    implementation: str | None = None
    kv_cache: dict[str, int] | None = None
    context_length: int | None = None
    has_chat_template: bool | None = None
    resident_memory_bytes: int = 0
    weights_bytes: int = 0
    process_rss_bytes: int = 0
    load_time_s: float | None = None
    last_used: float | None = None
    num_running_requests: int = 0
    max_num_seqs: int | None = None
    stream_interval: int | str | None = None
    num_threads: int | None = None
    device: str | None = None
    memory_estimate: dict[str, int] | None = None
    measured_bytes: int | None = None
    gpu_memory: dict[str, int] | None = None
    epoch: int = 0
    num_loads: int = 0
    pid: int | None = None
    allocator: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
