"""The workers the gateway places requests on: who they are, whether they answer, how loaded they
are.

``WorkerRegistry`` polls every configured worker's ``/v1/load`` (and ``/v1/info`` whenever a
worker comes up or restarts) on one background task, and keeps the gateway's own live count of
what it sent each worker since (a load report is up to one poll interval old; the gateway's
dispatches are not). A call that finds a worker unreachable marks it ``dead`` at once; the next
successful poll brings it back. Every worker must serve the same model and protocol version as
the first one seen; one that does not stays ``incompatible`` (with the reason), never used.

States::

    unknown ──poll ok──▶ ready ◀──poll ok── dead / not_ready
                           │ poll fails, or a call finds it unreachable
                           ▼
                          dead

Torch-free; one event loop, no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from gateway.core import WorkerAccount
from transfer.client import Connections, DecodeClient, PrefillClient, WorkerClient
from transfer.errors import FairgateError
from transfer.messages import PROTOCOL_VERSION, WorkerInfo, WorkerLoad, WorkerRole

__all__ = ["WorkerHandle", "WorkerRegistry", "WorkerState", "WorkerStatus"]

logger = logging.getLogger(__name__)

WorkerState = Literal["unknown", "ready", "not_ready", "dead", "incompatible"]

POLL_TIMEOUT_S = 2.0


class WorkerStatus(msgspec.Struct, frozen=True):
    """A worker as the admin API shows it."""

    url: str
    state: WorkerState
    role: WorkerRole | None
    worker_id: str | None
    model_id: str | None
    inflight_requests: int
    inflight_tokens: int
    load: WorkerLoad | None
    last_error: str | None
    last_seen_s_ago: float | None


@dataclass(slots=True, eq=False, kw_only=True)
class WorkerHandle(WorkerAccount):
    """One worker as the gateway knows it: its scheduling account (``gateway.core``: its last
    reports and the gateway's own count of what it placed and ended there since) and how to
    reach it."""

    url: str
    client: WorkerClient
    state: WorkerState = "unknown"
    last_error: str | None = None
    last_seen: float | None = None  # monotonic time of the last answer
    poll_failures: int = 0
    # The number of the next prefix-cache eviction to ask for; None until the first report.
    eviction_seq: int | None = None
    # One load poll at a time: a report that lands after a newer one would undo it.
    poll_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def role(self) -> WorkerRole | None:
        return None if self.info is None else self.info.role

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info is not None else self.url

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def prefill_client(self) -> PrefillClient:
        assert isinstance(self.client, PrefillClient)
        return self.client

    @property
    def decode_client(self) -> DecodeClient:
        assert isinstance(self.client, DecodeClient)
        return self.client

    def status(self, now: float) -> WorkerStatus:
        return WorkerStatus(
            url=self.url,
            state=self.state,
            role=self.role,
            worker_id=None if self.info is None else self.info.worker_id,
            model_id=None if self.info is None else self.info.model_id,
            inflight_requests=self.inflight_requests,
            inflight_tokens=self.inflight_tokens,
            load=self.load,
            last_error=self.last_error,
            last_seen_s_ago=None if self.last_seen is None else round(now - self.last_seen, 3),
        )


class WorkerRegistry:
    """Every configured worker, polled. ``on_change`` is called (on the loop) whenever a worker's
    state or load changes, so the dispatcher can place waiting requests."""

    def __init__(
        self,
        prefill_urls: Sequence[str],
        decode_urls: Sequence[str],
        colocated_urls: Sequence[str] = (),
        *,
        poll_interval_s: float = 0.5,
        on_change: Callable[[], None] = lambda: None,
        on_evicted: Callable[[str, list[bytes]], None] = lambda worker_id, hashes: None,
    ) -> None:
        """``on_evicted(worker_id, block_hashes)``: a worker dropped these prefix-cache blocks
        since its last report (the policy corrects its prefix index)."""
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.on_evicted = on_evicted
        # One pool for every worker call: connections are reused across requests.
        self._connections = pool = Connections()
        self.handles: list[WorkerHandle] = [
            *(
                WorkerHandle(url=url, client=PrefillClient(url, connections=pool))
                for url in prefill_urls
            ),
            *(
                WorkerHandle(url=url, client=DecodeClient(url, connections=pool))
                for url in decode_urls
            ),
            *(
                WorkerHandle(url=url, client=DecodeClient(url, connections=pool))
                for url in colocated_urls
            ),
        ]
        self._expected_roles: dict[str, WorkerRole] = {
            **dict.fromkeys(prefill_urls, "prefill"),
            **dict.fromkeys(decode_urls, "decode"),
            **dict.fromkeys(colocated_urls, "colocated"),
        }
        self.reference: WorkerInfo | None = None  # the first worker seen fixes model and shapes
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # ``mark_dead``'s polls in flight

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="worker-registry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        checks = list(self._checks)
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        await self._connections.aclose()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until at least one worker of every needed role is ready; ``TimeoutError`` if not."""
        deadline = time.monotonic() + timeout_s
        while not self.can_serve():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ready workers within {timeout_s:g} s: {self.summary()}")
            await asyncio.sleep(self.poll_interval_s)

    # ---- queries ----------------------------------------------------------------------------

    def ready(self, role: WorkerRole) -> list[WorkerHandle]:
        return [h for h in self.handles if h.is_ready and h.role == role]

    def can_serve(self) -> bool:
        """A prefill and a decode worker are ready, or a colocated one."""
        return bool(self.ready("colocated")) or (
            bool(self.ready("prefill")) and bool(self.ready("decode"))
        )

    @property
    def model_id(self) -> str | None:
        return None if self.reference is None else self.reference.model_id

    @property
    def max_model_len(self) -> int:
        """The longest sequence every ready worker takes (0 when none is ready)."""
        lengths = [h.info.max_model_len for h in self.handles if h.is_ready and h.info]
        return min(lengths, default=0)

    def statuses(self) -> list[WorkerStatus]:
        now = time.monotonic()
        return [h.status(now) for h in self.handles]

    def summary(self) -> str:
        return (
            ", ".join(
                f"{h.url} {h.state}" + (f" ({h.last_error})" if h.last_error else "")
                for h in self.handles
            )
            or "no workers configured"
        )

    # ---- events from callers ----------------------------------------------------------------

    def mark_dead(self, handle: WorkerHandle, error: FairgateError) -> None:
        """A call found the worker unreachable: stop placing on it until a poll succeeds, and
        poll it at once (one failed call may be a reset connection to a live worker, which then
        comes back without waiting for the next round)."""
        if handle.state != "dead":
            logger.warning("worker %s marked dead: %s", handle.url, error.message)
        handle.state = "dead"
        handle.last_error = error.message
        self.on_change()
        if self._task is not None:  # started: on a loop, and stopped by ``stop``
            check = asyncio.get_running_loop().create_task(self.refresh(handle))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def refresh(self, handle: WorkerHandle) -> None:
        """Poll one worker now (its load changed in a way the gateway cannot count itself);
        after a poll already in flight, whose report may predate the change."""
        await self._poll(handle)
        self.on_change()

    def mark_full(self, handle: WorkerHandle) -> None:
        """A decode worker answered "no room": no more reservations there until it reports."""
        handle.is_full = True

    # ---- polling ----------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.poll_once()

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(h) for h in self.handles))
        self.on_change()

    async def _poll(self, handle: WorkerHandle) -> None:
        async with handle.poll_lock:
            await self._poll_now(handle)

    async def _poll_now(self, handle: WorkerHandle) -> None:
        try:
            # The first report only says where the eviction log stands: what the worker evicted
            # before the gateway knew it is nothing its prefix index holds.
            load = await handle.client.load(
                timeout_s=POLL_TIMEOUT_S, evictions_since=handle.eviction_seq
            )
            if handle.state in ("unknown", "dead", "not_ready", "incompatible") and load.ready:
                # (Re)started: learn who it is before placing anything there.
                info = await handle.client.info()
                problem = self._incompatibility(handle, info)
                handle.info = info
                if problem is not None:
                    handle.state, handle.last_error = "incompatible", problem
                    handle.load = load
                    return
        except FairgateError as exc:
            handle.poll_failures += 1
            if handle.state != "dead":
                logger.warning("worker %s does not answer: %r", handle.url, exc)
            handle.state = "dead" if handle.state != "unknown" else "unknown"
            handle.last_error = f"poll failed: {exc!r}"
            return
        handle.poll_failures = 0
        handle.last_seen = time.monotonic()
        handle.reported(load)
        self._note_evictions(handle, load)
        if load.ready:
            if handle.state != "ready":
                logger.info("worker %s (%s) is ready", handle.url, handle.role)
            handle.state, handle.last_error = "ready", None
        else:
            handle.state = "not_ready"

    def _note_evictions(self, handle: WorkerHandle, load: WorkerLoad) -> None:
        """Hand the report's evictions on and read on from where it ends. A report that missed
        some (the worker restarted, or polls fell far behind) leaves the index staler until LRU
        catches up: it only costs locality, never correctness."""
        if not load.ready:
            return
        handle.eviction_seq = load.eviction_seq
        if load.evictions_missed:
            logger.info("worker %s: some prefix-cache evictions were missed", handle.url)
        if load.evicted_block_hashes and handle.info is not None:
            self.on_evicted(handle.info.worker_id, load.evicted_block_hashes)

    def _incompatibility(self, handle: WorkerHandle, info: WorkerInfo) -> str | None:
        expected = self._expected_roles[handle.url]
        if info.role != expected:
            return f"configured as a {expected} worker but it is a {info.role} worker"
        if info.protocol_version != PROTOCOL_VERSION:
            return (
                f"protocol version {info.protocol_version}, the gateway speaks {PROTOCOL_VERSION}"
            )
        if self.reference is None:
            self.reference = info
            return None
        if info.model_id != self.reference.model_id:
            return f"serves {info.model_id!r}, the other workers {self.reference.model_id!r}"
        if info.block_size != self.reference.block_size:
            # The prefix index is kept in one block size (``SchedulingPolicy.set_block_size``).
            return (
                f"uses KV blocks of {info.block_size} tokens, the other workers "
                f"{self.reference.block_size}"
            )
        return None
