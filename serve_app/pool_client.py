"""A `ModelClient` for one member of a pool (a multiplexed deployment, deployments/pool.py).

Generation goes through the pool's handle with the member's id as Ray Serve's multiplexed model
id, so Ray routes it to a replica already holding the member where there is one. `/load` warms the
member on one replica the same way. What each replica holds is reported by the replicas to the
application's `ControlPlane` actor (every 0.5 s and after each change); `/unload` asks every
replica, through it, to evict the member, and waits until none reports holding it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.errors import APIError, ServiceUnavailableError
from serve_app.clients import member_status
from serve_app.config import ModelSettings
from serve_app.control_plane import call_control
from serve_app.errors import unwrap_error
from serve_app.ray_client import POLL_S, HandleModelClient


REPORTS_TTL_S = 0.2
_REPORTS: dict[str, tuple[float, "asyncio.Future[dict[str, dict[str, Any]]]"]] = {}


def pool_deployment_name(pool_id: str) -> str:
    return f"pool-{pool_id}"


class PoolMemberClient(HandleModelClient):
    """One model id of a pool: a full model or a LoRA adapter (`member.base` set)."""

    def __init__(self, member: ModelSettings, handle: DeploymentHandle, app_name: str, timeout_s: float, control: Any, capacity: int = 0) -> None:
        # Channels through the replicas' sockets only: a pool's calls are multiplexed by member, so a
        # Ray-call channel could not name its replica.
        super().__init__(member.id, handle.options(multiplexed_model_id=member.id), app_name, timeout_s, control, capacity,
                         use_channels=True, socket_channels_only=True)
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
        status = member_status(self.model_id, self.pool_id, self.member.base, self.member.source, await self._reports())
        if self.channels is not None:
            status["channels"] = self.channels.stats()  # this router's, to the replicas' engines
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
        # the replica reported before answering; a report fetched before that (another member's status
        # within REPORTS_TTL_S) would say `unloaded` for a member just loaded, or just failed
        _REPORTS.pop(self.pool_id, None)
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

