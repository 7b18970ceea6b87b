"""Channels: one stream per (router, replica) carrying the chunks of all that router's requests there.

Without them every token of every request is one message on its request's own stream (a gRPC message,
a pickle and a wakeup in each process per token). With ten streams that is ten messages per engine
step; through a channel it is one. The router opens a channel to a replica once one of its requests
ran there (`ModelServer.subscribe`); a request that names an open channel of its caller sends its
chunks through it when another of the caller's requests is running on the replica, and its own
stream carries only `Routed` first and, at the end, success or the error (so Ray Serve's admission,
cancellation and replica-death handling stay per request). The channel ends itself once none of the
caller's requests has run here for `IDLE_CLOSE_S`.

On one host a channel goes through a Unix socket instead (deployments.channel_socket): the replica listens in
a private directory and names the socket in its `Routed`; a caller that can reach it connects and
gets the same batches, one frame each, with no Ray call per message. A Ray message cost ~500 us of
CPU in each process here (gRPC's threads handing it to the event loop); a socket frame ~60 us to
send and ~100 to receive (perf/README.md, session 16). Such a channel is no ongoing Ray call, so it
also carries a request that runs alone. A caller on another host uses the Ray call.
No Ray or FastAPI import: the model server uses this in tests without Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator

from deployments.channel_socket import ChannelListener, SocketOut, frame
from deployments.errors import ChannelClosedError
from deployments.handoff import Handoffs
from deployments.protocol import ChannelBatch, Chunk, Handback

IDLE_CLOSE_S = 2.0  # short: an open channel is an ongoing call, which a replica's graceful shutdown waits for
logger = logging.getLogger(__name__)


class Channel:
    """One caller's open channel on this replica: chunks pushed by its requests, sent as one batch per
    wakeup of the serving loop, or, through a socket, written by the engine's lane thread as its step ends
    (`push_from_thread`: no wakeup of the serving loop per step)."""

    def __init__(self, local: bool = False) -> None:
        self._items: ChannelBatch = []
        self._ready = asyncio.Event()
        self.closed = False
        self.local = local  # through a socket on this host: a request alone uses it too
        self.num_running = 0  # requests of this caller running on this replica (through the channel or not)
        self._lock = threading.Lock()  # _items, _out and writes to the socket, from the loop and lane threads
        self._out: SocketOut | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop (opened on it)
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        self._wake_pending = False
        self.frames_sent_from_thread = 0  # steps' frames an engine thread wrote straight into the socket
        self.handoffs = Handoffs()  # client connections the caller handed over (deployments.handoff)

    def push(self, request_id: str, chunk: Chunk | Handback) -> None:
        """On the serving loop."""
        if self.closed:
            raise ChannelClosedError("the router's channel to this replica closed; retry")
        with self._lock:
            self._items.append((request_id, chunk))
        self._ready.set()

    def push_from_thread(self, items: ChannelBatch) -> None:
        """On an engine thread: one step's chunks, written to the socket at once when nothing is ahead of
        them (else queued for the serving loop, which keeps their order and merges them as for a slow caller).
        A None item is an output written into its handed-over connection instead (deployments.handoff)."""
        items = [item for item in items if item is not None]
        if not items:
            return
        with self._lock:
            if self.closed or self._loop is None:
                raise ChannelClosedError("the router's channel to this replica closed; retry")
            out = self._out
            if out is not None and not self._items and out.idle():
                if out.send(frame(items)):
                    self.frames_sent_from_thread += 1
                    return
            else:
                self._items.extend(items)
            if not self._wake_pending:  # the loop writes what waits (or the rest of a partial write)
                self._wake_pending = True
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def _wait(self, idle_close_s: float) -> bool:
        """Until something is to be sent; False once the channel is to end (closed, or idle for
        `idle_close_s` with none of the caller's requests running here: an open channel is an ongoing
        call, which Ray Serve's graceful shutdown of the replica would wait for)."""
        while True:
            try:
                async with asyncio.timeout(idle_close_s):
                    await self._ready.wait()
            except TimeoutError:
                if self.num_running == 0:
                    self.close()
                    return False
                continue
            self._ready.clear()
            return not self.closed

    async def batches(self, idle_close_s: float = IDLE_CLOSE_S) -> AsyncIterator[ChannelBatch]:
        """Everything pushed since the last batch; the requests of one engine step arrive together."""
        while await self._wait(idle_close_s):
            with self._lock:
                items, self._items = self._items, []
            if items:
                yield items

    async def write_to(self, writer: asyncio.StreamWriter, idle_close_s: float) -> None:
        """Send this channel through a socket until it ends: frames from the engine's threads go
        straight in, the rest from here, in order; a slow caller gets fewer, larger frames."""
        with self._lock:
            if self.closed:
                return
            out = self._out = SocketOut(writer)
        while await self._wait(idle_close_s):
            with self._lock:  # a lane thread sends only when nothing is ahead of its frame
                data = out.take_rest()
                if self._items:
                    data += frame(self._items)
                    self._items = []
                if data:
                    writer.write(data)
            await writer.drain()

    def end_handoff(self, request_id: str, always: bool = False) -> None:
        """On the serving loop: the request ended (or its caller reclaims its connection, `always`): its
        connection is closed here and the caller told, before anything else of the request, if it was
        handed over; with `always` the caller is told either way (it waits for the answer)."""
        handback = self.handoffs.end(request_id)
        if handback is not None or always:
            with contextlib.suppress(ChannelClosedError):  # the caller is gone: nobody to tell
                self.push(request_id, handback or Handback())

    def close(self) -> None:
        self.handoffs.close_all()
        with self._lock:
            self.closed = True
            if self._out is not None:  # its own descriptor: closed with the channel, or the caller never sees the end
                self._out.close()
                self._out = None
        self._ready.set()  # a waiting `batches` or `write_to` ends


class ChannelRegistry:
    """The open channels of one replica, by channel id, and its socket for callers on this host."""

    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}
        self.listener: ChannelListener | None = None  # started when a caller first names channels

    @property
    def path(self) -> str | None:
        """The socket callers on this host connect to (None: not listening)."""
        return self.listener.path if self.listener is not None else None

    async def listen(self, replica_name: str) -> None:
        """Start the socket, once (where there are no Unix sockets, channels stay Ray calls)."""
        if self.listener is not None:
            return
        self.listener = ChannelListener(self.open, self.close, replica_name)
        try:
            await self.listener.start()
        except (OSError, AttributeError, NotImplementedError) as exc:
            logger.info("no channel socket (%r); channels go through Ray", exc)

    def find(self, channel_ids: tuple[str, ...] | None) -> Channel | None:
        """The first of the caller's channels open here, if any. (A request alone uses it only when it
        is a socket: a Ray-call channel is no cheaper than the request's own stream, and one hop longer.)"""
        for channel_id in channel_ids or ():
            channel = self._channels.get(channel_id)
            if channel is not None and not channel.closed:
                return channel
        return None

    def open(self, channel_id: str, local: bool = False) -> Channel:
        old = self._channels.pop(channel_id, None)
        if old is not None:
            old.close()
        channel = self._channels[channel_id] = Channel(local)
        return channel

    def close(self, channel_id: str, channel: Channel) -> None:
        channel.close()
        if self._channels.get(channel_id) is channel:
            del self._channels[channel_id]

    def close_all(self) -> None:
        """Stop listening and end every open channel (their callers' readers see the end)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __len__(self) -> int:
        return len(self._channels)
