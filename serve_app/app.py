"""The one place that knows Ray Serve: one deployment per configured model, plus the router ingress.

`config/serve.yaml` points its `import_path` at `build_app`, which receives the app `args`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from deployments.memory import replica_allocator_env
from deployments.server import ModelServer
from serve_app.api import create_api
from serve_app.channels import ChannelRouter
from serve_app.clients import ModelRegistry
from serve_app.config import AppSettings, ModelSettings, PoolSettings, parse_app_settings
from serve_app.control_plane import ActorRecordStore, control_plane
from serve_app.lifecycle import LifecycleManager
from serve_app.loopback import keep_serve_grpc_on_loopback
from serve_app.metrics import release_counter
from serve_app.pool_app import pool_deployment
from serve_app.pool_client import PoolMemberClient
from serve_app.ray_client import HandleModelClient, deployment_name

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
logger = logging.getLogger(__name__)


def log_through_serve() -> None:
    """Send our packages' INFO logs (loads, releases and their reasons) to the replica's Ray Serve
    log (the `ray.serve` logger's handlers); otherwise Python's default level drops them. DEBUG too
    when Serve's `logging_config` asks for it (`log_level: DEBUG`)."""
    serve_logger = logging.getLogger("ray.serve")
    for name in ("serve_app", "deployments"):
        ours = logging.getLogger(name)
        ours.setLevel(min(logging.INFO, serve_logger.getEffectiveLevel()))
        for handler in serve_logger.handlers:
            if handler not in ours.handlers:
                ours.addHandler(handler)
        ours.propagate = False


def capacity(model: ModelSettings | PoolSettings) -> int:
    """Requests the model's replicas run or queue at most (what an overloaded request waits behind)."""
    replicas = model.autoscaling.max_replicas if model.autoscaling is not None else model.num_replicas
    return replicas * model.max_ongoing_requests + max(model.max_queued_requests, 0)


class Router:
    """The ingress: builds the FastAPI app over handle-backed model clients at replica start."""

    def __init__(self, models: dict[str, DeploymentHandle], settings: dict[str, Any], pools: dict[str, DeploymentHandle] | None = None) -> None:
        keep_serve_grpc_on_loopback()  # before Serve starts this replica's gRPC server
        log_through_serve()
        self.settings: AppSettings = parse_app_settings(settings)
        app_name = serve.get_replica_context().app_name
        timeout = self.settings.load_timeout_s
        control = control_plane(app_name)  # one per app: the config's one writer, the shared records
        clients: dict[str, Any] = {
            m.id: HandleModelClient(m.id, models[m.id], app_name, timeout, control, capacity=capacity(m), use_channels=m.uses_channels)
            for m in self.settings.models
        }
        for pool in self.settings.pools:
            for member in pool.members():
                clients[member.id] = PoolMemberClient(member, (pools or {})[pool.id], app_name, timeout, control, capacity(pool))
        self.registry = ModelRegistry(clients)
        self.lifecycle = LifecycleManager(self.registry, self.settings, on_release=release_counter(), store=ActorRecordStore(control))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.registry, self.settings, self.lifecycle)


RouterDeployment = serve.deployment(
    name="router",
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
)(serve.ingress()(Router))


class ModelReplica(ModelServer):
    """`ModelServer` as a Serve replica: the loopback shim at construction, the wanted state from
    `user_config` (Ray calls `reconfigure` right after construction, and on every change), and a log
    line when Ray stops a replica that still holds its model. That is not counted as a release: Ray
    kills the process right after `__del__`, before its metrics' next push to the agent (every
    `RAY_metrics_report_interval_ms`), so no count from here would ever be exported."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        keep_serve_grpc_on_loopback()  # before Serve starts this replica's gRPC server
        log_through_serve()
        super().__init__(*args, **kwargs)
        self.replica_name = serve.get_replica_context().replica_id.unique_id  # what a channel call names

    def __del__(self) -> None:
        if getattr(self, "channels", None) is not None:
            self.channels.close_all()
        if getattr(self, "engine", None) is not None:
            logger.info("released %s: Ray Serve stopped this replica (redeploy or downscale)", self.model_id)


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
        # The wanted state; `reconfigure` applies it on every replica, new ones included.
        "user_config": {"loaded": model.load_on_start, "epoch": 0},
    }
    if model.uses_channels:  # a channel call goes to the replica it names; it holds one slot of its own
        options["request_router_config"] = RequestRouterConfig(request_router_class=ChannelRouter)
        options["max_ongoing_requests"] = model.max_ongoing_requests + 1
    if model.autoscaling is not None:
        options["autoscaling_config"] = model.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = model.num_replicas
    return serve.deployment(ModelReplica).options(**options)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: validates the args, then binds models, pools and router."""
    settings = parse_app_settings(args)
    handles = {
        m.id: model_deployment(m).bind(m.id, m.engine_config(), False) for m in settings.models  # user_config loads
    }
    pools = {pool.id: pool_deployment(pool) for pool in settings.pools}
    return RouterDeployment.bind(handles, settings.model_dump(), pools)
