"""Each rule is stated once: the wire schemas' sampling bounds, weight choices and device pattern
are the engine's, and both sides accept exactly the same values at every edge."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ValidationError

from deployments.engine import EngineConfig, SamplingParams
from deployments.engine.config import DEVICE_PATTERN, DTYPE_BYTES, WEIGHT_CHOICES, WEIGHT_FORMATS, serving_dtype
from deployments.engine.request import MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, SAMPLING_BOUNDS, InvalidRequestError
from serve_app.model_settings import ModelSettings
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, InferRequest

REQUEST_MODELS: list[type[BaseModel]] = [InferRequest, CompletionRequest, ChatCompletionRequest]
WIRE_ONLY_TOP_K = -1  # -1 and 0 mean "no top-k cut" on the wire; the engine says None


def schema_of(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The field's JSON schema without the null branch (what /openapi.json shows for it)."""
    prop = model.model_json_schema()["properties"][name]
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    assert len(branches) == 1, prop
    return branches[0]


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", sorted(SAMPLING_BOUNDS))
def test_the_request_schema_shows_the_engines_bounds(model: type[BaseModel], name: str) -> None:
    rule, shown = SAMPLING_BOUNDS[name], schema_of(model, name)
    low = WIRE_ONLY_TOP_K if name == "top_k" else rule.ge
    assert (shown.get("minimum"), shown.get("exclusiveMinimum"), shown.get("maximum")) == (low, rule.gt, rule.le)


def test_max_completion_tokens_is_bounded_like_max_tokens() -> None:
    shown = schema_of(ChatCompletionRequest, "max_completion_tokens")
    assert (shown["minimum"], shown["maximum"]) == (SAMPLING_BOUNDS["max_tokens"].ge, SAMPLING_BOUNDS["max_tokens"].le)


def edges(shown: dict[str, Any]) -> list[tuple[Any, bool]]:
    """Each bound of a schema as (value, accepted): the bound itself and its nearest neighbours outside/inside."""
    step_down, step_up = (lambda v: v - 1, lambda v: v + 1) if shown["type"] == "integer" else (
        lambda v: math.nextafter(v, -math.inf), lambda v: math.nextafter(v, math.inf))
    cases = []
    if "minimum" in shown:
        cases += [(shown["minimum"], True), (step_down(shown["minimum"]), False)]
    if "exclusiveMinimum" in shown:
        cases += [(shown["exclusiveMinimum"], False), (step_up(shown["exclusiveMinimum"]), True)]
    if "maximum" in shown:
        cases += [(shown["maximum"], True), (step_up(shown["maximum"]), False)]
    return cases


def wire_then_engine(name: str, value: Any) -> tuple[bool, bool]:
    """Whether the /infer schema takes `name=value`, and whether the engine takes the same value
    (through the router's own conversion, `engine_params`, where the schema took it)."""
    body = {"model": "m", "prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT, name: value}  # room for any min_tokens
    try:
        params = InferRequest.model_validate(body).engine_params()
        wire_ok = True
    except ValidationError:
        params, wire_ok = {"max_tokens": MAX_TOKENS_LIMIT, name: value}, False
    try:
        SamplingParams(**{**params, "stop": tuple(params.get("stop", ()))})
        return wire_ok, True
    except InvalidRequestError as exc:
        assert exc.param == name and repr(value) in str(exc)  # the engine names the field and the value
        return wire_ok, False


@pytest.mark.parametrize("name", sorted(set(SAMPLING_BOUNDS) - {"top_k"}))
def test_schema_and_engine_accept_exactly_the_same_edge_values(name: str) -> None:
    cases = edges(schema_of(InferRequest, name))
    assert cases, f"{name} has no bounds in the schema"
    for value, accepted in cases:
        assert wire_then_engine(name, value) == (accepted, accepted), (name, value)


def test_top_k_edges_and_the_wire_only_off_values() -> None:
    top = SAMPLING_BOUNDS["top_k"]
    assert wire_then_engine("top_k", top.ge) == (True, True)
    assert wire_then_engine("top_k", top.le) == (True, True)
    assert wire_then_engine("top_k", top.le + 1) == (False, False)  # type: ignore[operator]
    assert wire_then_engine("top_k", WIRE_ONLY_TOP_K - 1) == (False, False)
    for off in range(WIRE_ONLY_TOP_K, int(top.ge)):  # type: ignore[arg-type]
        assert InferRequest.model_validate({"model": "m", "prompt": "hi", "top_k": off}).engine_params()["top_k"] is None
        with pytest.raises(InvalidRequestError, match="top_k"):
            SamplingParams(top_k=off)


def test_stop_strings_have_one_limit() -> None:
    def wire_ok(stop: list[str]) -> bool:
        try:
            InferRequest.model_validate({"model": "m", "prompt": "hi", "stop": stop})
            return True
        except ValidationError:
            return False

    most, too_many = ["x"] * MAX_STOP_STRINGS, ["x"] * (MAX_STOP_STRINGS + 1)
    assert wire_ok(most) and SamplingParams(stop=tuple(most)).stop == tuple(most)
    assert not wire_ok(too_many)
    with pytest.raises(InvalidRequestError, match="stop"):
        SamplingParams(stop=tuple(too_many))


def test_weight_choices_are_the_engines_in_the_schema_and_in_both_validators() -> None:
    assert ModelSettings.model_json_schema()["properties"]["weights"]["enum"] == list(WEIGHT_CHOICES)
    assert set(WEIGHT_FORMATS) < set(WEIGHT_CHOICES)
    for choice in WEIGHT_CHOICES:
        assert ModelSettings.model_validate({"id": "m", "source": "/x", "weights": choice}).engine_config().weights == choice
    for bad in ("int3", "AUTO", "fp16", ""):
        with pytest.raises(ValidationError):
            ModelSettings.model_validate({"id": "m", "source": "/x", "weights": bad})
        with pytest.raises(ValueError, match="weights="):
            EngineConfig(model="x", weights=bad)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "cudax", "cuda:", "gpu", "CPU", "cpu ", "cuda:1:2"])
def test_devices_are_one_pattern(device: str) -> None:
    shown = ModelSettings.model_json_schema()["properties"]["device"]["pattern"]
    assert shown == DEVICE_PATTERN
    expected = re.fullmatch(DEVICE_PATTERN, device) is not None
    try:
        ModelSettings.model_validate({"id": "m", "source": "/x", "device": device, "num_gpus": 1 if device.startswith("cuda") else 0})
        settings_ok = True
    except ValidationError:
        settings_ok = False
    try:
        EngineConfig(model="x", device=device)
        engine_ok = True
    except ValueError:
        engine_ok = False
    assert (settings_ok, engine_ok) == (expected, expected)


@pytest.mark.parametrize("weights", WEIGHT_CHOICES)
def test_serving_dtype_is_a_torch_float_of_the_size_the_estimate_counts(weights: str) -> None:
    dtype = getattr(torch, serving_dtype(weights))
    assert dtype.is_floating_point and torch.finfo(dtype).bits // 8 == DTYPE_BYTES[serving_dtype(weights)]
    assert (dtype == torch.float32) == (weights == "fp32")
