"""The environment Ray reads at import: set before `import ray` by every process that starts a Ray
instance of ours (the Makefile exports the same for `serve run`).

- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: without it Ray rewrites `--node-ip-address=127.0.0.1` to
  the host's routable IP and binds its gRPC servers to every interface.
- `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`: Ray Serve's throughput mode (2.56+): replica-to-replica calls
  (router -> model) over direct gRPC, user code on the replica's own event loop, buffered request
  logs. `perf/bench_overhead.py` on SmolLM2, 10 streams over HTTP: the router's CPU 0.23 -> 0.15
  cores, throughput +10% (perf/README.md). Those gRPC servers are kept on loopback by
  `serve_app/loopback.py`.
- `RAY_SERVE_ENABLE_DIRECT_INGRESS=0`: the throughput mode would also have the ingress replicas
  open HTTP ports of their own (30000-31000) beside the proxy's; traffic comes through the proxy.
"""

from __future__ import annotations

import os

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
}


def apply() -> None:
    """Set each variable unless the caller's environment already does (loopback is always forced)."""
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
