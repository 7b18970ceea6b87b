"""The router's end of a connection handoff (the replica's end, and why: deployments.handoff).

A streamed OpenAI response whose request runs on a replica of this host (its chunks come through a channel
socket) hands its HTTP connection to that replica once its head and first event are written, nothing of it is
in flight, and uvicorn has nothing of it left to write: the descriptor goes through the channel socket with the
event template's two ends. From then on the router writes nothing for the request until the replica gives the
connection back (`Handback`, through the channel, ahead of the request's last chunk); to write an error itself
(a deadline passed) it reclaims the connection first and waits for that, or closes it. `LLM_SERVE_HANDOFF=0`
turns handoffs off.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, MutableMapping
from typing import Any

from deployments.channel_socket import frame
from deployments.protocol import Handback

ENABLED = os.environ.get("LLM_SERVE_HANDOFF", "1") != "0"
RECLAIM_TIMEOUT_S = 2.0  # no handback by then (the replica is stuck or gone): the connection is closed instead
SendHandoff = Callable[[int, int, str, str], bool]  # (tokens seen, descriptor, head, tail) -> sent


def find_cycle(send: Any, depth: int = 0) -> Any:
    """uvicorn's request-response cycle behind an ASGI `send` (its bound method, maybe inside the closures of
    wrappers such as Ray Serve's); None if there is none: no handoff then."""
    owner = getattr(send, "__self__", None)
    if owner is not None and hasattr(owner, "transport") and hasattr(owner, "chunked_encoding"):
        return owner
    if depth < 4:
        for cell in getattr(send, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(value) and (found := find_cycle(value, depth + 1)) is not None:
                return found
    return None


class Handoff:
    """One streamed response's connection handoff: tried once, after its first event."""

    def __init__(self, scope: MutableMapping[str, Any], head: str, tail: str, send: SendHandoff, reclaim: Callable[[], bool]) -> None:
        self.scope, self.head, self.tail, self._send, self._reclaim = scope, head, tail, send, reclaim
        self.tokens = 0  # of the chunks this response has written
        self.state = "ready"  # -> "tried" (not sent), "sent" (the replica may hold it), "back"
        self.back = asyncio.Event()
        self.cycle: Any = None  # uvicorn's cycle of this response, found when the handoff is tried

    def attempt(self) -> None:
        """Hand the connection over if every byte so far is out of uvicorn's hands (HTTP/1.1 chunked)."""
        if self.state != "ready":
            return
        self.state = "tried"
        cycle = self.cycle = find_cycle(self.scope.get("llm.send"))  # looked for once, by a streamed response only
        transport = getattr(cycle, "transport", None)
        if transport is None or getattr(cycle, "chunked_encoding", None) is not True or getattr(cycle, "disconnected", True):
            return
        if transport.is_closing() or transport.get_write_buffer_size() != 0:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and self._send(self.tokens, sock.fileno(), self.head, self.tail):
            self.state = "sent"

    def handed_back(self, handback: Handback) -> None:
        """From the channel reader: the replica gave the connection back; the rest of its event goes out first."""
        cycle = self.cycle
        if handback.raw and cycle is not None and not cycle.transport.is_closing():
            cycle.transport.write(handback.raw)
        if (counts := self.scope.get("llm.counts")) is not None:  # the access log's bytes out
            counts["out"] += handback.body_bytes
        self.state = "back"
        self.back.set()

    async def reclaim(self) -> bool:
        """Before the router writes for this request itself: True once the connection is its own again;
        False when the replica did not give it back in time (the connection is closed then)."""
        if self.state != "sent":
            return True
        if not self._reclaim():  # the channel has ended, and the replica's descriptor with it
            return True
        try:
            await asyncio.wait_for(self.back.wait(), RECLAIM_TIMEOUT_S)
            return True
        except TimeoutError:
            pass
        if self.cycle is not None:
            self.cycle.transport.close()
        return False


class ControlSocket:
    """The router's messages to a replica on their channel socket (deployments.channel_socket.read_control),
    through a descriptor of its own: asyncio's streams cannot attach one (SCM_RIGHTS)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        self.sock.settimeout(1.0)  # a few bytes into a local socket: waits only if the replica stopped reading

    def send(self, message: tuple[Any, ...], fd: int | None = None, stuck_is_sent: bool = False) -> bool:
        """False if the message could not go (the socket is closed: the channel has ended); a replica that
        stopped reading for a second counts as sent with `stuck_is_sent` (whoever waits for its answer gives up)."""
        data = frame(message)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except TimeoutError:
            return stuck_is_sent
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
