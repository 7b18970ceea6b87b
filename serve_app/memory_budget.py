"""Which idle models to release so that a load fits its device's memory budget (`plan_release`, a
pure decision), and the releases themselves, one model at a time (`make_room`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from deployments.errors import InsufficientMemoryError

MiB = 1 << 20
logger = logging.getLogger(__name__)
Plan = list[tuple[str, int]]


def footprint(status: Mapping[str, Any]) -> int:
    """Bytes a model holds (or will): its replica's need (measured footprint, else the estimate, plus
    the KV-cache reservation) times its replicas."""
    estimate = status.get("memory_estimate") or {}
    return int(estimate.get("need_bytes", 0)) * max(1, int(status.get("replicas") or 1))


def plan_release(
    model_id: str, device: str, budget: int, statuses: Mapping[str, Mapping[str, Any]], idle_by_age: list[str]
) -> list[tuple[str, int]]:
    """The models to release (with the bytes each holds), oldest first from `idle_by_age` (the idle
    unpinned ones, least recently used first), so that `model_id` fits `budget`. Raises 507 naming
    the numbers when even releasing all of them would not do; then nothing is to be released."""
    target = statuses[model_id]
    if target.get("status") == "loaded":
        return []
    need = footprint(target)
    holders = {mid: footprint(s) for mid, s in statuses.items()
               if mid != model_id and s.get("status") in ("loaded", "loading", "unloading")}
    free = budget - sum(holders.values())
    idle = [mid for mid in idle_by_age if mid in holders]
    chosen: list[str] = []
    for mid in idle:
        if free >= need:
            break
        chosen.append(mid)
        free += holders[mid]
    if free < need:
        kept = sorted(set(holders) - set(idle))
        raise InsufficientMemoryError(
            f"loading {model_id!r} needs about {need / MiB:.0f} MiB of {device} memory; the budget is "
            f"{budget / MiB:.0f} MiB with {sum(holders.values()) / MiB:.0f} MiB held, and releasing every idle "
            f"unpinned model ({', '.join(idle) or 'none'}) would leave only {free / MiB:.0f} MiB free "
            f"(pinned or busy: {', '.join(kept) or 'none'})",
            param="model",
            code="memory_budget_exceeded",
        )
    return [(mid, holders[mid]) for mid in chosen]


async def make_room(
    model_id: str, plan: Callable[[str], Awaitable[Plan]], is_busy: Callable[[str], bool],
    release: Callable[[str], Awaitable[Any]], max_rounds: int,
) -> None:
    """Before a load of `model_id`: release the first model `plan` chooses, plan again, and so on
    until nothing is left to release. A chosen model that became busy is skipped (queueing behind a
    load of it that waits for the caller's budget lock would deadlock), and the plan is made again.
    Raises 507 when `max_rounds` went by and the load still does not fit (its targets stayed busy,
    or a release freed nothing: another router replica loaded it again), rather than loading over
    the budget."""
    for _ in range(max_rounds):
        chosen = await plan(model_id)
        if not chosen:
            return
        mid, held = chosen[0]
        if is_busy(mid):
            continue
        logger.info("releasing %s (%.0f MiB) to make room for %s", mid, held / MiB, model_id)
        await release(mid)
    left = await plan(model_id)
    if left:
        raise InsufficientMemoryError(
            f"loading {model_id!r} does not fit its memory budget: {max_rounds} rounds of releases left "
            f"{', '.join(mid for mid, _ in left)} still holding {sum(held for _, held in left) / MiB:.0f} MiB "
            "(busy, or loaded again); retry",
            param="model",
            code="memory_budget_exceeded",
        )
