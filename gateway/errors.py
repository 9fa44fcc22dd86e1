"""The gateway's client-facing errors, and OpenAI's error body.

They extend ``transfer.errors``' hierarchy (``FairgateError`` carries the HTTP status and
``code``) with the OpenAI error ``type`` and the ``param`` at fault::

    FairgateError
    └── ClientError                      400 invalid_request_error  invalid_request
        ├── UnsupportedParameter         400                        unsupported_parameter
        ├── ContextLengthExceeded        400                        context_length_exceeded
        ├── EmptyPrompt                  400                        empty_prompt
        ├── InvalidApiKey                401 authentication_error   invalid_api_key
        │   └── KeyExpired               401                        key_expired
        ├── PermissionDenied             403 permission_error       permission_denied
        │   ├── KeyRevoked               403                        key_revoked
        │   └── ClassNotAllowed          403                        slo_class_not_allowed
        ├── NotFound                     404 not_found_error        not_found
        │   └── ModelNotFound            404                        model_not_found
        ├── Conflict                     409 conflict_error         conflict
        ├── RequestTooLarge              413 invalid_request_error  request_too_large
        ├── RateLimited                  429 rate_limit_error       rate_limit_exceeded
        │   ├── QuotaExhausted           429 insufficient_quota     insufficient_quota
        │   └── QueueFull                429 rate_limit_error       queue_full
        └── Unavailable                  503 server_error           unavailable
            ├── NoWorkerAvailable        503                        no_worker
            ├── QueueTimeout             503                        queue_timeout
            ├── RequestShed              503                        request_shed
            └── ShuttingDown             503                        shutting_down

``RateLimited`` and ``Unavailable`` carry ``retry_after_s``, sent as ``Retry-After``: clients
(OpenAI's SDKs among them) retry such answers after that long. A worker's error that reaches a
tenant (``WorkerError``, ``TransferError``) is reported with its own status and code, the type
``server_error`` and a message of ours (``public_error``): never its text, which names internal
addresses; that goes to the log with the request id. Torch-free.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from transfer.errors import FairgateError

if TYPE_CHECKING:  # a type only: gateway.quotas_backend need not load with the errors
    from gateway.quotas_backend import RateLimitState

__all__ = [
    "ClassNotAllowed",
    "ClientError",
    "Conflict",
    "ContextLengthExceeded",
    "EmptyPrompt",
    "InvalidApiKey",
    "KeyExpired",
    "KeyRevoked",
    "ModelNotFound",
    "NoWorkerAvailable",
    "NotFound",
    "OpenAIError",
    "OpenAIErrorBody",
    "PermissionDenied",
    "QueueFull",
    "QueueTimeout",
    "QuotaExhausted",
    "RateLimited",
    "RequestShed",
    "RequestTooLarge",
    "ShuttingDown",
    "Unavailable",
    "UnsupportedParameter",
    "openai_error_body",
    "public_error",
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
    retry_after_s: float | None = None  # sent as Retry-After when set

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameter(ClientError):
    code = "unsupported_parameter"


class ContextLengthExceeded(ClientError):
    code = "context_length_exceeded"


class EmptyPrompt(ClientError):
    """The prompt makes no token (all of its characters are ones the tokenizer drops): there is
    nothing to continue. Like the context length, it depends on the model's tokenizer."""

    code = "empty_prompt"


class InvalidApiKey(ClientError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class KeyExpired(InvalidApiKey):
    """The key is past its ``expires_at``: no longer a credential (401, as an unknown key is),
    and the message says so and when, so that its owner knows to ask for a new one."""

    code = "key_expired"


class PermissionDenied(ClientError):
    status = 403
    code = "permission_denied"
    type = "permission_error"


class KeyRevoked(PermissionDenied):
    code = "key_revoked"


class ClassNotAllowed(PermissionDenied):
    code = "slo_class_not_allowed"


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"


class NotFound(ClientError):
    status = 404
    code = "not_found"
    type = "not_found_error"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ClientError):
    status = 409
    code = "conflict"
    type = "conflict_error"


class RequestTooLarge(ClientError):
    """A body over ``gateway.max_body_bytes``, refused before it is read."""

    status = 413
    code = "request_too_large"


class RateLimited(ClientError):
    """Over a limit that frees up with time: ``retry_after_s`` says when to try again.
    ``rate_limit``: the quota state behind OpenAI's ``x-ratelimit-*`` headers when the quota
    manager raised it (None otherwise)."""

    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        param: str | None = None,
        rate_limit: RateLimitState | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s
        self.rate_limit = rate_limit


class QuotaExhausted(RateLimited):
    """The token budget of the period is spent: ``retry_after_s`` is the end of the period."""

    code = "insufficient_quota"
    type = "insufficient_quota"


class QueueFull(RateLimited):
    """The tenant already has ``scheduler.max_queued_per_tenant`` requests waiting: its own
    backlog, refused at once rather than queued past what the workers can serve in time."""

    code = "queue_full"


class Unavailable(ClientError):
    """The service cannot take this request now; ``retry_after_s`` says when to try again."""

    status = 503
    code = "unavailable"
    type = "server_error"

    def __init__(
        self, message: str, *, retry_after_s: float = 1.0, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class NoWorkerAvailable(Unavailable):
    """No live worker of a role this request needs."""

    code = "no_worker"


class QueueTimeout(Unavailable):
    """The request waited ``scheduler.queue_timeout_s`` for a worker with room."""

    code = "queue_timeout"


class RequestShed(Unavailable):
    """A sheddable request (``batch`` by default) that cannot meet its TTFT deadline, rejected
    early rather than queued forever (``scheduling.md`` §5)."""

    code = "request_shed"


class ShuttingDown(Unavailable):
    """The gateway is stopping: a request it could not finish within the grace period, or one
    that arrived while it drained."""

    code = "shutting_down"


# What a tenant is told when a worker's error ends its request: the worker's own message names
# internal addresses and exception text, so it stays in the log.
_PUBLIC_WORKER_MESSAGES = {
    "worker_unreachable": "a serving worker failed while running this request",
    "request_failed": "the model failed to compute this request",
    "engine_failed": "the serving worker's engine failed",
    "request_timeout": "a serving worker did not answer in time",
    "kv_transfer_failed": "moving this request between serving workers failed",
    "kv_transfer_timeout": "moving this request between serving workers timed out",
    "no_room": "no serving worker had room for this request",
}


def public_error(error: FairgateError, request_id: str) -> FairgateError:
    """The error as a tenant may see it: a ``ClientError`` as it is (its message is ours); any
    other error with its status and code, and a message that names the request id (the log line
    with the worker's own message carries the same id) instead of the worker's text."""
    if isinstance(error, ClientError):
        return error
    message = _PUBLIC_WORKER_MESSAGES.get(error.code, "the request failed on the server")
    # The same class (so the same status and code); every worker and transfer error takes just
    # its message (``transfer.errors.error_from_body`` relies on it too).
    return type(error)(f"{message} (request id {request_id})")


def openai_error_body(error: FairgateError) -> OpenAIErrorBody:
    if isinstance(error, ClientError):
        return OpenAIErrorBody(OpenAIError(error.message, error.type, error.param, error.code))
    return OpenAIErrorBody(OpenAIError(error.message, "server_error", None, error.code))


def retry_after_header(error: FairgateError) -> dict[str, Any]:
    """``Retry-After`` (whole seconds, rounded up) for an error that has one, else nothing."""
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        return {"retry-after": str(max(1, math.ceil(retry_after_s)))}
    return {}
