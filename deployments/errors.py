"""One small hierarchy of picklable API errors: each knows its HTTP status and OpenAI error type.

They cross Ray's process boundary (a model replica raises, the router renders), so every error
pickles with its fields, and the router renders them all through one handler as
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """Base of every error a client may see; never carries a traceback to the client."""

    status_code = 500
    error_type = "internal_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param, self.code, self.headers))

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class BadRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFoundError(APIError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotLoadedError(APIError):
    """The model exists but is not loaded; the client should POST /load (409, as a state conflict)."""

    status_code = 409
    error_type = "invalid_request_error"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class ServiceUnavailableError(APIError):
    """Over capacity or in a transition; always says when to retry (`Retry-After`, 1 s unless the
    raiser computed one)."""

    status_code = 503
    error_type = "service_unavailable_error"
    default_code = "service_unavailable"

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param, code, {"Retry-After": "1", **(headers or {})})


class OverloadedError(ServiceUnavailableError):
    """The model's replicas and queue are full (`max_ongoing_requests` + `max_queued_requests`)."""

    default_code = "overloaded"


class ModelLoadingError(ServiceUnavailableError):
    """The model is loading on this replica; a request for it may wait for the load instead."""

    default_code = "model_loading"


class ModelUnloadingError(ServiceUnavailableError):
    """The model is unloading (or was unloaded under a running request)."""

    default_code = "model_unloading"


class ChannelClosedError(ServiceUnavailableError):
    """The router's channel to the replica closed while one of its requests was running (deployments.channel)."""

    default_code = "channel_closed"


class DeadlineExceededError(APIError):
    """The request's `timeout` (or the server's default) ran out while it queued or ran (504)."""

    status_code = 504
    error_type = "timeout_error"
    default_code = "deadline_exceeded"


class InsufficientMemoryError(APIError):
    """A load that does not fit the device's memory budget even after releasing idle models (507)."""

    status_code = 507
    error_type = "insufficient_storage_error"

