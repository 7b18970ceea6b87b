"""Client connections handed over to the replica for the rest of a stream (the router's end: serve_app.handoff).

Through a channel socket (deployments.channel_socket) a router may send, with a streamed request's id, the
descriptor of that request's HTTP connection (uvicorn's, to HAProxy) once it has written the response's head and
first event, and nothing of the request is in flight. From then on the engine's lane thread writes each output's
SSE event into that connection itself, as one HTTP/1.1 chunk framed as uvicorn frames it, and neither the channel
nor the router handles the request per token: SmolLM2 at 10 streams, through Ray / in process 0.835 -> 0.890 over 12
alternated rounds (perf/README.md, session 29). The router rendered the request's events from a template with one
string field open (serve_app.streaming.EventTemplate); it sends the template's two ends, and the text goes between
them through the same encoding (deployments.protocol.sse_json), byte for byte.

The connection goes back (`Handback` through the channel, before anything else of the request) when the request
ends, when the router reclaims it (to write an error itself), and when a write would block or fails: then `raw`
holds the rest of the event being written, which the router writes first; the request's later outputs take the
channel again. No Ray or FastAPI import.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from deployments.protocol import Chunk, Handback, sse_json


def event_body(head: str, text: str, tail: str) -> bytes:
    """One event: `head`, the text as JSON, `tail` (the router's EventTemplate.render, encoded)."""
    return (head + sse_json(text) + tail).encode()


def http_chunk(body: bytes) -> bytes:
    """A body part as an HTTP/1.1 chunk, framed as uvicorn frames it."""
    return b"%x\r\n%b\r\n" % (len(body), body)


@dataclass
class _Out:
    fd: int
    head: str
    tail: str
    body_bytes: int = 0  # of the events written or begun (the access log counts bodies, not chunk framing)


class Handoffs:
    """The connections handed to this replica through one channel, and the tokens each request sent through
    that channel (a handoff is taken only when the router has seen them all). Called from the serving loop
    (`track`, `accept`, `end`) and the engine's lane threads (`item`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out: dict[str, _Out] = {}
        self._sent_tokens: dict[str, int] = {}
        self.closed = False  # the channel ended: no handoff is taken any more

    def track(self, request_id: str) -> None:
        """A request whose outputs leave through this channel from a lane thread: it may be handed over."""
        with self._lock:
            self._sent_tokens[request_id] = 0

    def accept(self, request_id: str, tokens: int, fd: int, head: str, tail: str) -> bool:
        """Take the connection `fd` if the router has seen every token this request sent (else close it)."""
        with self._lock:
            if not self.closed and self._sent_tokens.get(request_id) == tokens and request_id not in self._out:
                self._out[request_id] = _Out(fd, head, tail)
                return True
        os.close(fd)
        return False

    def item(self, request_id: str, chunk: Chunk) -> tuple[str, Chunk | Handback] | None:
        """On a lane thread: the channel's item for this output, or None once written into the connection."""
        with self._lock:
            out = self._out.get(request_id)
            if out is None:
                if request_id in self._sent_tokens:
                    self._sent_tokens[request_id] += len(chunk.token_ids)
                return request_id, chunk
            if not chunk.text:  # nothing to show yet (a held-back stop string): no event, as the router renders it
                return None
            body = event_body(out.head, chunk.text, out.tail)
            data = http_chunk(body)
            try:
                sent = os.write(out.fd, data)  # the descriptor is non-blocking, as uvicorn's
            except BlockingIOError:
                sent = 0
            except OSError:  # the client went away: the router meets that on its side
                sent = -1
            if sent == len(data):
                out.body_bytes += len(body)
                return None
            del self._out[request_id]
            self._sent_tokens.pop(request_id, None)  # not handed over again
            os.close(out.fd)
            if sent < 0:  # nothing more goes into it
                return request_id, Handback(b"", out.body_bytes)
            return request_id, Handback(data[sent:], out.body_bytes + len(body))  # the router finishes this event

    def end(self, request_id: str) -> Handback | None:
        """The request ended or its connection is reclaimed: close it here; its handback if it was handed over."""
        with self._lock:
            self._sent_tokens.pop(request_id, None)
            out = self._out.pop(request_id, None)
        if out is None:
            return None
        os.close(out.fd)
        return Handback(b"", out.body_bytes)

    def close_all(self) -> None:
        """The channel ended (its router is gone or closed it): every connection handed over is closed here."""
        with self._lock:
            self.closed = True
            outs, self._out = list(self._out.values()), {}
            self._sent_tokens.clear()
        for out in outs:
            os.close(out.fd)
