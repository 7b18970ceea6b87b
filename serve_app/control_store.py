"""The lifecycle state that must outlive a router replica: per model, its keep-alive clock, whether
it is believed loaded, and why it was released.

A router replica holds a working copy and writes every change through to a `RecordStore` (`RecordWriter`:
a request's clock at most once a second per model, everything else at once). With
Ray the store is one named actor per application (serve_app.control_plane.ActorRecordStore), so a
restarted router, or a second router replica, finds the same clocks; without Ray (tests, one
process) it is `LocalRecordStore`. Requests in flight and pending transitions stay per replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Protocol


@dataclass
class ModelRecord:
    """One model's shared lifecycle state (picklable; crosses the Ray boundary as is)."""

    keep_alive_s: float | None = None  # None: forever
    last_used: float = 0.0
    expires_at: float | None = None
    maybe_loaded: bool = False
    releases: dict[str, int] = field(default_factory=dict)

    def touch(self, now: float) -> None:
        """A use at `now`: the keep-alive clock starts again."""
        self.last_used = now
        self.expires_at = None if self.keep_alive_s is None else now + self.keep_alive_s

    def copy(self) -> "ModelRecord":
        return dataclasses.replace(self, releases=dict(self.releases))


def fresh_records(members: Iterable[Any]) -> dict[str, ModelRecord]:
    """A new record per configured model (`id`, `keep_alive_s`, `load_on_start`), its clock started now."""
    now, records = time.time(), {}
    for m in members:
        records[m.id] = ModelRecord(keep_alive_s=m.keep_alive_s, maybe_loaded=m.load_on_start)
        records[m.id].touch(now)
    return records


class ControlStore:
    """Records by model id. Plain Python: the Ray actor in serve_app.control_plane subclasses it."""

    def __init__(self) -> None:
        self.records: dict[str, ModelRecord] = {}
        self.pool_reports: dict[str, dict[str, dict[str, Any]]] = {}  # pool -> replica -> its last report
        self.pool_evictions: dict[str, dict[str, int]] = {}  # pool -> member -> eviction epoch

    # --- pools: what each replica holds, and evictions every replica applies -------------------
    def pool_sync(self, pool_id: str, replica: str, report: dict[str, Any]) -> dict[str, int]:
        """A pool replica's report of what it holds (stamped now); returns the eviction epochs."""
        self.pool_reports.setdefault(pool_id, {})[replica] = report | {"at": time.time()}
        return dict(self.pool_evictions.get(pool_id, {}))

    def pool_evict(self, pool_id: str, model_id: str) -> int:
        """Ask every replica of the pool to evict `model_id`; the new epoch."""
        epochs = self.pool_evictions.setdefault(pool_id, {})
        epochs[model_id] = epochs.get(model_id, 0) + 1
        return epochs[model_id]

    def pool_state(self, pool_id: str, max_age_s: float = 5.0) -> dict[str, dict[str, Any]]:
        """The fresh reports by replica (a replica silent for `max_age_s` is gone)."""
        now = time.time()
        reports = self.pool_reports.get(pool_id, {})
        for replica in [r for r, report in reports.items() if now - report["at"] > max_age_s]:
            del reports[replica]
        return dict(reports)

    def restore(self, defaults: dict[str, ModelRecord]) -> dict[str, ModelRecord]:
        """The stored records; a model seen for the first time starts from its default."""
        for model_id, record in defaults.items():
            self.records.setdefault(model_id, record)
        return {model_id: self.records[model_id] for model_id in defaults}

    def save(self, model_id: str, record: ModelRecord) -> None:
        """Store a router's change. `last_used` never goes back: two routers may touch one model,
        and the later use decides when its keep-alive runs out."""
        old = self.records.get(model_id)
        if old is not None and old.last_used > record.last_used and old.keep_alive_s == record.keep_alive_s:
            record = dataclasses.replace(record, last_used=old.last_used, expires_at=old.expires_at)
        self.records[model_id] = record


class RecordStore(Protocol):
    """Where a router replica reads and writes the shared records."""

    async def restore(self, defaults: dict[str, ModelRecord]) -> dict[str, ModelRecord]: ...

    def save(self, model_id: str, record: ModelRecord) -> None:
        """Write through, without waiting: saves from one router arrive in order."""
        ...


class LocalRecordStore:
    """A `RecordStore` in this process; several managers sharing one stand in for router replicas."""

    def __init__(self, store: ControlStore | None = None) -> None:
        self.store = store or ControlStore()

    async def restore(self, defaults: dict[str, ModelRecord]) -> dict[str, ModelRecord]:
        return {k: v.copy() for k, v in self.store.restore(defaults).items()}

    def save(self, model_id: str, record: ModelRecord) -> None:
        self.store.save(model_id, record.copy())


class RecordWriter:
    """Writes records through to a `RecordStore`: at once, or with `soon` at most every `every_s` per model
    (a write through an actor costs the router ~1 ms of CPU; a request ending writes its model's clock), the
    deferred write taking the latest record and always landing; `flush()` writes the deferred ones now."""

    def __init__(self, store: RecordStore, every_s: float) -> None:
        self.store, self.every_s = store, every_s
        self._saved_at: dict[str, float] = {}  # monotonic time of each model's last write
        self._later: dict[str, tuple[asyncio.TimerHandle, ModelRecord]] = {}

    def save(self, model_id: str, record: ModelRecord, soon: bool = False) -> None:
        wait = self._saved_at.get(model_id, float("-inf")) + self.every_s - time.monotonic()
        if soon and wait > 0:
            handle = self._later[model_id][0] if model_id in self._later else asyncio.get_running_loop().call_later(wait, self._write_later, model_id)
            self._later[model_id] = (handle, record)
            return
        if model_id in self._later:
            self._later.pop(model_id)[0].cancel()
        self._saved_at[model_id] = time.monotonic()
        self.store.save(model_id, record)

    def _write_later(self, model_id: str) -> None:
        self.save(model_id, self._later[model_id][1])

    def flush(self) -> None:
        for model_id in list(self._later):
            self._write_later(model_id)
