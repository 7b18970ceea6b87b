"""The application's control plane: one named Ray actor per application (`ControlPlane`), the one
writer of the app's deployed config (load/unload set a deployment's `user_config`), and the keeper
of the lifecycle records (serve_app.control_store) where a restarted or second router replica finds
them. Changes of different models, from any router replica, are applied one after the other, each
on the config the previous one wrote.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Protocol

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from deployments.errors import ServiceUnavailableError
from serve_app.control_store import ControlStore, ModelRecord


class AppConfigs(Protocol):
    """Where the applications' deployed configs are read and written (Ray Serve's controller)."""

    def read(self) -> dict[str, ServeApplicationSchema]: ...

    def write(self, configs: dict[str, ServeApplicationSchema]) -> None: ...


class ServeControllerConfigs:
    """The deployed configs of Ray Serve's controller (`serve deploy`'s, not `serve.run`'s)."""

    def _controller(self) -> Any:
        client = _get_global_client()
        if client is None:
            raise ServiceUnavailableError("Ray Serve's controller is not reachable", code="controller_unavailable")
        return client._controller

    def read(self) -> dict[str, ServeApplicationSchema]:
        return ray.get(self._controller().get_app_configs.remote())  # type: ignore[no-any-return]

    def write(self, configs: dict[str, ServeApplicationSchema]) -> None:
        ray.get(self._controller().apply_config.remote(ServeDeploySchema(applications=list(configs.values()))))


_WRITE_LOCK = threading.Lock()  # one read-change-write at a time in this process


def write_user_config(app_name: str, deployment: str, user_config: dict[str, Any], configs: AppConfigs | None = None) -> bool:
    """Set one deployment's `user_config` in the application's deployed config. False if the app has
    no deployed config (it was deployed with `serve.run`). One writer: writes in this process take
    turns (a lock), and across processes `ControlPlane` is the one process that writes."""
    with _WRITE_LOCK:
        return change_user_config(configs or ServeControllerConfigs(), app_name, deployment, user_config)


def change_user_config(configs: AppConfigs, app_name: str, deployment: str, user_config: dict[str, Any]) -> bool:
    """The read, change and write itself, unguarded: two at once lose one (`write_user_config` guards it)."""
    current = configs.read()
    if app_name not in current:
        return False
    data = current[app_name].model_dump(exclude_unset=True)
    deployments = [d for d in data.get("deployments", []) if d["name"] != deployment]
    mine = next((d for d in data.get("deployments", []) if d["name"] == deployment), {"name": deployment})
    deployments.append(mine | {"user_config": user_config})
    current[app_name] = ServeApplicationSchema.model_validate(data | {"deployments": deployments})
    configs.write(current)
    return True


class ControlPlane(ControlStore):
    """A named actor per application (methods run one at a time): the one writer of the app's
    config, and the lifecycle records that outlive any router replica. It ends itself once its
    application has been deleted (`serve delete`, `serve shutdown`), so nothing is left behind."""

    def __init__(self, app_name: str = "", check_every_s: float = 5.0, configs: AppConfigs | None = None) -> None:
        super().__init__()
        self.configs = configs or ServeControllerConfigs()
        if app_name:
            threading.Thread(target=self._end_with_app, args=(app_name, check_every_s), daemon=True).start()

    @staticmethod
    def _end_with_app(app_name: str, check_every_s: float) -> None:
        missing = 0
        while missing < 2:  # twice in a row: a redeploy may briefly list no app
            time.sleep(check_every_s)
            try:  # the deployments' ids, not serve.status(): 1 ms of CPU per check against 10 (perf/README.md, session 28)
                ids = ray.get(ServeControllerConfigs()._controller().list_deployment_ids.remote())
                missing = 0 if any(d.app_name == app_name for d in ids) else missing + 1
            except Exception:  # noqa: BLE001 - Serve itself is gone
                missing += 1
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def set_user_config(self, app_name: str, deployment: str, user_config: dict[str, Any]) -> bool:
        return write_user_config(app_name, deployment, user_config, self.configs)

    # Pool reports in their own concurrency group (one thread): a config write that waits seconds on
    # Serve's controller must not hold up GET /models or the replicas' half-second reports.
    @ray.method(concurrency_group="pool")
    def pool_sync(self, pool_id: str, replica: str, report: dict[str, Any]) -> dict[str, int]:
        return super().pool_sync(pool_id, replica, report)

    @ray.method(concurrency_group="pool")
    def pool_evict(self, pool_id: str, model_id: str) -> int:
        return super().pool_evict(pool_id, model_id)

    @ray.method(concurrency_group="pool")
    def pool_state(self, pool_id: str, max_age_s: float = 5.0) -> dict[str, dict[str, Any]]:
        return super().pool_state(pool_id, max_age_s)


async def call_control(ref: Any) -> Any:
    """Await a `ControlPlane` call without ever cancelling it: a caller that gives up (a status
    timeout, a client gone) must not cancel the actor task, or the actor waits (30 s) for the
    skipped sequence number before it runs this caller's next call. An unreachable actor is a 503."""
    try:
        return await asyncio.shield(asyncio.ensure_future(ref))
    except (RayActorError, ActorUnavailableError):
        raise ServiceUnavailableError("the control plane actor is restarting; retry", code="control_plane_unavailable") from None


def control_plane(app_name: str) -> Any:
    """The application's `ControlPlane` actor, created by the first router replica that asks.
    Detached, so it outlives a router replica; it ends with the Ray cluster."""
    actor = ray.remote(concurrency_groups={"pool": 1})(ControlPlane).options(
        name=f"llm-serve-control-plane:{app_name}", namespace="serve", lifetime="detached",
        get_if_exists=True, num_cpus=0, max_restarts=-1,
    )
    return actor.remote(app_name)


class ActorRecordStore:
    """A `RecordStore` (serve_app.control_store) in the `ControlPlane` actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def restore(self, defaults: dict[str, ModelRecord]) -> dict[str, ModelRecord]:
        return await call_control(self.actor.restore.remote(defaults))  # type: ignore[no-any-return]

    def save(self, model_id: str, record: ModelRecord) -> None:
        self.actor.save.remote(model_id, record.copy())  # calls from one caller run in order
