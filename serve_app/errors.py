"""One renderer for every error (OpenAI's shape), and the body guards: 413 over the size limit,
400 for a JSON body that is not strict JSON."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import APIError, BadRequestError, PayloadTooLargeError
from serve_app.schemas import ErrorResponse

logger = logging.getLogger(__name__)
MAX_JSON_DEPTH = 32
"""Arrays and objects nested deeper than this are refused (requests nest 4 deep)."""
MAX_JSON_INTEGER = 2**64
"""Integers beyond +-2**64 are refused before validation (the widest field, `seed`, is 64-bit)."""


class AuthenticationError(APIError):
    """No API key, or not one of the configured keys (401, with `WWW-Authenticate: Bearer`)."""

    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, param, code, {"WWW-Authenticate": "Bearer", **(headers or {})})


class PermissionDeniedError(APIError):
    """A valid key that may not do this (403): e.g. /load with a non-admin key."""

    status_code = 403
    error_type = "permission_error"
    default_code = "insufficient_permissions"


def unwrap_error(exc: BaseException | None) -> APIError | None:
    """Our APIError, also when it comes wrapped by the layer that carried it across processes."""
    for _ in range(5):
        if exc is None or isinstance(exc, APIError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


def describe_validation_error(exc: RequestValidationError) -> BadRequestError:
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return BadRequestError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(), code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return BadRequestError(message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail), code=str(exc.status_code))
        error.status_code = exc.status_code
        error.error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        wrapped = unwrap_error(exc)
        if wrapped is not None:
            return error_response(wrapped)
        logger.exception("unhandled error")
        return error_response(APIError(f"internal error: {type(exc).__name__}", code="internal_error"))


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the handlers send: every 4xx/5xx is an `ErrorResponse`
    (FastAPI documents a 422 `HTTPValidationError`, which this app never returns: bad input is 400)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error.pop("$defs", {}), ErrorResponse=error)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses["4XX"] = {"description": "Bad input, no or wrong API key, unknown model, or over a limit", "content": content}
                responses["5XX"] = {"description": "Overloaded, unloading, timed out, or out of memory", "content": content}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413, by Content-Length or as they stream."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(f"request body exceeds {self.max_bytes} bytes", code="payload_too_large")
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, too_large)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not response_started:
                await send_error(send, too_large)


class _BodyTooLarge(Exception):
    pass


async def send_error(send: Send, error: APIError) -> None:
    """Answer with `error` from an ASGI middleware (outside FastAPI's handlers)."""
    body = json.dumps(error.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class StrictJSONBody:
    """ASGI middleware: a JSON request body must be strict JSON, else 400 `invalid_json`.

    Python's json module accepts NaN/Infinity, turns 1e400 into inf, keeps the last of duplicate
    keys and lone UTF-16 surrogates; FastAPI answers invalid UTF-8 and deep nesting with a vague
    message. This refuses all of them with a message naming the problem. Duplicate keys are refused
    (not last-wins), so no proxy in front can read a different request than we do. Installed inside
    `BodySizeLimit`, so the body it reads is already bounded.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = json_problem(body) if body else None
        if problem is not None:
            await send_error(send, BadRequestError(f"the request body is not valid JSON: {problem}", code="invalid_json"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. a streaming response waiting for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _is_json(scope: Scope) -> bool:
    """No content type (FastAPI parses those as JSON too), application/json or any +json type."""
    for name, value in scope.get("headers") or []:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True


class _JSONProblem(ValueError):
    pass


def json_problem(body: bytes) -> str | None:
    """Why `body` is not strict JSON, or None when it is."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicates)
    except _JSONProblem as exc:
        return str(exc)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        return f"nested more than {MAX_JSON_DEPTH} levels deep"
    except ValueError:  # Python's limit on integer digits
        return "a number has too many digits"
    return _value_problem(value)


def _refuse_constant(name: str) -> Any:
    raise _JSONProblem(f"{name} is not a JSON number")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JSONProblem(f"duplicate key {key[:64]!r} in an object")
        result[key] = value
    return result


def _value_problem(value: Any) -> str | None:
    """Depth, non-finite or out-of-range numbers, and strings that are not valid Unicode."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nested more than {MAX_JSON_DEPTH} levels deep"
            children = list(item.keys()) + list(item.values()) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
        elif isinstance(item, float) and not math.isfinite(item):
            return "a number is too large for a double"
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_JSON_INTEGER:
            return "an integer is beyond +-2**64"
    return None
