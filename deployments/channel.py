"""Channels: one stream per (router, replica) carrying the chunks of all that router's requests there.

Without them every token of every request is one message on its request's own stream (a gRPC message,
a pickle and a wakeup in each process per token). With ten streams that is ten messages per engine
step; through a channel it is one. The router opens a channel to a replica once one of its requests
ran there (`ModelServer.subscribe`); a request that names an open channel of its caller sends its
chunks through it when another of the caller's requests is running on the replica, and its own
stream carries only `Routed` first and, at the end, success or the error (so Ray Serve's admission,
cancellation and replica-death handling stay per request). The channel ends itself once none of the
caller's requests has run here for `IDLE_CLOSE_S`.

On one host a channel goes through a Unix socket instead (`ChannelListener`): the replica listens in
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
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from deployments.errors import ChannelClosedError
from deployments.protocol import ChannelBatch, Chunk

IDLE_CLOSE_S = 2.0  # short: an open channel is an ongoing call, which a replica's graceful shutdown waits for
SOCKET_IDLE_CLOSE_S = 60.0  # a socket channel holds no call open: it may idle longer
SOCKET_PREFIX = "llm-serve-channel-"  # its directory: this prefix, the replica's pid, a random part
FRAME = struct.Struct("<I")  # a frame: its length, then a pickle
logger = logging.getLogger(__name__)


class Channel:
    """One caller's open channel on this replica: chunks pushed by its requests, sent as one batch per wakeup."""

    def __init__(self, local: bool = False) -> None:
        self._items: ChannelBatch = []
        self._ready = asyncio.Event()
        self.closed = False
        self.local = local  # through a socket on this host: a request alone uses it too
        self.num_running = 0  # requests of this caller running on this replica (through the channel or not)

    def push(self, request_id: str, chunk: Chunk) -> None:
        if self.closed:
            raise ChannelClosedError("the router's channel to this replica closed; retry")
        self._items.append((request_id, chunk))
        self._ready.set()

    async def batches(self, idle_close_s: float = IDLE_CLOSE_S) -> AsyncIterator[ChannelBatch]:
        """Everything pushed since the last batch; the requests of one engine step arrive together.
        Ends once none of the caller's requests has run here for `idle_close_s`: an open channel is
        an ongoing call, which Ray Serve's graceful shutdown of the replica would wait for."""
        while True:
            try:
                async with asyncio.timeout(idle_close_s):
                    await self._ready.wait()
            except TimeoutError:
                if self.num_running == 0:
                    self.close()
                    return
                continue
            if self.closed:
                return
            self._ready.clear()
            items, self._items = self._items, []
            yield items

    def close(self) -> None:
        self.closed = True
        self._ready.set()  # a waiting `batches` ends


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
        self.listener = ChannelListener(self, replica_name)
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


def write_frame(writer: asyncio.StreamWriter, item: Any) -> None:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(FRAME.pack(len(data)) + data)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; `asyncio.IncompleteReadError` once the other end closed."""
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    return pickle.loads(await reader.readexactly(size))  # from our own replica, through a socket only its user can reach


class ChannelListener:
    """This replica's Unix socket for channels from callers on this host, in a directory of its own
    that only this user can enter (the frames are pickles). A caller sends its channel id and gets
    this replica's name back, then the channel's batches, one frame each."""

    def __init__(self, registry: ChannelRegistry, replica_name: str) -> None:
        self.registry, self.replica_name = registry, replica_name
        self.path: str | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        _remove_stale_directories()
        directory = tempfile.mkdtemp(prefix=f"{SOCKET_PREFIX}{os.getpid()}-")  # mode 0700
        self._server = await asyncio.start_unix_server(self._serve, os.path.join(directory, "channel.sock"))
        self.path = os.path.join(directory, "channel.sock")
        return self.path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel_id, channel, closed = "", None, None
        try:
            channel_id = str(await read_frame(reader))
            channel = opened = self.registry.open(channel_id, local=True)
            write_frame(writer, self.replica_name)
            closed = asyncio.ensure_future(reader.read())  # the caller sends nothing more: this ends when it goes
            closed.add_done_callback(lambda _: opened.close())
            async for batch in opened.batches(SOCKET_IDLE_CLOSE_S):
                write_frame(writer, batch)
                await writer.drain()  # a slow caller: the next batch holds more
        except (OSError, asyncio.IncompleteReadError, pickle.UnpicklingError):
            pass  # the caller went away
        finally:
            if closed is not None:
                closed.cancel()
            if channel is not None:
                self.registry.close(channel_id, channel)
            writer.close()

    def close(self) -> None:
        """Remove the socket's directory and stop listening (also from a finalizer, its loop maybe gone)."""
        if self.path is not None:
            shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
            self.path = None
        if self._server is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is closed: its sockets go with the process
                self._server.close()
            self._server = None


def _remove_stale_directories() -> None:
    """Socket directories left by replicas that were killed (their pid no longer runs)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(tempfile.gettempdir()):
            pid = name[len(SOCKET_PREFIX):].split("-")[0] if name.startswith(SOCKET_PREFIX) else ""
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
