"""Every socket the service's processes listen on is on loopback, unless the config says otherwise.

The service's processes: this test process and all its descendants (GCS, raylet, dashboard agent,
the Serve controller, proxy and replicas, which Ray starts as workers), plus any process whose
command line names this Ray session (in case one was re-parented)."""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

import psutil
import pytest

ray = pytest.importorskip("ray")


def service_processes() -> dict[int, str]:
    """pid -> a readable name (Ray workers set their title, e.g. `ray::ServeReplica:llm:router`)."""
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    me = psutil.Process()
    ours = {me, *me.children(recursive=True)}
    for process in psutil.process_iter(["cmdline"]):
        if session_dir in " ".join(process.info["cmdline"] or []):
            ours.add(process)
    names = {}
    for process in ours:
        try:
            program, *args = process.cmdline() or [process.name()]
            # The program's base name first: a long install path must not push `gcs_server` out of view.
            names[process.pid] = " ".join([os.path.basename(program), *args])[:80]
        except psutil.Error:  # ended while we looked
            continue
    return names


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_every_socket_the_service_listens_on_is_loopback(serve_url: str) -> None:
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    configured_host = client.http_config.host  # what the Serve config asks for
    allowed = {configured_host} if configured_host not in ("127.0.0.1", "localhost", "::1") else set()
    processes = service_processes()
    listening = [
        c for c in psutil.net_connections(kind="inet")
        if c.pid in processes and (c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr))  # TCP listen, bound UDP
    ]
    sockets = sorted({(c.laddr.ip, c.laddr.port, processes[c.pid]) for c in listening})
    print("\n" + "\n".join(f"{ip}:{port}  {name}" for ip, port, name in sockets))
    names = " ".join(processes.values())
    for expected in ("gcs_server", "raylet", "ServeController", "ProxyActor", "ServeReplica"):
        assert expected in names, f"{expected} not among the service's processes: {sorted(set(processes.values()))}"
    proxy_port = urlsplit(serve_url).port
    assert any(port == proxy_port for _, port, _ in sockets), f"the HTTP proxy's port {proxy_port} is not listed"
    assert len({name for _, _, name in sockets}) >= 4  # GCS, raylet, agents, workers each listen on something
    exposed = [s for s in sockets if not is_loopback(s[0]) and s[0] not in allowed]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_http_enters_through_haproxy_straight_to_the_router(serve_url: str) -> None:
    """serve_app/ray_env.py: HAProxy owns the HTTP port and forwards to the router replica's own
    port (Serve's direct ingress), so SSE chunks no longer pass through Serve's Python proxy."""
    processes = service_processes()
    listening = {(c.laddr.port, processes[c.pid]) for c in psutil.net_connections(kind="tcp")
                 if c.pid in processes and c.status == psutil.CONN_LISTEN}
    port = urlsplit(serve_url).port
    owners = [name for p, name in listening if p == port]
    assert owners and all(name.startswith("haproxy") for name in owners), f"port {port} is held by {owners}"
    router_ports = [p for p, name in listening if "ServeReplica" in name and "router" in name and 30000 <= p <= 31000]
    assert router_ports, f"the router replica listens on no direct-ingress port: {sorted(listening)}"


def test_serving_processes_run_at_normal_priority(serve_url: str) -> None:
    """serve_app/ray_env.py: `RAY_worker_niceness=0`. Ray starts its workers at nice 15, under every
    nice-0 process on the host (Ray's own GCS and raylet, the HTTP client of a benchmark, a user's other
    programs), so any of them preempted the model replica's engine threads at once; the replicas, the router
    and the HAProxy a Serve actor starts are the service here, and run at the host's normal priority."""
    processes = service_processes()
    serving = {pid: name for pid, name in processes.items() if "ServeReplica" in name or name.startswith("haproxy")}
    assert any("ServeReplica" in name for name in serving.values()), sorted(set(processes.values()))
    niceness = {}
    for pid, name in serving.items():
        try:
            niceness[name] = os.getpriority(os.PRIO_PROCESS, pid)
        except OSError:  # ended while we looked
            continue
    assert niceness and all(n == 0 for n in niceness.values()), niceness
