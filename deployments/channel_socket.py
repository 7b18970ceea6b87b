"""A channel's Unix socket on one host (deployments.channel): the replica's listener, the frames (a length,
then a pickle), and the direct writes of the engine's threads into an open channel's socket.
No Ray or FastAPI import.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployments.errors import ChannelClosedError

if TYPE_CHECKING:
    from deployments.channel import Channel

SOCKET_IDLE_CLOSE_S = 60.0  # a socket channel holds no call open: it may idle longer
SOCKET_PREFIX = "llm-serve-channel-"  # its directory: this prefix, the replica's pid, a random part
FRAME = struct.Struct("<I")  # a frame: its length, then a pickle


def frame(item: Any) -> bytes:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME.pack(len(data)) + data


class SocketOut:
    """Direct writes into a channel's socket from an engine thread (its own descriptor of the socket,
    non-blocking as asyncio's); asyncio's transport writes whatever they could not."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.transport = writer.transport
        self.sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        self.sock.setblocking(False)
        self.rest = b""  # the unsent end of a frame: goes out first, from the loop

    def idle(self) -> bool:
        return not self.rest and self.transport.get_write_buffer_size() == 0 and not self.transport.is_closing()

    def send(self, data: bytes) -> bool:
        """True when all of `data` went in; else the rest waits in `rest`."""
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # the caller went away
            raise ChannelClosedError("the router's channel to this replica closed; retry") from exc
        self.rest = data[sent:]
        return not self.rest

    def take_rest(self) -> bytes:
        rest, self.rest = self.rest, b""
        return rest

    def close(self) -> None:
        self.sock.close()


def write_frame(writer: asyncio.StreamWriter, item: Any) -> None:
    writer.write(frame(item))


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; `asyncio.IncompleteReadError` once the other end closed."""
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    return pickle.loads(await reader.readexactly(size))  # from our own replica, through a socket only its user can reach


class ChannelListener:
    """This replica's Unix socket for channels from callers on this host, in a directory of its own
    that only this user can enter (the frames are pickles). A caller sends its channel id and gets
    this replica's name back, then the channel's batches, one frame each."""

    def __init__(self, open_channel: Callable[..., Channel], close_channel: Callable[[str, Channel], None], replica_name: str) -> None:
        self.open_channel, self.close_channel, self.replica_name = open_channel, close_channel, replica_name
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
            channel = opened = self.open_channel(channel_id, local=True)
            write_frame(writer, self.replica_name)
            await writer.drain()
            closed = asyncio.ensure_future(reader.read())  # the caller sends nothing more: this ends when it goes
            closed.add_done_callback(lambda _: opened.close())
            await opened.write_to(writer, SOCKET_IDLE_CLOSE_S)
        except (OSError, asyncio.IncompleteReadError, pickle.UnpicklingError, ChannelClosedError):
            pass  # the caller went away
        finally:
            if closed is not None:
                closed.cancel()
            if channel is not None:
                self.close_channel(channel_id, channel)
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
