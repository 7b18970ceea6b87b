"""The control plane's pure parts: the one config writer, shared records, per-model transition order,
making room under the memory budget, Retry-After."""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from ray.serve.schema import ServeApplicationSchema

from deployments.errors import InsufficientMemoryError, ModelLoadingError, OverloadedError, ServiceUnavailableError
from serve_app.control_plane import ControlPlane, change_user_config
from serve_app.control_store import ControlStore, LocalRecordStore, ModelRecord
from serve_app.memory_budget import MiB, make_room
from serve_app.ray_client import ServiceRate
from serve_app.transitions import TransitionQueue


def test_a_restored_record_wins_over_the_default_and_last_use_never_goes_back() -> None:
    store = ControlStore()
    first = ModelRecord(keep_alive_s=60.0)
    first.touch(1000.0)
    assert store.restore({"m": first})["m"].expires_at == 1060.0
    assert store.restore({"m": ModelRecord(keep_alive_s=5.0)})["m"].keep_alive_s == 60.0  # a restarted router
    stale = ModelRecord(keep_alive_s=60.0, releases={"idle": 1})
    stale.touch(900.0)  # another router's older touch arrives late
    store.save("m", stale)
    assert store.records["m"].last_used == 1000.0 and store.records["m"].expires_at == 1060.0
    assert store.records["m"].releases == {"idle": 1}
    assert pickle.loads(pickle.dumps(store.records["m"])) == store.records["m"]


async def test_two_managers_sharing_a_store_see_one_record() -> None:
    shared = LocalRecordStore()
    mine = await shared.restore({"m": ModelRecord(keep_alive_s=10.0)})
    mine["m"].keep_alive_s = 3600.0
    mine["m"].touch(5.0)
    shared.save("m", mine["m"])
    theirs = await shared.restore({"m": ModelRecord(keep_alive_s=10.0)})
    assert theirs["m"].keep_alive_s == 3600.0 and theirs["m"].expires_at == 3605.0
    assert theirs["m"] is not mine["m"]  # copies, as across processes


async def test_transitions_run_in_call_order_and_equal_pending_calls_join() -> None:
    queue, log = TransitionQueue(), []

    def work(name: str):  # type: ignore[no-untyped-def]
        async def run() -> dict[str, str]:
            log.append(f"start {name}")
            await asyncio.sleep(0.01)
            log.append(f"end {name}")
            return {"status": name}
        return run

    results = await asyncio.gather(
        queue.run("unload", work("unload-1")), queue.run("load", work("load-1")), queue.run("load", work("load-2"))
    )
    assert log == ["start unload-1", "end unload-1", "start load-1", "end load-1"]  # load-2 joined load-1
    assert [r["status"] for r in results] == ["unload-1", "load-1", "load-1"] and not queue.busy


def test_retry_after_follows_the_measured_service_rate() -> None:
    rate = ServiceRate()
    assert rate.seconds_for(10, now=0.0) == 5  # nothing measured yet: the fallback
    for i in range(11):  # one at a time, 0.5 s each: 2 requests per second
        rate.started(100.0 + i * 0.5)
        rate.ended(100.0 + (i + 1) * 0.5, completed=True)
    assert rate.seconds_for(10, now=106.0) == 5
    assert rate.seconds_for(40, now=106.0) == 20
    assert rate.seconds_for(10_000, now=106.0) == 120  # capped
    assert rate.seconds_for(10, now=1000.0) == 5  # the window moved on: unknown again


def test_idle_time_between_bursts_does_not_dilute_the_rate() -> None:
    rate = ServiceRate()
    for start in (100.0, 150.0):  # two bursts 50 s apart, each 5 requests at once done in 1 s
        for _ in range(5):
            rate.started(start)
        for _ in range(5):
            rate.ended(start + 1.0, completed=True)
    rate.started(151.0)
    rate.ended(151.0, completed=False)  # refused or failed: no completion, no busy time
    assert rate.num_in_flight == 0
    # 10 completions within 2 s of serving: 9 intervals over 1 s between the bursts' ends.
    assert rate.per_second(now=151.0) == 9.0
    assert rate.seconds_for(9, now=151.0) == 1  # over the wall clock it would be 9 / 50 per second: 50 s


def test_typed_errors_keep_their_class_and_code_across_pickling() -> None:
    for error, code in ((OverloadedError("full"), "overloaded"), (ModelLoadingError("loading"), "model_loading")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and isinstance(copy, ServiceUnavailableError)
        assert copy.code == code and copy.headers["Retry-After"]


def test_pool_reports_age_out_and_evictions_count_up() -> None:
    store = ControlStore()
    assert store.pool_sync("p", "r1", {"resident": {"a": 1.0}}) == {}
    store.pool_sync("p", "r2", {"resident": {}})
    assert store.pool_evict("p", "a") == 1 and store.pool_evict("p", "a") == 2
    assert store.pool_sync("p", "r1", {"resident": {}}) == {"a": 2}  # every replica learns the epoch
    store.pool_reports["p"]["r2"]["at"] -= 10  # r2 went silent (killed): it no longer counts
    assert set(store.pool_state("p")) == {"r1"}


class InterleavingConfigs:
    """Stands in for Ray Serve's controller (`AppConfigs`): a read returns a copy, and the write after
    it first waits (up to `wait_s`) until another writer has read or written since, the worst interleaving."""

    def __init__(self, deployments: list[str], wait_s: float = 0.3) -> None:
        app = ServeApplicationSchema(name="app", import_path="serve_app.app:build", deployments=[{"name": d} for d in deployments])
        self.configs, self.wait_s = {"app": app}, wait_s
        self.num_reads, self.num_writes = 0, 0
        self._read_at: dict[int, tuple[int, int]] = {}  # by thread: (reads, writes) at its last read
        self._changed = threading.Condition()

    def read(self) -> dict[str, ServeApplicationSchema]:
        with self._changed:
            self.num_reads += 1
            self._read_at[threading.get_ident()] = (self.num_reads, self.num_writes)
            self._changed.notify_all()
            return {name: config.model_copy(deep=True) for name, config in self.configs.items()}

    def write(self, configs: dict[str, ServeApplicationSchema]) -> None:
        with self._changed:
            reads, writes = self._read_at[threading.get_ident()]
            self._changed.wait_for(lambda: (self.num_reads, self.num_writes) > (reads, writes), timeout=self.wait_s)
            self.configs, self.num_writes = configs, self.num_writes + 1
            self._changed.notify_all()

    def user_configs(self) -> dict[str, Any]:
        """Each deployment's `user_config` that was set."""
        return {d.name: d.user_config for d in self.configs["app"].deployments if isinstance(d.user_config, dict)}


def at_once(*calls: Callable[[], bool]) -> list[bool]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_the_control_plane_lands_concurrent_changes_of_two_models() -> None:
    """An /unload of one model and a /load of another at the same moment: both land."""
    configs = InterleavingConfigs(["model-a", "model-b"])
    plane = ControlPlane(configs=configs)  # the actor's class itself, without Ray
    unload_a, load_b = {"loaded": False, "epoch": 1}, {"loaded": True, "epoch": 2}
    assert at_once(lambda: plane.set_user_config("app", "model-a", unload_a),
                   lambda: plane.set_user_config("app", "model-b", load_b)) == [True, True]
    assert configs.user_configs() == {"model-a": unload_a, "model-b": load_b} and configs.num_writes == 2
    assert not plane.set_user_config("other-app", "model-a", unload_a)  # deployed with serve.run: no config


def test_the_unguarded_read_change_write_loses_one_of_two_changes() -> None:
    """The same two changes through the read-change-write without its one writer: one is lost (what
    the test above guards against, so that it can fail)."""
    configs = InterleavingConfigs(["model-a", "model-b"], wait_s=5.0)
    assert at_once(lambda: change_user_config(configs, "app", "model-a", {"loaded": False}),
                   lambda: change_user_config(configs, "app", "model-b", {"loaded": True})) == [True, True]
    landed = configs.user_configs()
    assert configs.num_writes == 2 and len(landed) == 1, landed


@pytest.mark.parametrize("busy", [True, False])
async def test_making_room_refuses_with_507_when_its_rounds_run_out_over_budget(busy: bool) -> None:
    """Every round's target busy (skipped), or released without freeing anything: after the last
    round the load is refused, never let through over the budget."""
    plans, released = [], []

    async def plan(model_id: str) -> list[tuple[str, int]]:
        plans.append(model_id)
        return [("a", 200 * MiB)]

    async def release(model_id: str) -> None:
        released.append(model_id)

    with pytest.raises(InsufficientMemoryError) as info:
        await make_room("new", plan, lambda _: busy, release, max_rounds=4)
    assert info.value.status_code == 507 and info.value.code == "memory_budget_exceeded" and "a" in info.value.message
    assert len(plans) == 5 and released == ([] if busy else ["a"] * 4)


async def test_making_room_releases_one_model_a_round_until_the_plan_is_empty() -> None:
    plans = iter([[("a", 1), ("b", 1)], [("b", 1)], []])
    released: list[str] = []

    async def release(model_id: str) -> None:
        released.append(model_id)

    async def plan(model_id: str) -> list[tuple[str, int]]:
        return next(plans)

    await make_room("new", plan, lambda _: False, release, max_rounds=4)
    assert released == ["a", "b"]
