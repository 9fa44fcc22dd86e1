"""The gateway's client-facing errors, and OpenAI's error body.

They extend ``transfer.errors``' hierarchy (``FairgateError`` carries the HTTP status and
``code``) with the OpenAI error ``type`` and the ``param`` at fault::

    FairgateError
    └── ClientError                      400 invalid_request_error  invalid_request
        ├── UnsupportedParameter         400                        unsupported_parameter
        ├── ContextLengthExceeded        400                        context_length_exceeded
        ├── InvalidApiKey                401 authentication_error   invalid_api_key
        ├── PermissionDenied             403 permission_error       permission_denied
        │   ├── KeyRevoked               403                        key_revoked
        │   └── ClassNotAllowed          403                        slo_class_not_allowed
        ├── NotFound                     404 not_found_error        not_found
        │   └── ModelNotFound            404                        model_not_found
        ├── Conflict                     409 conflict_error         conflict
        ├── RateLimited                  429 rate_limit_error       rate_limit_exceeded
        │   └── QuotaExhausted           429 insufficient_quota     insufficient_quota
        └── NoWorkerAvailable            503 server_error           no_worker

A worker's error that reaches a tenant (``WorkerError``, ``TransferError``) is reported with its
own status and code and the type ``server_error``. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import msgspec

from transfer.errors import FairgateError

__all__ = [
    "ClassNotAllowed",
    "ClientError",
    "Conflict",
    "ContextLengthExceeded",
    "InvalidApiKey",
    "KeyRevoked",
    "ModelNotFound",
    "NoWorkerAvailable",
    "NotFound",
    "OpenAIError",
    "OpenAIErrorBody",
    "PermissionDenied",
    "QuotaExhausted",
    "RateLimited",
    "UnsupportedParameter",
    "openai_error_body",
    "retry_after_header",
]


class OpenAIError(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(msgspec.Struct, frozen=True):
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers errors."""

    error: OpenAIError


class ClientError(FairgateError):
    status = 400
    code = "invalid_request"
    type: ClassVar[str] = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameter(ClientError):
    code = "unsupported_parameter"


class ContextLengthExceeded(ClientError):
    code = "context_length_exceeded"


class InvalidApiKey(ClientError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class PermissionDenied(ClientError):
    status = 403
    code = "permission_denied"
    type = "permission_error"


class KeyRevoked(PermissionDenied):
    code = "key_revoked"


class ClassNotAllowed(PermissionDenied):
    code = "slo_class_not_allowed"


class NotFound(ClientError):
    status = 404
    code = "not_found"
    type = "not_found_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ClientError):
    status = 409
    code = "conflict"
    type = "conflict_error"


class RateLimited(ClientError):
    """Over a limit that frees up with time: ``retry_after_s`` says when to try again."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class QuotaExhausted(RateLimited):
    """The token budget of the period is spent: ``retry_after_s`` is the end of the period."""

    code = "insufficient_quota"
    type = "insufficient_quota"


class NoWorkerAvailable(ClientError):
    status = 503
    code = "no_worker"
    type = "server_error"


class RequestShed(ClientError):
    """A sheddable request (``batch`` by default) that cannot meet its TTFT deadline, rejected
    early rather than queued forever (``scheduling.md`` §5)."""

    status = 503
    code = "request_shed"
    type = "server_error"


def openai_error_body(error: FairgateError) -> OpenAIErrorBody:
    if isinstance(error, ClientError):
        return OpenAIErrorBody(OpenAIError(error.message, error.type, error.param, error.code))
    return OpenAIErrorBody(OpenAIError(error.message, "server_error", None, error.code))


def retry_after_header(error: FairgateError) -> dict[str, Any]:
    """``Retry-After`` (whole seconds, rounded up) for a ``RateLimited`` error, else nothing."""
    if isinstance(error, RateLimited):
        return {"retry-after": str(max(1, math.ceil(error.retry_after_s)))}
    return {}
