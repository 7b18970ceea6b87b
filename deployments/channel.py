"""Channels: one stream per (router, replica) carrying the chunks of all that router's requests there.

Without them every token of every request is one message on its request's own stream (a gRPC message,
a pickle and a wakeup in each process per token). With ten streams that is ten messages per engine
step; through a channel it is one. The router opens a channel to a replica once one of its requests
ran there (`ModelServer.subscribe`); a request that names an open channel of its caller sends its
chunks through it when another of the caller's requests is running on the replica, and its own
stream carries only `Routed` first and, at the end, success or the error (so Ray Serve's admission,
cancellation and replica-death handling stay per request). The channel ends itself once none of the
caller's requests has run here for `IDLE_CLOSE_S`.
No Ray or FastAPI import: the model server uses this in tests without Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from deployments.errors import ChannelClosedError
from deployments.protocol import ChannelBatch, Chunk

IDLE_CLOSE_S = 2.0  # short: an open channel is an ongoing call, which a replica's graceful shutdown waits for


class Channel:
    """One caller's open channel on this replica: chunks pushed by its requests, sent as one batch per wakeup."""

    def __init__(self) -> None:
        self._items: ChannelBatch = []
        self._ready = asyncio.Event()
        self.closed = False
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
            self._ready.clear()
            items, self._items = self._items, []
            yield items

    def close(self) -> None:
        self.closed = True


class ChannelRegistry:
    """The open channels of one replica, by channel id."""

    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}

    def find(self, channel_ids: tuple[str, ...] | None) -> Channel | None:
        """The first of the caller's channels open here, if any. (A request uses it only when another
        of the caller's requests is running here: alone, its own stream is as cheap and one hop shorter.)"""
        for channel_id in channel_ids or ():
            channel = self._channels.get(channel_id)
            if channel is not None and not channel.closed:
                return channel
        return None

    def open(self, channel_id: str) -> Channel:
        old = self._channels.pop(channel_id, None)
        if old is not None:
            old.close()
        channel = self._channels[channel_id] = Channel()
        return channel

    def close(self, channel_id: str, channel: Channel) -> None:
        channel.close()
        if self._channels.get(channel_id) is channel:
            del self._channels[channel_id]

    def __len__(self) -> int:
        return len(self._channels)
