"""Schemathesis against the router's own OpenAPI document, in-process (no network): requests made
to fit the schema and requests made to break it, a bounded number per operation. No input may get
a 5xx; a response must match the status codes and shapes the document declares; input that breaks
the schema must be refused with a 4xx. How many inputs it tried goes into the run's summary
(`record_property("summary", ...)`, printed by tests/conftest.py). `GET /metrics` is outside the
document (Prometheus text); tests/integration/test_metrics_recorded.py checks its answers."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from deployments.server import ModelServer  # noqa: E402
from serve_app.api import create_api  # noqa: E402
from serve_app.clients import InProcessModelClient, ModelRegistry  # noqa: E402
from serve_app.config import parse_app_settings  # noqa: E402

MAX_EXAMPLES = 20  # per operation and mode
MUST_COVER = {"GET /pools", "GET /models/{model_id}", "GET /v1/models/{model}", "GET /models", "POST /load", "POST /v1/chat/completions"}
SERVED = "tiny-chat"
REAL_MODEL_ROUTES = ("/infer", "/v1/completions", "/v1/chat/completions", "/load")
"""Where half the valid generated bodies name the served model, so they reach the engine (not only a 404).
Not /unload: each would unload the model and the next request load it again."""
CHECKS = {
    GenerationMode.POSITIVE: [not_a_server_error, status_code_conformance, response_schema_conformance],
    GenerationMode.NEGATIVE: [not_a_server_error, status_code_conformance, negative_data_rejection],
}


@pytest.fixture(scope="module")
async def api_schema(tiny_model_dir: Path) -> AsyncIterator[Any]:
    app_settings = parse_app_settings(
        {
            "allowed_hosts": ["testserver"],  # the Host schemathesis' in-process client sends
            "models": [
                # Small limits keep generated requests cheap: at most 128 tokens of a tiny model.
                {"id": "tiny-chat", "source": str(tiny_model_dir), "max_model_len": 128, "max_num_seqs": 4,
                 "default_max_tokens": 8, "keep_alive": -1},
            ],
        }
    )
    servers = [ModelServer(m.id, m.engine_config(), m.load_on_start) for m in app_settings.models]
    registry = ModelRegistry({s.model_id: InProcessModelClient(s) for s in servers})
    yield schemathesis.openapi.from_asgi("/openapi.json", create_api(registry, app_settings))
    for server in servers:
        await server.unload()


def test_generated_requests_never_get_a_server_error(api_schema: Any, record_property: Callable[[str, object], None]) -> None:
    tried: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert MUST_COVER <= {op.label for op in operations}
    for operation in operations:
        for mode, checks in CHECKS.items():

            @given(case=operation.as_strategy(generation_mode=mode), served=st.booleans())
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def run(case: Any, served: bool) -> None:
                positive = mode is GenerationMode.POSITIVE  # a negative case may break the schema only in `model`
                if served and positive and operation.path in REAL_MODEL_ROUTES and isinstance(case.body, dict):
                    case.body["model"] = SERVED
                if positive and isinstance(case.body, dict) and isinstance(case.body.get("timeout"), (int, float)):
                    # A valid but tiny deadline ends the request with a 504 by design (tests/integration/test_faults.py).
                    case.body["timeout"] = max(case.body["timeout"], 60.0)
                response = case.call(timeout=60)
                statuses[response.status_code // 100] += 1
                case.validate_response(response, checks=checks)
                tried[f"{operation.label} {mode.value}"] += 1

            try:
                run()
            except Unsatisfiable:  # nothing to break: the operation takes no input (GET /healthz)
                assert mode is GenerationMode.NEGATIVE
    answers = ", ".join(f"{status}xx: {count}" for status, count in sorted(statuses.items()))
    assert sum(tried.values()) > 0 and all(tried[f"{op.label} positive"] for op in operations)
    assert max(statuses) < 5  # not_a_server_error checked each; this says so in the summary
    record_property("summary", f"schemathesis: {sum(tried.values())} inputs over {len(operations)} operations, all below 500 ({answers})")
