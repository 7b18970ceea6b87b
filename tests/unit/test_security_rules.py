"""The pure rules behind the router's guards: Host parsing, strict JSON, which route needs which key."""

from __future__ import annotations

import pytest

from serve_app.config import parse_app_settings
from serve_app.errors import AuthenticationError, PermissionDeniedError, json_problem
from serve_app.security import LOOPBACK_HOSTS, APIKeys, host_name, is_allowed_host

USER, ADMIN = "u" * 20, "a" * 20


@pytest.mark.parametrize(
    ("header", "host"),
    [("127.0.0.1:8000", "127.0.0.1"), ("LocalHost", "localhost"), ("localhost.", "localhost"), ("[::1]:80", "::1"),
     ("[::1]", "::1"), ("example.com:65535", "example.com"), ("[::1", None), ("a:b", None), ("a:1:2", None),
     ("a:123456", None), ("", None), (":80", None)],
)
def test_host_name(header: str, host: str | None) -> None:
    assert host_name(header) == host


def test_host_patterns() -> None:
    allowed = (*LOOPBACK_HOSTS, "llm.lan", "*.corp.example")
    assert all(is_allowed_host(h, allowed) for h in ["localhost", "::1", "llm.lan", "x.corp.example", "a.b.corp.example"])
    assert not any(is_allowed_host(h, allowed) for h in ["corp.example", "xcorp.example", "llm.lan.evil", "127.0.0.2"])
    assert is_allowed_host("anything", ("*",))


@pytest.mark.parametrize(
    ("body", "problem"),
    [(b'{"a": 1}', None), (b'{"a": [1.5, "\\ud83d\\ude00", {"b": null}]}', None), (b"\xff", "UTF-8"),
     (b'{"a": NaN}', "NaN"), (b'{"a": -Infinity}', "-Infinity"), (b'{"a": 1e999}', "double"),
     (b'{"a": 1, "a": 2}', "duplicate key 'a'"), (b'{"a": {"b": 1, "b": 1}}', "duplicate"),
     (b'"\\udc00"', "surrogate"), (b"[" * 33 + b"]" * 33, "nested"), (b"[" * 5000 + b"]" * 5000, "nested"),
     (b"1" + b"0" * 20, "2**64"), (b"1" * 5000, "digits"), (b'{"a": ', "line 1 column 7")],
)
def test_json_problem(body: bytes, problem: str | None) -> None:
    found = json_problem(body)
    assert (found is None) if problem is None else (found is not None and problem in found), found


def keys(api_keys: list[str], admin_api_keys: list[str], environ: dict[str, str] | None = None) -> APIKeys:
    settings = parse_app_settings({"models": [{"id": "m", "source": "/nowhere"}], "api_keys": api_keys, "admin_api_keys": admin_api_keys})
    return APIKeys.from_settings(settings, environ or {})


def test_which_route_needs_which_key() -> None:
    both = keys([USER], [ADMIN])
    assert both.problem("/healthz", None) is None and both.problem("/ui/app.js", None) is None
    assert isinstance(both.problem("/models", None), AuthenticationError)
    assert isinstance(both.problem("/models", f"Bearer {USER[:-1]}"), AuthenticationError)
    assert both.problem("/models", f"Bearer {USER}") is None and both.problem("/models", f"bearer  {ADMIN} ") is None
    assert isinstance(both.problem("/load", f"Bearer {USER}"), PermissionDeniedError)
    assert both.problem("/unload", f"Bearer {ADMIN}") is None
    user_only = keys([USER], [])
    assert user_only.problem("/load", f"Bearer {USER}") is None  # no admin keys: any key may load
    admin_only = keys([], [ADMIN])
    assert admin_only.problem("/v1/models", None) is None
    assert isinstance(admin_only.problem("/load", None), AuthenticationError)
    none = keys([], [])
    assert none.problem("/load", None) is None and none.problem("/models", "Bearer junk") is None


def test_environment_keys_add_to_configured_ones() -> None:
    env = {"LLM_SERVE_API_KEY": f" {USER} , ,", "LLM_SERVE_ADMIN_API_KEY": ADMIN}
    merged = keys([], [], env)
    assert merged.problem("/models", f"Bearer {USER}") is None
    assert isinstance(merged.problem("/load", f"Bearer {USER}"), PermissionDeniedError)
    assert merged.problem("/load", f"Bearer {ADMIN}") is None


def test_a_short_key_in_the_environment_fails_the_start_without_showing_it() -> None:
    with pytest.raises(ValueError, match="LLM_SERVE_API_KEY") as failed:
        keys([], [], {"LLM_SERVE_API_KEY": f"{USER},tiny"})
    assert "tiny" not in str(failed.value) and USER not in str(failed.value)
