"""How the gateway reaches its workers: the calls it makes on one worker, and what opens them.

    WorkerTransport.connect(url, role) ──▶ WorkerCalls   every worker: load, info (the registry),
                                                         tokenizer (``gateway.tokenizers``)
                                           DecodeCalls   decode and colocated workers also:
                                                         make_room (the dispatcher), generate (a
                                                         colocated run, ``gateway.generation``)

Over HTTP (``HttpWorkerTransport``, the default) these are ``transfer.client``'s clients, all on
one pool of keep-alive connections; a disaggregated run drives the HTTP clients of its prefill
and decode workers through ``transfer.client.run_disaggregated``, which is HTTP's own. A test
gives the registry another transport (scripted workers in the process, say) behind the same
interfaces. The transport is the registry's: ``WorkerRegistry.stop`` closes it.

Errors are ``FairgateError``s naming the worker (``FairgateError.worker_url``), as
``transfer.client`` raises them. Torch-free.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from transfer.client import Connections, DecodeClient, PrefillClient
from transfer.messages import (
    GenerateRequest,
    MakeRoomResult,
    Preempted,
    Priority,
    Reserved,
    TokenFrame,
    TokenizerSpec,
    WorkerInfo,
    WorkerLoad,
    WorkerRole,
)

__all__ = ["DecodeCalls", "FrameSource", "HttpWorkerTransport", "WorkerCalls", "WorkerTransport"]


class FrameSource(Protocol):
    """One request's frames from a worker (``transfer.client.FrameStream``): iterating yields
    ``TokenFrame``s (and a last ``Preempted`` for a request handed back), and raises the error
    that ended the stream."""

    def __aiter__(self) -> AsyncIterator[Reserved | TokenFrame | Preempted]: ...


class WorkerCalls(Protocol):
    """What the gateway calls on any worker (``transfer.client.WorkerClient``)."""

    async def load(
        self, *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        """Its load; with ``evictions_since``, its prefix-cache evictions from that number on."""
        ...

    async def info(self) -> WorkerInfo: ...

    async def tokenizer(self, *, timeout_s: float | None = None) -> TokenizerSpec:
        """What its tokenizer is built from (its digest: ``WorkerInfo.tokenizer_digest``)."""
        ...


@runtime_checkable
class DecodeCalls(WorkerCalls, Protocol):
    """What the gateway also calls on a decode or colocated worker
    (``transfer.client.DecodeClient``)."""

    async def make_room(self, num_tokens: int, priority: Priority) -> MakeRoomResult:
        """Preempt what is less important than ``priority`` until ``num_tokens`` KV token slots
        are free or nothing is left to preempt."""
        ...

    def generate(
        self, request: GenerateRequest, *, traceparent: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[FrameSource]:
        """A colocated worker's run of the whole request; leaving the ``async with`` early
        aborts it there."""
        ...


class WorkerTransport(Protocol):
    """Opens the calls to each worker. ``connect`` gives a ``DecodeCalls`` for a decode or
    colocated worker; ``aclose`` ends what every worker's calls share."""

    def connect(self, url: str, role: WorkerRole) -> WorkerCalls: ...

    async def aclose(self) -> None: ...


class HttpWorkerTransport:
    """The workers over HTTP: ``transfer.client``'s clients, one pool of connections for all."""

    def __init__(self) -> None:
        self._connections = Connections()

    def connect(self, url: str, role: WorkerRole) -> WorkerCalls:
        if role == "prefill":
            return PrefillClient(url, connections=self._connections)
        decode: DecodeCalls = DecodeClient(url, connections=self._connections)
        return decode

    async def aclose(self) -> None:
        await self._connections.aclose()
