"""Who may call the router, and from where: API keys, the Host allowlist, CORS, and the access log.

Each is a small ASGI middleware answering in the OpenAI error shape, installed around the app by
`install_security` (outermost first): access log -> Host allowlist -> CORS (only when origins are
configured) -> API keys -> the body guards of serve_app/errors.py -> FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import APIError, BadRequestError
from serve_app.config import AppSettings, check_api_key
from serve_app.errors import AuthenticationError, PermissionDeniedError, send_error

API_KEY_ENV = "LLM_SERVE_API_KEY"
ADMIN_API_KEY_ENV = "LLM_SERVE_ADMIN_API_KEY"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = frozenset({"/healthz", "/", "/favicon.ico", "/ui"})
"""Liveness and the chat page's static files: they carry no data, and the page sends the key itself."""
PUBLIC_PREFIXES = ("/ui/",)
ADMIN_PATHS = frozenset({"/load", "/unload"})
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
access_logger = logging.getLogger("serve_app.access")
DEBUG_BODY_BYTES = 4096


def route_path(scope: Scope) -> str:
    """The path inside the app (without a proxy's `root_path` prefix)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


@dataclass(frozen=True)
class APIKeys:
    """The accepted keys, kept only as SHA-256 digests and compared in constant time."""

    keys: tuple[bytes, ...]
    admin_keys: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: AppSettings, environ: Mapping[str, str] = os.environ) -> "APIKeys":
        def collect(configured: list[str], env: str) -> tuple[bytes, ...]:
            from_env = [k.strip() for k in environ.get(env, "").split(",") if k.strip()]
            for key in from_env:
                try:
                    check_api_key(key)
                except ValueError as exc:
                    raise ValueError(f"${env}: {exc}") from None
            return tuple(_digest(k) for k in [*configured, *from_env])

        return cls(
            keys=collect([k.get_secret_value() for k in settings.api_keys], API_KEY_ENV),
            admin_keys=collect([k.get_secret_value() for k in settings.admin_api_keys], ADMIN_API_KEY_ENV),
        )

    def problem(self, path: str, authorization: str | None) -> APIError | None:
        """Why a request for `path` with this Authorization header may not pass, or None."""
        is_admin_path = path in ADMIN_PATHS
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        if not self.keys and not (is_admin_path and self.admin_keys):
            return None  # no key configured for this route
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthenticationError("an API key is required: send 'Authorization: Bearer <key>'")
        presented = _digest(token.strip())
        is_admin = _matches(presented, self.admin_keys)
        is_user = _matches(presented, self.keys)
        if not (is_admin or is_user):
            return AuthenticationError("the API key is not valid")
        if is_admin_path and self.admin_keys and not is_admin:
            return PermissionDeniedError(f"{path} needs an admin API key")
        return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _matches(presented: bytes, digests: tuple[bytes, ...]) -> bool:
    """Compare against every key, always all of them: the time taken says nothing about which matched."""
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found


class APIKeyAuth:
    """ASGI middleware: 401 (`WWW-Authenticate: Bearer`) without a valid key, 403 for /load and
    /unload with a key that is not an admin key (when admin keys are configured)."""

    def __init__(self, app: ASGIApp, keys: APIKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.keys.problem(route_path(scope), Headers(scope=scope).get("authorization"))
            if error is not None:
                await send_error(send, error)
                return
        await self.app(scope, receive, send)


def host_name(value: str) -> str | None:
    """The host of a Host header ('[::1]:8000' -> '::1', 'Example.COM.' -> 'example.com'), or None."""
    value = value.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    if rest and not re.fullmatch(r":\d{1,5}", rest):
        return None
    return host.rstrip(".") or None


def is_allowed_host(host: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        pattern = pattern.strip("[]")
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class HostAllowlist:
    """ASGI middleware: 400 unless the Host header names this server (DNS-rebinding guard): a page on
    evil.example whose name resolves to 127.0.0.1 still sends `Host: evil.example`."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed = (*LOOPBACK_HOSTS, *allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_name(Headers(scope=scope).get("host", ""))
            if host is None or not is_allowed_host(host, self.allowed):
                message = "the Host header does not name this server (add the name to allowed_hosts)"
                await send_error(send, BadRequestError(message, param="Host", code="invalid_host"))
                return
        await self.app(scope, receive, send)


class ErrorShapedCORS(CORSMiddleware):
    """Starlette's CORS middleware, answering a refused preflight in the OpenAI error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode(errors="replace")
        error = BadRequestError(f"CORS preflight refused: {refused}", code="cors_refused")
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        return JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)


class AccessLog:
    """ASGI middleware: one INFO line per request with its id, route, status, body sizes and duration.
    Never headers or the query string (keys stay out of the logs), and the body (prompts) only when
    debug logging is asked for (`serve_app.access` at DEBUG, e.g. Serve's `logging_config:
    {log_level: DEBUG}`): then one more DEBUG line with the request id and the body's first
    `DEBUG_BODY_BYTES`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id, generated = _request_id(scope)
        counts = {"in": 0, "out": 0, "status": 500}
        # for a streamed response's connection handoff (serve_app.handoff): the `send` nearest uvicorn's (its cycle is
        # looked for behind it only if a handoff is tried), and where the bytes the replica writes itself are counted
        scope["llm.send"], scope["llm.counts"] = send, counts
        body = bytearray() if access_logger.isEnabledFor(logging.DEBUG) else None

        async def counting_receive() -> Message:
            message = await receive()
            counts["in"] += len(message.get("body", b""))
            if body is not None and len(body) < DEBUG_BODY_BYTES:
                body.extend(message.get("body", b"")[: DEBUG_BODY_BYTES - len(body)])
            return message

        async def logging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                counts["status"] = message["status"]
                if generated:  # behind Ray Serve the proxy made the id and echoes it itself
                    message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, logging_send)
        finally:
            access_logger.info(
                "request_id=%s method=%s path=%s status=%d bytes_in=%d bytes_out=%d duration_ms=%.1f",
                request_id, scope.get("method", "?"), _printable(route_path(scope)), counts["status"],
                counts["in"] or _declared_length(scope), counts["out"], (time.perf_counter() - started) * 1000,
            )
            if body:
                access_logger.debug("request_id=%s body=%r", request_id, bytes(body).decode("utf-8", "replace"))


def _request_id(scope: Scope) -> tuple[str, bool]:
    """The request's `x-request-id` (Ray Serve's proxy sets one), else a new one: (id, generated)."""
    given = Headers(scope=scope).get("x-request-id")
    if given is not None:
        return (given if REQUEST_ID_PATTERN.fullmatch(given) else _printable(given)[:64] or "-"), False
    return uuid.uuid4().hex, True


def _declared_length(scope: Scope) -> int:
    """Content-Length of a body refused before it was read (e.g. 401), else 0."""
    declared = Headers(scope=scope).get("content-length", "")
    return int(declared) if declared.isdigit() else 0


def _printable(text: str) -> str:
    """`text` safe for a one-line log entry: no control characters, spaces or quotes, 200 at most."""
    return "".join(c if c.isprintable() and c not in ' "' else "?" for c in text[:200])


def install_security(app: FastAPI, settings: AppSettings) -> None:
    """Add the middlewares, innermost first (Starlette runs the last added outermost)."""
    keys = APIKeys.from_settings(settings)
    app.add_middleware(APIKeyAuth, keys=keys)
    if settings.cors_origins:
        app.add_middleware(
            ErrorShapedCORS,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "accept", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            max_age=600,
        )
    app.add_middleware(HostAllowlist, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(AccessLog)
