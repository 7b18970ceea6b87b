"""The budget decision alone: which idle models go, oldest first, or a 507 that releases nothing."""

from __future__ import annotations

import pytest

from deployments.errors import InsufficientMemoryError
from serve_app.memory_budget import MiB, plan_release


def status(state: str, need_mib: int, replicas: int = 1) -> dict:
    return {"status": state, "replicas": replicas, "memory_estimate": {"need_bytes": need_mib * MiB}}


STATUSES = {"new": status("unloaded", 300), "a": status("loaded", 200), "b": status("loaded", 200),
            "pinned": status("loaded", 400), "off": status("unloaded", 900)}


def test_fits_without_releasing() -> None:
    assert plan_release("new", "cpu", 1200 * MiB, STATUSES, ["a", "b"]) == []


def test_releases_least_recently_used_idle_models_until_it_fits() -> None:
    assert plan_release("new", "cpu", 1000 * MiB, STATUSES, ["b", "a"]) == [("b", 200 * MiB)]
    assert plan_release("new", "cpu", 800 * MiB, STATUSES, ["b", "a"]) == [("b", 200 * MiB), ("a", 200 * MiB)]


def test_refuses_with_the_numbers_when_releasing_every_idle_model_is_not_enough() -> None:
    with pytest.raises(InsufficientMemoryError) as info:
        plan_release("new", "cpu", 650 * MiB, STATUSES, ["a", "b"])
    assert info.value.status_code == 507 and info.value.code == "memory_budget_exceeded"
    assert "300 MiB" in info.value.message and "650 MiB" in info.value.message and "pinned" in info.value.message


def test_replicas_multiply_and_a_loaded_target_needs_nothing() -> None:
    statuses = STATUSES | {"new": status("unloaded", 300, replicas=2)}
    assert plan_release("new", "cpu", 1200 * MiB, statuses, ["a", "b"]) == [("a", 200 * MiB)]
    assert plan_release("a", "cpu", 1 * MiB, STATUSES, []) == []
