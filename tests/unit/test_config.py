"""config/serve.yaml validates; bad configs fail at start with the bad field named."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import yaml

from deployments.engine import EngineConfig, SamplingParams
from deployments.engine.request import InvalidRequestError
from deployments.errors import BadRequestError, ServiceUnavailableError
from serve_app.config import parse_app_settings

SERVE_YAML = Path(__file__).resolve().parents[2] / "config" / "serve.yaml"


def app_args() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"]


def test_shipped_config_serves_the_embedded_models_and_their_gptq_variant_on_loopback() -> None:
    config = yaml.safe_load(SERVE_YAML.read_text())
    assert config["http_options"]["host"] == "127.0.0.1"
    settings = parse_app_settings(app_args())
    assert [m.id for m in settings.models] == ["gemma-3-270m", "smollm2-135m-instruct-gptq"]
    assert settings.models[0].source.startswith("pkg://")
    assert settings.models[1].source.startswith("~/.cache/llm-serve/gptq/")  # made by `make serve`
    (pool,) = settings.pools  # SmolLM2 and the adapters make serve fine-tunes, in one pool
    assert [m.id for m in pool.models] == ["smollm2-135m-instruct"] and pool.models[0].source.startswith("pkg://")
    assert pool.adapter_dir == "~/.cache/llm-serve/adapters"
    assert settings.models[0].engine_config().stream_interval == 1  # every token as it comes, as vLLM's default
    args = app_args()
    args["models"][0]["stream_interval"] = "auto"
    assert parse_app_settings(args).models[0].engine_config().stream_interval == "auto"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda a: a["models"][0].update(max_num_seqs=0), "models.0.max_num_seqs"),
        (lambda a: a["models"][1].update(weights="int3"), "models.1.weights"),
        (lambda a: a["models"][0].update(device="cuda", num_gpus=0), "num_gpus"),
        (lambda a: a["models"][0].update(colour="blue"), "models.0.colour"),
        (lambda a: a["models"][1].update(id=a["models"][0]["id"]), "unique"),
        (lambda a: a.update(models=[], pools=[]), "at least one model"),
        (lambda a: a["pools"][0]["models"][0].update(id="gemma-3-270m"), "unique"),
        (lambda a: a["pools"][0].update(adapters=[{"id": "x", "base": "nope", "path": "/x"}]), "base 'nope' is not a model"),
        (lambda a: a["pools"][0].update(max_models_per_replica=0), "pools.0.max_models_per_replica"),
        (lambda a: a["models"][0].update(stream_interval=0), "models.0.stream_interval"),
        (lambda a: a["models"][0].update(stream_interval="fast"), "models.0.stream_interval"),
    ],
)
def test_bad_config_names_the_bad_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    args = app_args()
    mutate(args)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_app_settings(args)


def test_engine_config_and_sampling_params_reject_bad_values_by_name() -> None:
    with pytest.raises(ValueError, match="max_model_len=0"):
        EngineConfig(model="x", max_model_len=0)
    with pytest.raises(ValueError, match="weights=.int3."):
        EngineConfig(model="x", weights="int3")
    with pytest.raises(InvalidRequestError, match="top_p") as info:
        SamplingParams(top_p=0.0)
    assert info.value.param == "top_p"


def test_errors_survive_pickling_with_their_fields() -> None:
    for error in (BadRequestError("bad", param="x", code="c"), ServiceUnavailableError("busy"), InvalidRequestError("m", "p")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and getattr(copy, "param") == getattr(error, "param")
    busy = pickle.loads(pickle.dumps(ServiceUnavailableError("busy")))
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert set(busy.to_dict()["error"]) == {"message", "type", "param", "code"}


def test_durations_and_sizes_parse_like_ollama_and_reject_nonsense() -> None:
    from serve_app.schemas import parse_duration

    assert [parse_duration(v) for v in ("5m", "30s", "1h", "250ms", 0, 12.5, "-1", -1)] == [300, 30, 3600, 0.25, 0, 12.5, None, None]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


@pytest.mark.parametrize(
    ("size", "expected"),
    [("16GiB", 16 << 30), ("12GiB", 12 << 30), ("512MiB", 512 << 20), ("2GB", 2 * 10**9), ("1.5 GiB", 3 << 29), (" 12gib ", 12 << 30), (1024, 1024), ("100", 100)],
)
def test_sizes_are_pydantic_byte_sizes_wherever_configured(size: int | str, expected: int) -> None:
    settings = parse_app_settings({"memory_budget": {"cpu": size}, "models": [{"id": "m", "source": "/x", "kv_cache_bytes": size}]})
    assert settings.budget_bytes("cpu") == expected
    assert settings.models[0].engine_config().kv_cache_bytes == expected


@pytest.mark.parametrize("size", ["lots", "-1GiB", -5, 1.5, True, "12 parsecs"])
def test_a_bad_size_is_refused_naming_the_field_and_the_value(size: object) -> None:
    base: dict[str, object] = {"models": [{"id": "m", "source": "/x"}]}
    for bad in ({"memory_budget": {"cpu": size}}, {"models": [{"id": "m", "source": "/x", "kv_cache_bytes": size}]}):
        with pytest.raises(ValueError, match=r"(memory_budget\.cpu|models\.0\.kv_cache_bytes): .*" + re.escape(repr(size))):
            parse_app_settings(base | bad)


def test_engine_rules_apply_at_config_time_and_choices_name_the_bad_value() -> None:
    model = {"id": "m", "source": "/x"}
    with pytest.raises(ValueError, match="kv_cache_bytes=0 must be a positive integer"):
        parse_app_settings({"models": [model | {"kv_cache_bytes": 0}]})
    with pytest.raises(ValueError, match=r"models\.0\.weights: .*'fp32'.*\(got 'int3'\)"):
        parse_app_settings({"models": [model | {"weights": "int3"}]})
    with pytest.raises(ValueError, match=r"models\.0\.device: .*\(got 'cudax'\)"):
        parse_app_settings({"models": [model | {"device": "cudax", "num_gpus": 1}]})
    with pytest.raises(ValueError, match="device='cudax'"):
        EngineConfig(model="x", device="cudax")
    with pytest.raises(ValueError, match=r"api_keys: .*at least 16") as info:
        parse_app_settings({"models": [model], "api_keys": ["too-short-key"]})
    assert "too-short-key" not in str(info.value)  # a key is never echoed, even a bad one


def test_lifecycle_fields_are_validated_and_named() -> None:
    base = {"models": [{"id": "m", "source": "/x"}]}
    settings = parse_app_settings(base)
    assert settings.models[0].keep_alive_s == 300 and settings.models[0].autoload and not settings.models[0].pinned
    with pytest.raises(ValueError, match="models.0.keep_alive"):
        parse_app_settings({"models": [{"id": "m", "source": "/x", "keep_alive": "forever"}]})
    with pytest.raises(ValueError, match="memory_budget"):
        parse_app_settings(base | {"memory_budget": {"cpu": "much"}})
    with pytest.raises(ValueError, match="memory_budget"):
        parse_app_settings(base | {"memory_budget": {"tpu": "1GiB"}})
    with pytest.raises(ValueError, match=r"pools\.0\.adapters\.0\.keep_alive: .*'forever' is not a duration"):
        parse_app_settings(base | {"pools": [{"id": "p", "models": [{"id": "b", "source": "/y"}],
                                              "adapters": [{"id": "a", "base": "b", "path": "/z", "keep_alive": "forever"}]}]})
    assert parse_app_settings(base | {"memory_budget": {"cpu": "1GiB"}}).budget_bytes("cpu") == 1 << 30


def test_side_ports_are_free_and_outside_the_kernels_ephemeral_range() -> None:
    """serve_app/ray_env.py: HAProxy's stats and metrics ports and Serve's fallback proxy's are chosen before
    Ray starts; a port the kernel could hand out meanwhile (to a gRPC server on port 0, to an outgoing
    connection) would make HAProxy's bind fail at start."""
    import socket

    from serve_app import ray_env

    ports = {ray_env.free_port() for _ in range(20)}
    assert not ports & set(ray_env.ephemeral_ports())
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: binds
