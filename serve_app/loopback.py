"""Keep Ray Serve replicas' inter-deployment gRPC servers on loopback when the node is.

Ray Serve 2.60 binds each replica's gRPC server to `[::]:0` (replica.py) with no setting to change
it, so on a node started with `--node-ip-address=127.0.0.1` those ports alone would listen on every
interface. Called from each replica's constructor (Serve starts that server right after it), this
swaps the address for 127.0.0.1 -- only when the node itself is on loopback, so clusters are untouched.
"""

from __future__ import annotations

from typing import Any

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def keep_serve_grpc_on_loopback() -> None:
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() not in LOOPBACK:
        return
    original = replica.add_port_to_grpc_server

    def add_port_on_loopback(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    if getattr(original, "__name__", "") != add_port_on_loopback.__name__:  # patch once per process
        replica.add_port_to_grpc_server = add_port_on_loopback
