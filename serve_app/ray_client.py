"""A `ModelClient` over a Ray Serve deployment (with serve_app.app, the only Ray-aware code).

Generation goes through the deployment handle. Load and unload must reach *every* replica, which a
handle call cannot (it picks one): they set the deployment's `user_config` in the application's
deployed config, and Ray Serve calls `reconfigure` on each replica, and on every replica it starts
later. An app deployed from Python (`serve.run`) has no deployed config; there they fall back to
one handle call (one replica), which is exact for the usual single replica.

The application's config has one writer, the `ControlPlane` actor (serve_app.control_plane).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.protocol import Chunk, GenerateRequest, ReplicaStatus
from deployments.errors import OverloadedError, ServiceUnavailableError
from serve_app.channels import ChannelSet, from_inbox as _from_inbox
from serve_app.control_plane import call_control, write_user_config
from serve_app.errors import unwrap_error

logger = logging.getLogger(__name__)
POLL_S = 0.2


def deployment_name(model_id: str) -> str:
    return f"model-{model_id}"


class HandleModelClient:
    """Forwards to a model deployment: generation by handle, load/unload by `user_config`."""

    def __init__(
        self,
        model_id: str,
        handle: DeploymentHandle,
        app_name: str,
        timeout_s: float = 900.0,
        control: Any = None,
        capacity: int = 0,
        use_channels: bool = False,
        socket_channels_only: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.handle = handle
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.control = control  # the ControlPlane actor handle; None: write the config directly
        self.capacity = capacity  # requests its replicas run or queue: Retry-After's queue when none is counted here
        self.clock = clock  # for the service rate (tests inject one)
        self.service_rate = ServiceRate()  # also counts this router's generations in flight: the live queue
        # Per-replica channels (serve_app.channels): a deployment built with ChannelRouter, or (sockets only) a pool.
        self.channels = ChannelSet(handle, socket_channels_only) if use_channels else None

    async def status(self) -> dict[str, Any]:
        status = await self._call("status") | {"replicas": await self.num_replicas()}
        if self.channels is not None:
            status["channels"] = self.channels.stats()  # this router's, to the model's replicas
        return status

    async def load(self) -> dict[str, Any]:
        return await self._apply({"loaded": True})

    async def unload(self, force: bool = False, reason: str = "manual") -> dict[str, Any]:
        if await self.num_replicas() == 0:  # scaled to zero: nothing holds memory; don't start one
            return {"id": self.model_id, "status": "unloaded", "replicas": 0}
        return await self._apply({"loaded": False, "force": force, "reason": reason})

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        response = None
        settled = False  # finished or failed: nothing left to cancel (cancel() would re-raise the failure)
        channels = self.channels
        request_id = request.request_id
        inbox: asyncio.Queue[Chunk | BaseException] | None = None
        from_inbox: AsyncGenerator[Chunk, None] | None = None
        if channels is not None:
            request_id, inbox = channels.register(request_id)
            request = dataclasses.replace(request, request_id=request_id, channels=channels.channel_ids())
        self.service_rate.started(self.clock())
        completed = False
        try:
            # .remote() itself raises BackPressureError when the model's queue is full.
            # Stamped: the replica measures the time the request waited in Ray Serve's queue from it.
            response = self.handle.options(stream=True).generate.remote(request.stamped(time.time()))
            chunks: AsyncIterator[Chunk] = response
            if channels is not None and inbox is not None:
                routed = await response.__anext__()  # which replica took it, and where its chunks come from
                channels.routed(request_id, routed)
                if routed.via_channel:
                    chunks = from_inbox = _from_inbox(inbox, response)
            async for chunk in chunks:
                yield chunk
            settled = completed = True
        except BackPressureError:
            settled = True
            raise self._overloaded(ahead=self.num_in_flight - 1) from None  # all but this one
        except (RayActorError, ActorUnavailableError):  # the replica died (killed, crashed, OOM)
            settled = True
            raise ServiceUnavailableError(
                f"model {self.model_id!r}: its replica stopped while serving this request; Ray Serve restarts it, retry",
                code="replica_died",
            ) from None
        except Exception as exc:
            settled = True
            raise (unwrap_error(exc) or exc) from None
        finally:
            self.service_rate.ended(self.clock(), completed)
            if from_inbox is not None:
                await from_inbox.aclose()
            if channels is not None:
                channels.release(request_id)
            if response is not None and not settled:
                response.cancel()  # the client left or failed: stop generating for it

    @property
    def num_in_flight(self) -> int:
        """This router's generations of the model, queued or running."""
        return self.service_rate.num_in_flight

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
        epoch = time.time_ns()
        user_config = wanted | {"epoch": epoch}
        name = deployment_name(self.model_id)
        if self.control is not None:
            applied = await call_control(self.control.set_user_config.remote(self.app_name, name, user_config))
        else:
            applied = await asyncio.to_thread(write_user_config, self.app_name, name, user_config)
        if not applied:  # deployed with serve.run: one handle call, one replica
            if wanted["loaded"]:
                return await self._call("load")
            return await self._call("unload", wanted["force"], wanted["reason"])
        return await self._wait_applied(epoch)

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
            status: ReplicaStatus = await getattr(self.handle, method).remote(*args)
            return status.to_dict()
        except BackPressureError:
            raise self._overloaded(ahead=self.num_in_flight) from None
        except Exception as exc:
            raise (unwrap_error(exc) or exc) from None

    def _overloaded(self, ahead: int) -> OverloadedError:
        """503 with the time the `ahead` requests should take to drain at the measured rate:
        `ServiceRate.seconds_for` (ceil(ahead / rate), 1 to 120 s; 5 s before a rate is measured).
        Ray Serve bounds the queue per caller (`max_queued_requests` at each handle), so what is
        ahead of a refused request is this router's own requests in flight, and the rate is this
        router's completions: a share of each, whatever the number of router replicas. With none
        counted here (another caller filled the queue), the configured capacity stands in."""
        retry_after = self.service_rate.seconds_for(ahead if ahead > 0 else self.capacity, now=self.clock())
        return OverloadedError(
            f"model {self.model_id!r} is at capacity (its queue is full); retry after {retry_after}s",
            headers={"Retry-After": str(retry_after)},
        )


class ServiceRate:
    """Requests completed per second of serving: the completions of the last `window_s` (at most
    `max_samples`) over the time within them that this router had requests in flight, so the idle
    time between bursts does not dilute the rate (Retry-After must not tell a client to wait a
    minute for a queue that drains in a second). It also counts the requests in flight."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 256) -> None:
        self.window_s = window_s
        self.done: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (time, busy seconds until then)
        self.num_in_flight = 0
        self._busy_s = 0.0  # seconds with requests in flight, up to `_since`
        self._since = 0.0

    def _busy_at(self, now: float) -> float:
        return self._busy_s + (now - self._since if self.num_in_flight else 0.0)

    def started(self, now: float) -> None:
        self._busy_s, self._since = self._busy_at(now), now
        self.num_in_flight += 1

    def ended(self, now: float, completed: bool) -> None:
        self._busy_s, self._since = self._busy_at(now), now
        self.num_in_flight -= 1
        if completed:
            self.done.append((now, self._busy_s))

    def per_second(self, now: float) -> float | None:
        recent = [busy for t, busy in self.done if now - t <= self.window_s]
        if len(recent) < 2:
            return None
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)

    def seconds_for(self, queued: int, now: float | None = None, unknown_s: int = 5, max_s: int = 120) -> int:
        """Whole seconds for `queued` requests to complete; `unknown_s` before any rate is measured."""
        rate = self.per_second(time.monotonic() if now is None else now)
        if rate is None:
            return unknown_s
        return int(min(max_s, max(1, math.ceil(max(queued, 1) / rate))))
