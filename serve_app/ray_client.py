"""A `ModelClient` over a Ray Serve deployment (with serve_app.app, the only Ray-aware code).

Generation goes through the deployment handle. Load and unload must reach *every* replica, which a
handle call cannot (it picks one): they set the deployment's `user_config` in the application's
deployed config, and Ray Serve calls `reconfigure` on each replica, and on every replica it starts
later. An app deployed from Python (`serve.run`) has no deployed config; there they fall back to
one handle call (one replica), which is exact for the usual single replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from deployments.errors import ServiceUnavailableError
from serve_app.errors import unwrap_error

logger = logging.getLogger(__name__)
POLL_S = 0.2


def deployment_name(model_id: str) -> str:
    return f"model-{model_id}"


class HandleModelClient:
    """Forwards to a model deployment: generation by handle, load/unload by `user_config`."""

    def __init__(self, model_id: str, handle: DeploymentHandle, app_name: str, timeout_s: float = 900.0) -> None:
        self.model_id = model_id
        self.handle = handle
        self.app_name = app_name
        self.timeout_s = timeout_s

    async def status(self) -> dict[str, Any]:
        return await self._call("status") | {"replicas": await self.num_replicas()}

    async def load(self) -> dict[str, Any]:
        return await self._apply({"loaded": True})

    async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        if await self.num_replicas() == 0:  # scaled to zero: nothing holds memory; don't start one
            return {"id": self.model_id, "status": "unloaded", "replicas": 0}
        return await self._apply({"loaded": False, "force": force, "reason": reason})

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = None
        settled = False  # finished or failed: nothing left to cancel (cancel() would re-raise the failure)
        try:
            # .remote() itself raises BackPressureError when the model's queue is full.
            response = self.handle.options(stream=True).generate.remote(request)
            async for chunk in response:
                yield chunk
            settled = True
        except BackPressureError as exc:
            settled = True
            raise _overloaded(self.model_id, exc) from None
        except Exception as exc:
            settled = True
            raise (unwrap_error(exc) or exc) from None
        finally:
            if response is not None and not settled:
                response.cancel()  # the client left or failed: stop generating for it

    async def num_replicas(self) -> int:
        """Replicas Ray Serve reports RUNNING for this model's deployment."""
        return (await self._deployment())[1]

    async def _deployment(self) -> tuple[str, int]:
        """(deployment status, RUNNING replicas) from one `serve.status()` call."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        deployment = app.deployments.get(deployment_name(self.model_id)) if app else None
        if deployment is None:
            return "MISSING", 0
        running = sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")
        return str(getattr(deployment.status, "value", deployment.status)), int(running)

    # --- the wanted state, through user_config ------------------------------------------------
    async def _apply(self, wanted: dict[str, Any]) -> dict[str, Any]:
        client = _get_global_client()
        if client is None:
            raise ServiceUnavailableError("Ray Serve's controller is not reachable", code="controller_unavailable")
        controller = client._controller
        configs: dict[str, ServeApplicationSchema] = await controller.get_app_configs.remote()
        if self.app_name not in configs:  # deployed with serve.run: one handle call, one replica
            if wanted["loaded"]:
                return await self._call("load")
            return await self._call("unload", wanted["force"], wanted["reason"])
        epoch = time.time_ns()
        configs[self.app_name] = self._with_user_config(configs[self.app_name], wanted | {"epoch": epoch})
        await controller.apply_config.remote(ServeDeploySchema(applications=list(configs.values())))
        return await self._wait_applied(epoch)

    def _with_user_config(self, app: ServeApplicationSchema, user_config: dict[str, Any]) -> ServeApplicationSchema:
        name = deployment_name(self.model_id)
        data = app.model_dump(exclude_unset=True)
        deployments = [d for d in data.get("deployments", []) if d["name"] != name]
        current = next((d for d in data.get("deployments", []) if d["name"] == name), {"name": name})
        deployments.append(current | {"user_config": user_config})
        return ServeApplicationSchema.model_validate(data | {"deployments": deployments})

    async def _wait_applied(self, epoch: int) -> dict[str, Any]:
        """Until a replica reports this epoch and the deployment is HEALTHY again (Ray keeps it
        UPDATING until `reconfigure` returned on every replica)."""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            status = await self._call("status")
            deployment_status, replicas = await self._deployment()
            if int(status.get("epoch") or 0) >= epoch and deployment_status == "HEALTHY":
                return status | {"replicas": replicas}
            await asyncio.sleep(POLL_S)
        raise ServiceUnavailableError(f"model {self.model_id!r}: replicas did not apply the change in {self.timeout_s:.0f} s", code="timeout")

    async def _call(self, method: str, *args: Any) -> dict[str, Any]:
        try:
            return await getattr(self.handle, method).remote(*args)  # type: ignore[no-any-return]
        except BackPressureError as exc:
            raise _overloaded(self.model_id, exc) from None
        except Exception as exc:
            raise (unwrap_error(exc) or exc) from None


def _overloaded(model_id: str, exc: BackPressureError) -> ServiceUnavailableError:
    retry_after = getattr(exc, "retry_after_s", None) or 1
    return ServiceUnavailableError(
        f"model {model_id!r} is at capacity (its queue is full); retry after {retry_after:g}s",
        headers={"Retry-After": str(max(1, round(retry_after)))},
    )
