"""Load and unload of one model run one at a time, in call order.

The last call decides the final state; a call equal to the latest pending one joins it instead of
repeating it. Every transition of a model, whoever asks (a user, the idle loop, the memory budget),
goes through its queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Status = dict[str, Any]


class TransitionQueue:
    """Serialises one model's transitions."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._pending: tuple[str, asyncio.Task[Status]] | None = None
        self._tasks: set[asyncio.Task[Status]] = set()  # running or waiting for the lock

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending[1].done()

    def pending(self, action: str) -> asyncio.Task[Status] | None:
        """The running or queued transition if it is the latest one and does `action`."""
        if self._pending is not None and self._pending[0] == action and not self._pending[1].done():
            return self._pending[1]
        return None

    async def run(self, action: str, work: Callable[[], Awaitable[Status]]) -> Status:
        joined = self.pending(action)
        if joined is not None:
            return await asyncio.shield(joined)
        task = asyncio.ensure_future(self._locked(work))
        self._pending = (action, task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def start(self, action: str, work: Callable[[], Awaitable[Status]]) -> asyncio.Task[Status]:
        """`run` as a task of its own (to wait on while streaming progress)."""
        return asyncio.ensure_future(self.run(action, work))

    def cancel(self) -> list[asyncio.Task[Status]]:
        """Cancel every transition running or waiting (callers are shielded from cancellation, so
        only this stops one: at shutdown); the tasks, to await."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    async def _locked(self, work: Callable[[], Awaitable[Status]]) -> Status:
        async with self._lock:
            return await work()
