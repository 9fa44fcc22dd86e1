"""fairgate's error hierarchy, and how errors cross process boundaries.

Every error fairgate raises on purpose is a ``FairgateError``. Each class carries the HTTP status
and the machine-readable ``code`` it is reported with, so a worker turns it into an ``ErrorBody``
at its HTTP boundary and a client turns that body back into the same class (``error_from_body``)::

    FairgateError                       500 internal_error
    ├── WorkerError                     500 worker_error        a worker could not do the work
    │   ├── InvalidWorkerRequest        400 invalid_request     the request itself is wrong
    │   ├── UnknownRequest              404 unknown_request     no such request id here
    │   ├── NoRoomError                 503 no_room             no KV room or batch slot now
    │   ├── WorkerNotReady              503 not_ready           model not loaded, or stopping
    │   ├── WorkerUnreachable           503 worker_unreachable  no answer, or the answer broke off
    │   ├── WrongRole                   409 wrong_role          e.g. a prompt for a decode worker
    │   ├── RequestTimeout              504 request_timeout     e.g. the KV never arrived
    │   ├── RequestAborted              409 aborted             aborted while a caller waited
    │   ├── RequestFailed               500 request_failed      the engine could not compute this
    │   │                                                       request; it goes on with others
    │   └── EngineFailed                500 engine_failed       the engine thread died
    └── TransferError                   502 kv_transfer_failed  the KV data plane failed
        ├── IncompatiblePeer            409 kv_incompatible     handshake refused: shapes differ
        └── TransferTimeout             504 kv_transfer_timeout a wait on the data plane expired

The gateway's client-facing errors (bad parameters, auth, quotas) subclass ``FairgateError`` in
``gateway/``. Foreign exceptions are translated where they enter (``raise X(...) from exc``).
Torch-free.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = [
    "EngineFailed",
    "ErrorBody",
    "FairgateError",
    "IncompatiblePeer",
    "InvalidWorkerRequest",
    "NoRoomError",
    "RequestAborted",
    "RequestFailed",
    "RequestTimeout",
    "TransferError",
    "TransferTimeout",
    "UnknownRequest",
    "WorkerError",
    "WorkerNotReady",
    "WorkerUnreachable",
    "WrongRole",
    "error_from_body",
]


class ErrorBody(msgspec.Struct, frozen=True):
    """An error on the wire (worker → caller): the body of a non-2xx response, or the last frame
    of a stream that failed after it started."""

    code: str
    message: str


class FairgateError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, worker_url: str | None = None) -> None:
        """``worker_url``: the worker whose call raised it (set by ``transfer.client``; never
        on the wire), so the caller knows which worker failed without reading the text."""
        super().__init__(message)
        self.message = message
        self.worker_url = worker_url

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message)


class WorkerError(FairgateError):
    code = "worker_error"


class InvalidWorkerRequest(WorkerError):
    status = 400
    code = "invalid_request"


class UnknownRequest(WorkerError):
    status = 404
    code = "unknown_request"


class NoRoomError(WorkerError):
    status = 503
    code = "no_room"


class WorkerNotReady(WorkerError):
    status = 503
    code = "not_ready"


class WorkerUnreachable(WorkerError):
    status = 503
    code = "worker_unreachable"


class WrongRole(WorkerError):
    status = 409
    code = "wrong_role"


class RequestTimeout(WorkerError):
    status = 504
    code = "request_timeout"


class RequestAborted(WorkerError):
    status = 409
    code = "aborted"


class RequestFailed(WorkerError):
    """This request failed in the engine (non-finite output, or the model raised on it alone);
    the worker serves the others. Final for the request: placing it again would fail again."""

    code = "request_failed"


class EngineFailed(WorkerError):
    """The worker's engine is dead: the worker cannot serve anything until it is restarted."""

    code = "engine_failed"


class TransferError(FairgateError):
    status = 502
    code = "kv_transfer_failed"


class IncompatiblePeer(TransferError):
    status = 409
    code = "kv_incompatible"


class TransferTimeout(TransferError):
    status = 504
    code = "kv_transfer_timeout"


def _all_subclasses(cls: type[FairgateError]) -> list[type[FairgateError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_from_body(body: ErrorBody) -> FairgateError:
    """The exception a received ``ErrorBody`` stands for (``FairgateError`` for unknown codes)."""
    for cls in _all_subclasses(FairgateError):
        if cls.code == body.code:
            return cls(body.message)
    return FairgateError(f"{body.code}: {body.message}")
