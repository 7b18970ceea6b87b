"""The control plane's pure parts: shared records, per-model transition order, Retry-After."""

from __future__ import annotations

import asyncio
import pickle

from deployments.errors import ModelLoadingError, OverloadedError, ServiceUnavailableError
from serve_app.control_store import ControlStore, LocalRecordStore, ModelRecord
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
    for i in range(11):
        rate.record(100.0 + i * 0.5)  # 2 requests per second
    assert rate.seconds_for(10, now=105.0) == 5
    assert rate.seconds_for(40, now=105.0) == 20
    assert rate.seconds_for(10_000, now=105.0) == 120  # capped
    assert rate.seconds_for(10, now=1000.0) == 5  # the window moved on: unknown again


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
