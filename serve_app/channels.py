"""The router's end of the channels (deployments.channel): one stream per model replica carrying the
chunks of all this router's requests running there, one message per engine step instead of one per
request per step.

A channel is opened to a replica once one of our requests ran there: through the replica's Unix
socket when it runs on this host (its `Routed` names the socket), else as a streaming Ray call. The
replica ends it when none of ours has run there for a while (deployments.channel), so an idle model
holds no call open. Through a socket a request's chunks always take the channel; through a Ray call
only while another of ours runs there (alone, the request's own stream is one hop shorter). A
request sends the ids of the open channels; the replica that takes it answers `Routed`, saying whether
its chunks come through one of them. `ChannelRouter` is the model deployments' Ray Serve request
router: it sends a channel's call to the replica it names and routes every other call as Ray Serve's
default router does.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any

from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import PendingRequest, RunningReplica
# Serve's default router; Ray 2.60 exports the mixins and base class publicly but not this one.
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

from deployments.channel_socket import read_frame, write_frame
from deployments.errors import ChannelClosedError
from deployments.protocol import ChannelBatch, Chunk, Handback, Routed, merge_chunks
from serve_app.handoff import ControlSocket

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "channel:"  # a channel call's multiplexed model id: this prefix and the replica's id
OPEN_TIMEOUT_S = 5.0  # a channel not open by then is given up (and not retried for RETRY_AFTER_S)
RETRY_AFTER_S = 10.0
CHANNEL_ERROR_GRACE_S = 2.0  # a closed channel waits this long for its request's own stream to say why
Item = Chunk | BaseException


class Direct:
    """A request's way around its inbox: while its response waits for the next chunk, `deliver(chunk)`
    sends that chunk's events itself, on the channel reader's turn (serve_app.streaming). It returns
    False when it did not take the chunk (the inbox gets it). The last chunk always takes the inbox."""

    __slots__ = ("deliver", "handoff", "reclaim", "handback")

    def __init__(self) -> None:
        self.deliver: Callable[[Chunk], bool] | None = None
        # the request's connection handoff (serve_app.handoff): set by its channels, and by its response
        self.handoff: Callable[[int, int, str, str], bool] | None = None
        self.reclaim: Callable[[], bool] | None = None
        self.handback: Callable[[Handback], None] | None = None


DIRECT: ContextVar[Direct | None] = ContextVar("direct_delivery", default=None)
"""The current request's `Direct`, set by its route before the request is generated (channels registered)."""


class ChannelRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's power-of-two-choices routing, except that a channel call goes to the replica it names."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if model_id.startswith(CHANNEL_PREFIX):
            target = model_id[len(CHANNEL_PREFIX):]
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            return [chosen] if chosen else []
        return await super().choose_replicas(candidate_replicas, pending_request)


class ChannelSet:
    """This router's channels to one model's replicas, and the inboxes of its requests that use them."""

    def __init__(self, handle: DeploymentHandle, socket_only: bool = False) -> None:
        self.handle = handle
        self.socket_only = socket_only  # a pool's members: no Ray-call channels (their calls are multiplexed)
        self.prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self.inbox: dict[str, asyncio.Queue[Item]] = {}
        self.via: dict[str, str] = {}  # request id -> the replica whose channel carries it
        self.direct: dict[str, Direct] = {}  # request id -> its response's way around the inbox
        self.open: dict[str, str] = {}  # replica -> channel id, for channels that are open
        self.readers: dict[str, asyncio.Task[None]] = {}  # replica -> its channel's reader (opening or open)
        self.refused_until: dict[str, float] = {}
        self.num_batches = 0  # messages received through channels (tests and benchmarks read it)
        self.num_direct = 0  # chunks their responses got straight from the reader (not through the inbox)
        self.control: dict[str, ControlSocket] = {}  # replica -> our messages to it on its channel socket
        self.num_handoffs = 0  # connections handed to replicas (serve_app.handoff)

    def channel_ids(self) -> tuple[str, ...]:
        return tuple(self.open.values())

    def stats(self) -> dict[str, int]:
        """For the router's view of the model (GET /models)."""
        return {"open": len(self.open), "batches": self.num_batches, "running_via_channels": len(self.via),
                "direct_chunks": self.num_direct, "handoffs": self.num_handoffs}

    def register(self, request_id: str = "") -> tuple[str, asyncio.Queue[Item]]:
        """The request's id (one of ours if it has none, or if a running request has it) and its inbox."""
        if not request_id or request_id in self.inbox:
            request_id = f"{self.prefix}-{next(self._ids)}"
        inbox: asyncio.Queue[Item] = asyncio.Queue()
        self.inbox[request_id] = inbox
        if (direct := DIRECT.get()) is not None:
            self.direct[request_id] = direct
            direct.handoff = functools.partial(self._handoff, request_id)
            direct.reclaim = functools.partial(self._reclaim, request_id)
        return request_id, inbox

    def _handoff(self, request_id: str, tokens: int, fd: int, head: str, tail: str) -> bool:
        """Send the request's client connection to the replica running it (through its channel socket only)."""
        control = self.control.get(self.via.get(request_id, ""))
        if control is None or not control.send(("handoff", request_id, tokens, head, tail), fd):
            return False
        self.num_handoffs += 1
        return True

    def _reclaim(self, request_id: str) -> bool:
        """Ask for the connection back; False when the channel has ended (the replica holds nothing of it)."""
        control = self.control.get(self.via.get(request_id, ""))
        return control is not None and control.send(("reclaim", request_id), stuck_is_sent=True)

    def release(self, request_id: str) -> None:
        self.inbox.pop(request_id, None)
        self.via.pop(request_id, None)
        self.direct.pop(request_id, None)

    def routed(self, request_id: str, routed: Routed) -> None:
        """A replica took one of our requests: note where its chunks come from; open a channel to
        that replica if none is open or opening (through its socket when this host can reach it)."""
        if routed.via_channel:
            self.via[request_id] = routed.replica
            return
        replica = routed.replica
        if replica in self.readers or self.refused_until.get(replica, 0.0) > time.monotonic():
            return
        self.readers[replica] = asyncio.ensure_future(self._read(replica, routed.channel_path))

    async def _read(self, replica: str, path: str | None) -> None:
        channel_id = f"{self.prefix}-{replica}-{next(self._ids)}"
        try:
            batches = None
            if path is not None and os.path.exists(path):  # the replica runs on this host
                batches = await self._open_socket(replica, channel_id, path)
            if batches is None:
                if self.socket_only:  # not on this host: the requests' own streams carry their chunks
                    self.refused_until[replica] = time.monotonic() + RETRY_AFTER_S
                    return
                batches = await self._open_call(replica, channel_id)
            self.open[replica] = channel_id
            async with aclosing(batches):
                async for batch in batches:
                    self.num_batches += 1
                    for request_id, chunk in batch:
                        inbox = self.inbox.get(request_id)
                        if inbox is None:
                            continue
                        if isinstance(chunk, Handback):  # its connection is ours again: before any chunk after it
                            if (direct := self.direct.get(request_id)) is not None and direct.handback is not None:
                                direct.handback(chunk)
                            continue
                        # its response waits for it and nothing is ahead of it: sent from here, no task woken
                        direct = self.direct.get(request_id)
                        if (direct is not None and (deliver := direct.deliver) is not None and chunk.finish_reason is None
                                and inbox.empty() and deliver(chunk)):
                            self.num_direct += 1
                            continue
                        inbox.put_nowait(chunk)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - a refused or broken channel: its requests get the error
            logger.info("channel to replica %s ended: %r", replica, exc)
            self.refused_until[replica] = time.monotonic() + RETRY_AFTER_S
        finally:
            self.open.pop(replica, None)
            self.readers.pop(replica, None)
            for request_id, where in list(self.via.items()):
                if where == replica and request_id in self.inbox:
                    if (direct := self.direct.get(request_id)) is not None and direct.handback is not None:
                        direct.handback(Handback())  # a connection handed over is ours again: the replica's end is gone
                    self.inbox[request_id].put_nowait(ChannelClosedError("the channel to the model's replica closed; retry"))

    async def _open_socket(self, replica: str, channel_id: str, path: str) -> AsyncGenerator[ChannelBatch, None] | None:
        """The channel through the replica's socket (deployments.channel.ChannelListener); None if it
        cannot be reached (then it is a Ray call)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), OPEN_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            logger.info("channel socket of replica %s not reachable (%r): through Ray", replica, exc)
            return None
        try:
            write_frame(writer, channel_id)
            answer = await asyncio.wait_for(read_frame(reader), OPEN_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise
        if answer != replica:
            writer.close()
            raise ChannelClosedError(f"channel socket answered {answer!r}")
        self.control[replica] = control = ControlSocket(writer)

        async def batches() -> AsyncGenerator[ChannelBatch, None]:
            try:
                while True:
                    try:
                        yield await read_frame(reader)
                    except asyncio.IncompleteReadError:  # the replica closed it (idle) or died
                        return
            finally:
                if self.control.get(replica) is control:
                    del self.control[replica]
                control.close()
                writer.close()

        return batches()

    async def _open_call(self, replica: str, channel_id: str) -> AsyncGenerator[ChannelBatch, None]:
        """The channel as a streaming Ray call to the replica (`ModelServer.subscribe`)."""
        options: dict[str, Any] = {"stream": True, "multiplexed_model_id": CHANNEL_PREFIX + replica}
        stream = self.handle.options(**options).subscribe.remote(channel_id, replica)
        try:
            first = await asyncio.wait_for(stream.__anext__(), OPEN_TIMEOUT_S)
        except BaseException:
            stream.cancel()
            raise
        if not (isinstance(first, Routed) and first.replica == replica):
            stream.cancel()
            raise ChannelClosedError(f"channel answered {first!r}")

        async def batches() -> AsyncGenerator[ChannelBatch, None]:
            try:
                async for batch in stream:
                    yield batch
            finally:
                stream.cancel()

        return batches()


async def from_inbox(inbox: asyncio.Queue[Chunk | BaseException], response: Any) -> AsyncGenerator[Chunk, None]:
    """A request's chunks from its channel inbox, merged when several wait; the request's own stream
    is watched meanwhile and its error (the replica died, the request failed) is raised here."""

    async def watch() -> None:
        try:
            async for _ in response:  # nothing but the end (or an error) comes here
                pass
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            if not isinstance(exc, asyncio.CancelledError):
                inbox.put_nowait(exc)

    watcher = asyncio.ensure_future(watch())
    try:
        while True:
            item = await inbox.get()
            while isinstance(item, Chunk) and item.finish_reason is None and not inbox.empty():
                nxt = inbox.get_nowait()
                if isinstance(nxt, BaseException):
                    yield item
                    item = nxt
                    break
                item = merge_chunks(item, nxt)
            if isinstance(item, ChannelClosedError):  # the replica may have died: prefer its own stream's error
                await asyncio.wait({watcher}, timeout=CHANNEL_ERROR_GRACE_S)
                item = _other_error(inbox) or item
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        watcher.cancel()


def _other_error(inbox: asyncio.Queue[Chunk | BaseException]) -> BaseException | None:
    """The first error waiting in the inbox other than a closed channel's."""
    while not inbox.empty():
        item = inbox.get_nowait()
        if isinstance(item, BaseException) and not isinstance(item, ChannelClosedError):
            return item
    return None
