"""How an engine's outputs leave the model server: as wire chunks, and through a caller's channel,
on the serving loop or, through a socket, from the engine thread that made them."""

from __future__ import annotations

from collections.abc import Callable

from deployments.channel import Channel
from deployments.engine.async_engine import ThreadSink
from deployments.engine.request import RequestOutput
from deployments.metrics import RequestTimer
from deployments.protocol import Chunk, Handback, Usage


def to_chunk(out: RequestOutput) -> Chunk:
    """An engine output as a wire chunk (usage on the last)."""
    usage = Usage(out.num_prompt_tokens, out.num_output_tokens) if out.finished else None
    return Chunk(out.text, out.new_token_ids, out.finish_reason.value if out.finish_reason else None, usage)


def channel_sink(channel: Channel, request_id: str, timer: RequestTimer) -> Callable[[RequestOutput], None]:
    """Records each output and pushes it into the caller's channel, on the serving loop."""

    def push(out: RequestOutput) -> None:
        timer.output(out)
        if out.finished:  # a handed-over connection comes back first: the router writes the last events
            channel.end_handoff(request_id)
        channel.push(request_id, to_chunk(out))

    return push


def channel_thread_sink(channel: Channel, request_id: str, timer: RequestTimer) -> ThreadSink:
    """Records each output on the engine thread; the step's chunks for the channel leave in one write, or
    each goes straight into the request's client connection once its router handed that over."""
    channel.handoffs.track(request_id)

    def item(out: RequestOutput) -> tuple[str, Chunk | Handback] | None:
        timer.output(out)
        return channel.handoffs.item(request_id, to_chunk(out))

    return ThreadSink(item, channel.push_from_thread)
