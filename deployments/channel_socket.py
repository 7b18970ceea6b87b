"""A channel's Unix socket on one host (deployments.channel): the replica's listener, the frames (a length,
then a pickle), and the direct writes of the engine's threads into an open channel's socket.
No Ray or FastAPI import.
"""

from __future__ import annotations

import array
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
MAX_FDS = 64  # descriptors taken per read of the caller's messages (one per handoff)


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


async def read_control(writer: asyncio.StreamWriter, channel: Channel) -> None:
    """The caller's messages on its channel socket, until it closes it: ("handoff", request id, tokens seen,
    head, tail) with a client connection's descriptor attached (SCM_RIGHTS), and ("reclaim", request id)
    (deployments.handoff). Read from a descriptor of our own: asyncio's streams drop ancillary data."""
    transport: Any = writer.transport  # uvloop's are no asyncio.ReadTransport subclasses
    transport.pause_reading()  # everything the caller sends is read here
    sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()
    buffer, fds = bytearray(), array.array("i")

    def readable() -> None:
        try:
            data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            if not ended.done():
                ended.set_result(None)
            return
        buffer.extend(data)
        try:
            while len(buffer) >= FRAME.size and len(buffer) >= FRAME.size + (size := FRAME.unpack_from(buffer)[0]):
                message = pickle.loads(bytes(buffer[FRAME.size:FRAME.size + size]))  # our own router's, see read_frame
                del buffer[:FRAME.size + size]
                if message[0] == "handoff" and fds:
                    channel.handoffs.accept(message[1], message[2], fds.pop(0), message[3], message[4])
                elif message[0] == "reclaim":
                    channel.end_handoff(message[1], always=True)
        except Exception:  # noqa: BLE001 - not our router's protocol: the channel ends (its requests see why)
            if not ended.done():
                ended.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ended
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
        for fd in fds:
            os.close(fd)


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
            closed = asyncio.ensure_future(read_control(writer, opened))  # handoffs; ends when the caller goes
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
