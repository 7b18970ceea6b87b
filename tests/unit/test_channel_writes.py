"""A socket channel's writes from an engine thread (deployments.channel.Channel.push_from_thread): each
step's frame goes straight into the socket when nothing is ahead of it; when the socket is full the rest
of it, and the frames after it, leave from the serving loop, and the caller reads every frame whole and
in order."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import time

from deployments.channel import Channel
from deployments.channel_socket import FRAME
from deployments.protocol import Chunk

STEPS = 400


async def read_frames(reader: asyncio.StreamReader, slow: bool) -> list[list[tuple[str, Chunk]]]:
    frames = []
    while True:
        try:
            (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
        except asyncio.IncompleteReadError:
            return frames
        frames.append(pickle.loads(await reader.readexactly(size)))
        if slow and len(frames) % 40 == 0:
            await asyncio.sleep(0.02)  # a caller that falls behind: the socket fills


def run_steps(channel: Channel, text: str, pause_s: float) -> None:
    for step in range(STEPS):
        channel.push_from_thread([(f"req-{r}", Chunk(text, [step], None)) for r in range(3)])
        time.sleep(pause_s)  # an engine step


async def stream(slow: bool) -> tuple[Channel, list[list[tuple[str, Chunk]]]]:
    replica_end, caller_end = socket.socketpair()
    if slow:  # small buffers, soon full
        replica_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        caller_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _, writer = await asyncio.open_unix_connection(sock=replica_end)
    reader, caller_writer = await asyncio.open_unix_connection(sock=caller_end)
    channel = Channel(local=True)
    channel.num_running = 1
    sending = asyncio.ensure_future(channel.write_to(writer, idle_close_s=5.0))
    await asyncio.sleep(0)  # write_to has taken the socket
    frames = asyncio.ensure_future(read_frames(reader, slow))
    thread = threading.Thread(target=run_steps, args=(channel, "x" * 300, 0.0) if slow else (channel, "x", 0.001))
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.01)
    channel.push("req-0", Chunk("", [], "length"))  # the last output, from the serving loop, after the rest
    await asyncio.sleep(0.3)
    channel.close()
    await sending
    writer.close()
    received = await asyncio.wait_for(frames, 10)
    caller_writer.close()
    return channel, received


def steps_of(frames: list[list[tuple[str, Chunk]]]) -> list[tuple[str, int]]:
    return [(request_id, chunk.token_ids[0]) for frame in frames for request_id, chunk in frame if chunk.token_ids]


def test_engine_thread_frames_go_straight_into_the_socket() -> None:
    channel, frames = asyncio.run(stream(slow=False))
    expected = [(f"req-{r}", step) for step in range(STEPS) for r in range(3)]
    assert steps_of(frames) == expected
    assert frames[-1][-1][1].finish_reason == "length"
    assert channel.frames_sent_from_thread > STEPS // 2  # most steps never woke the loop


def test_a_full_socket_keeps_every_frame_whole_and_in_order() -> None:
    channel, frames = asyncio.run(stream(slow=True))
    expected = [(f"req-{r}", step) for step in range(STEPS) for r in range(3)]
    assert steps_of(frames) == expected  # whole, in order, none lost or repeated
    assert frames[-1][-1][1].finish_reason == "length"
    assert 0 < channel.frames_sent_from_thread < STEPS  # some went straight in, the rest waited for the loop
