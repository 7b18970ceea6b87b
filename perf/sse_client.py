"""The load generator's HTTP client: streamed POSTs over kept-alive HTTP/1.1 connections, read by an asyncio
protocol that hands each Server-Sent Event's `data` to the caller as it arrives.

The client runs on the cores of the server it measures, so what it spends per event is taken from the
server. aiohttp read the stream one line at a time through its Python StreamReader (two lines per event);
this protocol parses the chunked body and the events in one pass per read: the bench process's CPU per
token at 10 SmolLM2 streams 63.5 -> 42.0 us (perf/README.md, session 27). It knows what our benchmarks need: Content-Length or
chunked bodies, keep-alive, `data:` lines. Nothing here is used by the service.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


class HTTPError(OSError):
    """The connection broke, or the server's answer is not HTTP/1.1 as we read it."""


class _Response(asyncio.Protocol):
    """One connection; reads one response at a time (`start` arms it)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._done: asyncio.Future[bytes] | None = None

    def start(self, on_data: Callable[[bytes], None] | None) -> asyncio.Future[bytes]:
        """Arm for the next response: `on_data(payload)` per SSE data field while it streams; the
        future gives (status, non-SSE body) at the end."""
        self._on_data, self._head, self._buf, self._body = on_data, True, bytearray(), bytearray()
        self._chunked, self._left, self._sse, self.status, self.keep_alive = False, -1, bytearray(), 0, True
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            if self._left < 0 and not self._chunked and not self._head:  # a body read until the close
                self._finish()
            else:
                self._done.set_exception(HTTPError(f"connection closed mid-response ({exc!r})"))

    def data_received(self, data: bytes) -> None:
        if self._done is None or self._done.done():
            return
        self._buf += data
        try:
            if self._head and not self._read_head():
                return
            self._read_body()
        except (ValueError, IndexError) as exc:
            self._done.set_exception(HTTPError(f"unreadable response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[:end + 4]
        self.status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                self._left = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                self._chunked = True
            elif name == b"connection" and value == b"close":
                self.keep_alive = False
        self._head = False
        return True

    def _read_body(self) -> None:
        buf = self._buf
        if not self._chunked:
            take = len(buf) if self._left < 0 else min(self._left, len(buf))
            self._feed(bytes(buf[:take]))
            del buf[:take]
            if self._left >= 0:
                self._left -= take
                if self._left == 0:
                    self._finish()
            return
        while True:
            if self._left < 0:  # at a chunk's size line
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                self._left = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[:eol + 2]
                if self._left == 0:  # the last chunk (no trailers from our servers)
                    self._finish()
                    return
            if len(buf) < self._left + 2:
                return
            self._feed(bytes(buf[:self._left]))
            del buf[:self._left + 2]
            self._left = -1

    def _feed(self, data: bytes) -> None:
        if self._on_data is None or self.status != 200:
            self._body += data
            return
        sse = self._sse
        sse += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        while (end := sse.find(b"\n\n")) >= 0:
            event = bytes(sse[:end])
            del sse[:end + 2]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    self._on_data(line[5:].strip())

    def _finish(self) -> None:
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(bytes(self._body))
        if not self.keep_alive and self.transport is not None:
            self.transport.close()


class SSEClient:
    """Streamed POSTs to one server, at most `max_connections` at once, connections kept alive between them."""

    def __init__(self, max_connections: int) -> None:
        self._free: dict[tuple[str, int], list[_Response]] = {}
        self._slots = asyncio.Semaphore(max_connections)

    async def __aenter__(self) -> SSEClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conns in self._free.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._free.clear()

    async def post(self, url: str, body: Any, on_data: Callable[[bytes], None] | None = None) -> tuple[int, bytes]:
        """POST `body` as JSON; `on_data(payload)` for each SSE data field of a 200 answer as it comes.
        Returns (status, body): the body of a non-SSE or non-200 answer, else b""."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        payload = json.dumps(body).encode()
        head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
        async with self._slots:
            for reused in (True, False):
                conn = await self._connection(host, port, reused)
                done = conn.start(on_data)
                assert conn.transport is not None
                conn.transport.write(head + payload)
                try:
                    data = await done
                except HTTPError:
                    if reused and conn.status == 0:  # a kept-alive connection the server had closed: once more
                        continue
                    raise
                except BaseException:
                    if conn.transport is not None:
                        conn.transport.close()  # mid-response: the connection cannot be reused
                    raise
                if conn.keep_alive and not conn.closed:
                    self._free.setdefault((host, port), []).append(conn)
                return conn.status, data
            raise AssertionError("unreachable")

    async def _connection(self, host: str, port: int, reuse: bool) -> _Response:
        free = self._free.get((host, port), [])
        while reuse and free:
            conn = free.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(_Response, host, port)
        return conn
