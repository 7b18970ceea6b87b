"""A `ModelClient` for one member of a pool (a multiplexed deployment, deployments/pool.py).

Generation goes through the pool's handle with the member's id as Ray Serve's multiplexed model
id, so Ray routes it to a replica already holding the member where there is one. `/load` warms the
member on one replica the same way. What each replica holds is reported by the replicas to the
application's `ControlPlane` actor (every 0.5 s and after each change); `/unload` asks every
replica, through it, to evict the member, and waits until none reports holding it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.errors import APIError, ServiceUnavailableError
from serve_app.config import ModelSettings
from serve_app.errors import unwrap_error
from serve_app.ray_client import POLL_S, HandleModelClient, call_control


REPORTS_TTL_S = 0.2
_REPORTS: dict[str, tuple[float, "asyncio.Future[dict[str, dict[str, Any]]]"]] = {}


def pool_deployment_name(pool_id: str) -> str:
    return f"pool-{pool_id}"


class PoolMemberClient(HandleModelClient):
    """One model id of a pool: a full model or a LoRA adapter (`member.base` set)."""

    def __init__(self, member: ModelSettings, handle: DeploymentHandle, app_name: str, timeout_s: float, control: Any, capacity: int = 0) -> None:
        super().__init__(member.id, handle.options(multiplexed_model_id=member.id), app_name, timeout_s, control, capacity)
        self.member = member
        self.pool_id = member.pool or ""

    async def _reports(self) -> dict[str, dict[str, Any]]:
        """The pool's replica reports; members asking at once (GET /models) share one actor call."""
        now = time.monotonic()
        cached = _REPORTS.get(self.pool_id)
        if cached is None or now - cached[0] > REPORTS_TTL_S:
            cached = _REPORTS[self.pool_id] = (now, asyncio.ensure_future(call_control(self.control.pool_state.remote(self.pool_id))))
        return await asyncio.shield(cached[1])  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        reports = await self._reports()
        held_by = sorted(r for r, report in reports.items() if self.model_id in report.get("resident", {}))
        errors = [report["errors"][self.model_id] for report in reports.values() if self.model_id in report.get("errors", {})]
        state = "loaded" if held_by else ("failed" if errors else "unloaded")
        status: dict[str, Any] = {}
        for report in reports.values():  # a full model: its engine's facts from a replica holding it
            if self.model_id in report.get("servers", {}):
                status = dict(report["servers"][self.model_id])
                break
        status |= {
            "id": self.model_id, "status": state, "error": errors[0] if errors and not held_by else None,
            "replicas": len(held_by), "pool": self.pool_id, "base": self.member.base, "held_by": held_by,
            "kind": "adapter" if self.member.base else "model",
        }
        if self.member.base:  # an adapter's weights are copied into slots its base preallocated
            status["memory_estimate"] = {"need_bytes": _adapter_bytes(self.member.source)}
        return status

    async def num_replicas(self) -> int:
        return int((await self.status())["replicas"])

    async def load(self) -> dict[str, Any]:
        try:
            await self.handle.warm.remote()
        except Exception as exc:  # a member that cannot load is a `failed` state, as a model's is
            error = unwrap_error(exc)
            if not isinstance(error, APIError) or error.code != "model_load_failed":
                raise (error or exc) from None
        return await self.status()

    async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        await call_control(self.control.pool_evict.remote(self.pool_id, self.model_id))
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            status = await self.status()
            if status["status"] != "loaded":
                return status
            await asyncio.sleep(POLL_S)
        raise ServiceUnavailableError(f"model {self.model_id!r}: pool replicas did not evict it in {self.timeout_s:.0f} s", code="timeout")


def _adapter_bytes(path: str) -> int:
    try:
        return os.path.getsize(os.path.join(os.path.expanduser(path), "adapter_model.safetensors"))
    except OSError:
        return 0
