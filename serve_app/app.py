"""The one place that knows Ray Serve: one deployment per configured model, plus the router ingress.

`config/serve.yaml` points its `import_path` at `build_app`, which receives the app `args`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.errors import ServiceUnavailableError
from deployments.memory import replica_allocator_env
from deployments.server import ModelServer
from serve_app.api import create_api
from serve_app.clients import ModelRegistry
from serve_app.config import AppSettings, ModelSettings, parse_app_settings
from serve_app.errors import unwrap_error
from serve_app.loopback import keep_serve_grpc_on_loopback

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def deployment_name(model_id: str) -> str:
    return f"model-{model_id}"


class HandleModelClient:
    """A `ModelClient` that forwards to a model deployment through its Ray Serve handle."""

    def __init__(self, model_id: str, handle: DeploymentHandle, app_name: str) -> None:
        self.model_id = model_id
        self.handle = handle
        self.app_name = app_name

    async def status(self) -> dict[str, Any]:
        return await self._call("status") | {"replicas": await self._num_replicas()}

    async def load(self) -> dict[str, Any]:
        return await self._call("load") | {"replicas": await self._num_replicas()}

    async def unload(self) -> dict[str, Any]:
        return await self._call("unload") | {"replicas": await self._num_replicas()}

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

    async def _call(self, method: str) -> dict[str, Any]:
        try:
            return await getattr(self.handle, method).remote()  # type: ignore[no-any-return]
        except BackPressureError as exc:
            raise _overloaded(self.model_id, exc) from None
        except Exception as exc:
            raise (unwrap_error(exc) or exc) from None

    async def _num_replicas(self) -> int:
        """Replicas Ray Serve reports RUNNING for this model's deployment."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        deployment = app.deployments.get(deployment_name(self.model_id)) if app else None
        if deployment is None:
            return 0
        return int(sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING"))


def _overloaded(model_id: str, exc: BackPressureError) -> ServiceUnavailableError:
    retry_after = getattr(exc, "retry_after_s", None) or 1
    return ServiceUnavailableError(
        f"model {model_id!r} is at capacity (its queue is full); retry after {retry_after:g}s",
        headers={"Retry-After": str(max(1, round(retry_after)))},
    )


class Router:
    """The ingress: builds the FastAPI app over handle-backed model clients at replica start."""

    def __init__(self, models: dict[str, DeploymentHandle], settings: dict[str, Any]) -> None:
        keep_serve_grpc_on_loopback()  # before Serve starts this replica's gRPC server
        self.settings: AppSettings = parse_app_settings(settings)
        app_name = serve.get_replica_context().app_name
        self.registry = ModelRegistry({mid: HandleModelClient(mid, h, app_name) for mid, h in models.items()})

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.registry, self.settings)


RouterDeployment = serve.deployment(
    name="router",
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
)(serve.ingress()(Router))


class ModelReplica(ModelServer):
    """`ModelServer` as a Serve replica: the same class, plus the loopback shim at construction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        keep_serve_grpc_on_loopback()  # before Serve starts this replica's gRPC server
        super().__init__(*args, **kwargs)


def model_deployment(model: ModelSettings) -> Any:
    """`serve.deployment(ModelReplica)` with this model's resources, limits and scaling."""
    options: dict[str, Any] = {
        "name": deployment_name(model.id),
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        "ray_actor_options": {
            "num_cpus": model.num_cpus,
            "num_gpus": model.num_gpus,
            # jemalloc for Python's small objects, or RSS creeps up over load/unload cycles (deployments/memory.py)
            "runtime_env": {"env_vars": {**OFFLINE_ENV, **replica_allocator_env()}},
        },
        "graceful_shutdown_timeout_s": 30,
    }
    if model.autoscaling is not None:
        options["autoscaling_config"] = model.autoscaling.model_dump()
    else:
        options["num_replicas"] = model.num_replicas
    return serve.deployment(ModelReplica).options(**options)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: validates the args, then binds models and router."""
    settings = parse_app_settings(args)
    handles = {
        m.id: model_deployment(m).bind(m.id, m.engine_config(), m.load_on_start) for m in settings.models
    }
    return RouterDeployment.bind(handles, settings.model_dump())
