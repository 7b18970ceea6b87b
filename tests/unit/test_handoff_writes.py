"""A client connection handed over to a replica (deployments.handoff): its outputs' events go into the
connection as HTTP/1.1 chunks, byte for byte what the router would have written; a handoff is taken only
when the router has seen every token sent through the channel; a write that would block gives the
connection back with the rest of its event; the end of the request closes the replica's descriptor."""

from __future__ import annotations

import os
import socket

from deployments.handoff import Handoffs, event_body, http_chunk
from deployments.protocol import Chunk, Handback
from serve_app.streaming import EventTemplate

TEMPLATE = EventTemplate({"id": "cmpl-1", "choices": [{"index": 0, "text": EventTemplate.OPEN, "finish_reason": None}]})


def chunked(event: str) -> bytes:
    """What uvicorn writes for one body part of a chunked response."""
    body = event.encode()
    return b"%x\r\n" % len(body) + body + b"\r\n"


def connection() -> tuple[socket.socket, socket.socket, int]:
    """(client end, server end, a descriptor of the server end as handed over)."""
    client, server = socket.socketpair()
    server.setblocking(False)
    return client, server, os.dup(server.fileno())


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_outputs_go_into_the_connection_as_the_router_would_write_them() -> None:
    client, server, fd = connection()
    handoffs = Handoffs()
    handoffs.track("r")
    assert handoffs.item("r", Chunk("Hi", [1])) == ("r", Chunk("Hi", [1]))  # before the handoff: the channel's
    assert handoffs.accept("r", 1, fd, TEMPLATE.head, TEMPLATE.tail)
    texts = [" there", "", "\u2028é\"\n"]  # a line break SSE clients split on, a quote, nothing (no event)
    assert [handoffs.item("r", Chunk(t, [i])) for i, t in enumerate(texts)] == [None, None, None]
    expected = b"".join(chunked(TEMPLATE.render(t)) for t in texts if t)
    assert client.recv(65536) == expected
    assert http_chunk(event_body(TEMPLATE.head, "x", TEMPLATE.tail)) == chunked(TEMPLATE.render("x"))
    bodies = sum(len(TEMPLATE.render(t).encode()) for t in texts if t)  # what the access log counts: bodies, not framing
    assert handoffs.end("r") == Handback(b"", bodies) and not is_open(fd)
    assert handoffs.end("r") is None  # once
    client.close(); server.close()


def test_a_handoff_with_tokens_in_flight_is_refused() -> None:
    client, server, fd = connection()
    handoffs = Handoffs()
    handoffs.track("r")
    handoffs.item("r", Chunk("a", [1, 2]))
    assert not handoffs.accept("r", 1, fd, TEMPLATE.head, TEMPLATE.tail)  # the router has seen 1 of 2 tokens
    assert not is_open(fd)
    assert handoffs.item("r", Chunk("b", [3])) == ("r", Chunk("b", [3]))
    _, _, fd2 = connection()
    assert not handoffs.accept("other", 0, fd2, TEMPLATE.head, TEMPLATE.tail)  # not a request of this channel
    handoffs.track("late")
    handoffs.close_all()  # the channel ended: a handoff still on its way is refused
    _, _, fd3 = connection()
    assert not handoffs.accept("late", 0, fd3, TEMPLATE.head, TEMPLATE.tail) and not is_open(fd3)
    client.close(); server.close()


def test_a_write_that_would_block_gives_the_connection_back_with_the_rest_of_its_event() -> None:
    client, server, fd = connection()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    handoffs = Handoffs()
    handoffs.track("r")
    assert handoffs.accept("r", 0, fd, TEMPLATE.head, TEMPLATE.tail)
    text = "y" * 3000
    results = [handoffs.item("r", Chunk(text, [i])) for i in range(40)]  # the client reads nothing meanwhile
    back = [i for i, r in enumerate(results) if r is not None]
    assert back, "the socket never filled"
    first = back[0]
    assert all(r is None for r in results[:first])
    request_id, handback = results[first]
    assert request_id == "r" and isinstance(handback, Handback) and not is_open(fd)
    # the outputs after it take the channel again
    assert all(r is not None and isinstance(r[1], Chunk) for r in results[first + 1:])
    client.setblocking(False)
    received = b""
    while True:
        try:
            received += client.recv(1 << 20)
        except BlockingIOError:
            break
    expected = b"".join(chunked(TEMPLATE.render(text)) for _ in range(first + 1))
    assert received + handback.raw == expected  # the rest of the event, not one byte lost or repeated
    assert handback.body_bytes == (first + 1) * len(TEMPLATE.render(text).encode())  # the unfinished event counted whole
    client.close(); server.close()
