"""One request's life in the gateway, as the dispatcher (``gateway.dispatch``) keeps it: where it
runs, how far it got, and how often it had to move. The dispatcher owns every ledger; the
request's ``Generation`` (``gateway.generation``) only reports what happened on its workers
(first token, tokens, left its pair, failed), and the dispatcher settles the worker accounts,
the policy and the registry from that, once, and decides whether a failed request goes on
elsewhere.

    new ──submit──▶ queued ──placed──▶ prefill ──first token──▶ decode ──finished──▶ ended
                      ▲                   │                       │
                      └──── submit ◀──── off (handed back or failed; queued again or ended)

Which failures move a request (``is_migratable``): its worker died, hung, restarted or dropped
the stream (``WorkerUnreachable``, ``EngineFailed``, ``WorkerNotReady``, ``RequestAborted``), its
KV did not arrive (``RequestTimeout``, ``TransferError``): none is the request's own doing.
Those of the request's own (``InvalidWorkerRequest``, ``RequestFailed``) end it. ``NoRoomError``
moves it without counting: the gateway's view of the worker was old.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gateway.scheduler import QueuedRequest
from transfer.errors import (
    EngineFailed,
    FairgateError,
    RequestAborted,
    RequestTimeout,
    TransferError,
    WorkerNotReady,
    WorkerUnreachable,
)

if TYPE_CHECKING:
    from gateway.workers import WorkerHandle

__all__ = ["RequestLedger", "Stage", "WorkerPair", "is_migratable"]

Stage = Literal["new", "queued", "prefill", "decode", "off", "ended"]

_MIGRATABLE = (
    WorkerUnreachable,
    EngineFailed,
    WorkerNotReady,
    RequestAborted,
    RequestTimeout,
    TransferError,
)


def is_migratable(error: FairgateError) -> bool:
    """Whether a request that failed with ``error`` may go on elsewhere (module docstring)."""
    return isinstance(error, _MIGRATABLE)


@dataclass(frozen=True, slots=True)
class WorkerPair:
    """Where a request runs: a prefill and a decode worker, or one colocated worker (``prefill``
    None); and what the placement saw: the prefix the policy expects the prefill worker to
    hold (for traces) and the tenant's counter (the priority the workers get, and traces)."""

    prefill: WorkerHandle | None
    decode: WorkerHandle
    num_expected_cached_tokens: int = field(default=0, compare=False)
    counter: float = field(default=0.0, compare=False)

    def handle_of(self, worker_url: str | None) -> WorkerHandle | None:
        """The worker of this pair at ``worker_url`` (an error's ``worker_url``), if any."""
        for handle in (self.prefill, self.decode):
            if handle is not None and handle.url == worker_url:
                return handle
        return None

    def __contains__(self, handle: object) -> bool:
        return handle is self.prefill or handle is self.decode


@dataclass(eq=False, slots=True)
class RequestLedger:
    """One request, from its first ``submit`` to its end (module docstring). ``on_lost``: how
    the dispatcher stops the request's run when its worker is found lost (dead, hung,
    restarted, removed) while the request runs there; the run then fails with that error."""

    request: QueuedRequest
    received: float  # monotonic
    on_lost: Callable[[FairgateError], None] | None = None
    stage: Stage = "new"
    pair: WorkerPair | None = None
    # Output tokens the workers sent, over every placement (what the policy and usage count).
    num_output_tokens: int = 0
    num_migrations: int = 0  # moves off a failed worker
    num_placements: int = 0
    num_frames_here: int = 0  # token frames from the current pair (the first: the prefill's)
    progressed_at: float | None = None  # monotonic time of its last token
    # The registry's error when it found the request's worker lost (``Dispatcher.worker_lost``):
    # the worker is marked already, so ``Dispatcher.failed`` leaves it alone.
    lost_error: FairgateError | None = None

    def runs_on(self, handle: WorkerHandle) -> bool:
        """Whether losing ``handle`` stops the request: it is on the pair, and, for its prefill
        worker, the KV has not landed on the decode worker yet (a token came from there) while
        the prefill worker may still be sending it. A drained prefill worker is sending nothing
        (its own report and the gateway's count agree: ``gateway.workers``): the KV of every
        request it prefilled has left it, so its removal stops none of them, even before their
        decode worker's first token says so."""
        pair = self.pair
        if self.stage not in ("prefill", "decode") or pair is None:
            return False
        if handle is pair.prefill and handle is not pair.decode:
            if self.stage == "prefill":
                return True
            return self.num_frames_here <= 1 and handle.state != "drained"
        return handle in pair
