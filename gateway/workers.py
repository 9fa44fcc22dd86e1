"""The workers the gateway places requests on: who they are, whether they answer and get on with
their work, how loaded they are, and which of them take new requests.

``WorkerRegistry`` holds the configured workers and those added since, by the admin API
(``gateway.admin``) or by a worker registering itself (``fairgate *-worker --gateway URL``,
``transfer.registration``). It polls every one's ``/v1/load`` (and ``/v1/info`` when a worker
comes up, may have restarted, or is on probation) on one background task, and keeps the
gateway's own live count of what it sent each worker since (a load report is up to one poll
interval old; the gateway's dispatches are not). Each handle's ``ProgressWatch``
(``gateway.liveness``) judges its reports for a wedged engine. Workers are called through the
registry's ``WorkerTransport`` (``gateway.worker_transport``: HTTP unless it is given another).

States (``WorkerStatus.state``); only ``ready`` takes new requests:

    state         how it gets there, and out
    unknown       added; it never answered yet
    ready         a poll found it ready, and no drain is asked
    draining      the admin asked to drain it: what runs there goes on, nothing new goes there
    drained       draining, and nothing is left on it: the gateway's count of requests there is
                  0 and its report agrees (nothing running, reserved, waiting, swapped out or
                  being sent); ``undrain`` makes it ready again
    not_ready     it answers, but its model is still loading or its engine stopped
    ejected       it had work and completed no engine step past its progress deadline. Circuit
                  breaker: open until ``RECOVERY_POLLS`` polls in a row (half-open) find it
                  ready and either completing steps or without work; then closed (ready)
    dead          a poll failed or timed out, or a call found it unreachable; back at the
                  first poll that finds it ready (one failed call may be a reset connection)
    incompatible  wrong role, protocol or block size, another worker's id, or unlike the
                  pool of its model (``gateway.pools``: KV layout, tokenizer); checked again on
                  every poll, so a worker restarted right comes back

Models: each worker is in the pool of the model it announces (``ModelPools``); the queries take
a model (``ready(role, model)``, ``can_serve(model)``, ``max_model_len(model)``), so a prefill
worker is only ever paired with a decode worker of its own model.

A drain asked of a worker that is dead or not ready holds until it is back (it then comes back
draining). Nothing but a successful poll brings a worker back.

Lost workers: ``on_lost(handle, error)`` is called (on the loop) when a worker that may hold
requests placed here is judged to have lost them or to be unable to finish them: a poll fails
or times out (a ``SIGSTOP``ped worker), its engine stops, it is ejected, it restarted (its
``instance_id`` changed), or it is removed. Once per loss: not again until it has been usable
since. ``error`` is a ``WorkerUnreachable`` naming the worker and why (for logs; it holds the
internal URL). A call that fails (``mark_dead``) is no loss by itself: the poll it triggers at
once decides.

Sources: ``config`` (the configuration), ``admin`` (added by URL), ``registered`` (the worker
registered itself and renews its registration, a heartbeat; a registered worker that stopped
renewing for ``LEASE_HEARTBEATS`` heartbeat intervals and does not answer its polls is
removed). A worker the admin removes is refused when it registers again, until the admin adds it.

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
from gateway.errors import ClientError, Conflict
from gateway.liveness import ProgressWatch
from gateway.pools import ModelPools
from gateway.worker_transport import DecodeCalls, HttpWorkerTransport, WorkerCalls, WorkerTransport
from transfer.client import DecodeClient, PrefillClient
from transfer.errors import FairgateError, WorkerUnreachable
from transfer.messages import PROTOCOL_VERSION, WorkerInfo, WorkerLoad, WorkerRole
from transfer.registration import is_worker_url

__all__ = [
    "WorkerHandle",
    "WorkerRegistry",
    "WorkerSource",
    "WorkerState",
    "WorkerStatus",
    "check_worker_url",
]

logger = logging.getLogger(__name__)

WorkerState = Literal[
    "unknown", "ready", "draining", "drained", "not_ready", "ejected", "dead", "incompatible"
]
WorkerSource = Literal["config", "admin", "registered", "dns"]

POLL_TIMEOUT_S = 2.0  # a poll's calls together; a worker silent for longer is dead
RECOVERY_POLLS = 3  # healthy polls in a row that bring an ejected worker back
LEASE_HEARTBEATS = 3.0  # a registration lasts this many of the worker's heartbeat intervals
MAX_WORKERS = 256  # an admin or registration past this many is refused (409)
# The states in which a worker answers and runs its engine: requests placed here may be on it.
_USABLE: tuple[WorkerState, ...] = ("ready", "draining", "drained")


def check_worker_url(url: str) -> str:
    """``url`` without a trailing ``/``; ``ClientError`` (400, param ``url``) when it is not a
    worker URL (``transfer.registration.WORKER_URL_PATTERN``)."""
    if not is_worker_url(url):
        raise ClientError(
            "url must be a worker's base URL: http(s)://HOST[:PORT][/PATH], HOST a name or an "
            "IPv4 address",
            param="url",
        )
    return url.rstrip("/")


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
    source: WorkerSource = "config"
    drain_requested: bool = False  # stays asked while it is dead or not ready
    precision: str | None = None  # the arithmetic it runs (``WorkerInfo.precision``)


@dataclass(slots=True, eq=False, kw_only=True)
class WorkerHandle(WorkerAccount):
    """One worker as the gateway knows it: its scheduling account (``gateway.core``: its last
    reports and the gateway's own count of what it placed and ended there since), how to reach
    it, and where it stands (module docstring)."""

    url: str
    client: WorkerCalls  # ``WorkerTransport.connect``'s
    expected_role: WorkerRole
    progress: ProgressWatch
    source: WorkerSource = "config"
    state: WorkerState = "unknown"
    last_error: str | None = None
    last_seen: float | None = None  # the registry's clock at its last answer
    poll_failures: int = 0
    # The number of the next prefix-cache eviction to ask for; None until the first report.
    eviction_seq: int | None = None
    # One load poll at a time: a report that lands after a newer one would undo it.
    poll_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    drain_requested: bool = False
    # Usable since the last loss: requests placed here may be on it (``on_lost`` is due).
    may_hold_requests: bool = False
    is_removed: bool = False
    # Ejected: healthy polls in a row so far, and the step count of the last report.
    num_healthy_polls: int = 0
    probe_num_steps: int = 0
    lease_until: float | None = None  # registered: when its registration lapses

    @property
    def role(self) -> WorkerRole:
        return self.expected_role if self.info is None else self.info.role

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info is not None else self.url

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def prefill_client(self) -> PrefillClient:
        """A prefill worker's HTTP client: a disaggregated run is HTTP's own
        (``gateway.worker_transport``)."""
        assert isinstance(self.client, PrefillClient)
        return self.client

    @property
    def decode_client(self) -> DecodeCalls:
        # The HTTP client's class first: checking a runtime protocol takes microseconds.
        assert isinstance(self.client, DecodeClient | DecodeCalls)
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
            source=self.source,
            drain_requested=self.drain_requested,
            precision=None if self.info is None else self.info.precision or None,
        )


def _is_idle(handle: WorkerHandle, load: WorkerLoad) -> bool:
    """Nothing left on the worker: by the gateway's count and by its own report."""
    return handle.inflight_requests == 0 and not (
        load.num_running
        or load.num_waiting
        or load.num_reserved
        or load.num_swapped
        or load.num_pending_transfers
    )


class WorkerRegistry:
    """Every known worker, polled. ``on_change`` is called (on the loop) whenever a worker's
    state or load changes, so the dispatcher can place waiting requests; ``on_lost`` when a
    worker's requests are lost (module docstring)."""

    def __init__(
        self,
        prefill_urls: Sequence[str],
        decode_urls: Sequence[str],
        colocated_urls: Sequence[str] = (),
        *,
        poll_interval_s: float = 0.5,
        on_change: Callable[[], None] = lambda: None,
        on_evicted: Callable[[str, list[bytes]], None] = lambda worker_id, hashes: None,
        on_lost: Callable[[WorkerHandle, FairgateError], None] = lambda handle, error: None,
        progress_deadline_steps: float = 50.0,
        min_progress_deadline_s: float = 5.0,
        unmeasured_progress_deadline_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        transport: WorkerTransport | None = None,
    ) -> None:
        """``on_evicted(worker_id, block_hashes)``: a worker dropped these prefix-cache blocks
        since its last report (the policy corrects its prefix index). The progress deadline:
        ``gateway.liveness.ProgressWatch``. ``clock``: monotonic seconds (leases, deadlines).
        ``transport``: how the workers are called (default: HTTP); ``stop`` closes it."""
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.on_evicted = on_evicted
        self.on_lost = on_lost
        self.progress_deadline_steps = progress_deadline_steps
        self.min_progress_deadline_s = min_progress_deadline_s
        self.unmeasured_progress_deadline_s = unmeasured_progress_deadline_s
        self.clock = clock
        # One pool for every worker call over HTTP: connections are reused across requests.
        self.transport: WorkerTransport = HttpWorkerTransport() if transport is None else transport
        self.handles: list[WorkerHandle] = []
        roles: list[tuple[Sequence[str], WorkerRole]] = [
            (prefill_urls, "prefill"),
            (decode_urls, "decode"),
            (colocated_urls, "colocated"),
        ]
        for urls, role in roles:
            for url in urls:
                if self.find_url(url) is not None:
                    raise ValueError(f"worker {url} is configured twice")
                self.handles.append(self._new_handle(url.rstrip("/"), role, "config"))
        self.pools = ModelPools()  # the models served, and what each was announced as
        self._removed_by_admin: set[str] = set()  # refused when they register again
        self._task: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # polls of single workers in flight
        self._checking: set[WorkerHandle] = set()  # the workers those are for

    def _new_handle(self, url: str, role: WorkerRole, source: WorkerSource) -> WorkerHandle:
        return WorkerHandle(
            url=url,
            client=self.transport.connect(url, role),
            expected_role=role,
            source=source,
            progress=ProgressWatch(
                deadline_steps=self.progress_deadline_steps,
                min_deadline_s=self.min_progress_deadline_s,
                unmeasured_deadline_s=self.unmeasured_progress_deadline_s,
            ),
        )

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
        await self.transport.aclose()

    async def wait_ready(self, timeout_s: float) -> None:
        """Until at least one worker of every needed role is ready; ``TimeoutError`` if not."""
        deadline = time.monotonic() + timeout_s
        while not self.can_serve():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ready workers within {timeout_s:g} s: {self.summary()}")
            await asyncio.sleep(self.poll_interval_s)

    # ---- queries ----------------------------------------------------------------------------

    def ready(self, role: WorkerRole, model: str | None = None) -> list[WorkerHandle]:
        """The workers of ``role`` that take new requests; of ``model`` only, unless None."""
        return [
            h
            for h in self.handles
            if h.is_ready
            and h.role == role
            and (model is None or (h.info is not None and h.info.model_id == model))
        ]

    def can_serve(self, model: str | None = None) -> bool:
        """A prefill and a decode worker of ``model`` are ready, or a colocated one. ``None``:
        of some model (the gateway can answer something)."""
        if model is None:
            return any(self.can_serve(known) for known in self.pools.model_ids())
        return bool(self.ready("colocated", model)) or (
            bool(self.ready("prefill", model)) and bool(self.ready("decode", model))
        )

    def model_ids(self) -> list[str]:
        """Every model a worker announced, live or not, in the order first seen."""
        return self.pools.model_ids()

    def max_model_len(self, model: str) -> int:
        """The longest sequence every ready worker of ``model`` takes (0 when none is ready)."""
        lengths = [
            h.info.max_model_len
            for h in self.handles
            if h.is_ready and h.info is not None and h.info.model_id == model
        ]
        return min(lengths, default=0)

    def find_url(self, url: str) -> WorkerHandle | None:
        url = url.rstrip("/")
        return next((h for h in self.handles if h.url == url), None)

    def find(self, name: str) -> WorkerHandle | None:
        """The worker of this URL, else of this worker id."""
        found = self.find_url(name)
        if found is None:
            found = next(
                (h for h in self.handles if h.info is not None and h.info.worker_id == name), None
            )
        return found

    def statuses(self) -> list[WorkerStatus]:
        now = self.clock()
        return [h.status(now) for h in self.handles]

    def summary(self) -> str:
        return (
            ", ".join(
                f"{h.url} {h.state}" + (f" ({h.last_error})" if h.last_error else "")
                for h in self.handles
            )
            or "no workers configured"
        )

    # ---- membership -------------------------------------------------------------------------

    def add(
        self,
        url: str,
        role: WorkerRole,
        *,
        source: WorkerSource = "admin",
        heartbeat_s: float | None = None,
    ) -> tuple[WorkerHandle, bool]:
        """Add the worker at ``url`` (polled at once, in the background) and return it, with
        whether it is new. A URL already known returns its worker as it is (an admin's add
        makes it the admin's: no lease lapses it; a registration renews its lease by
        ``heartbeat_s``). ``ClientError`` for a bad URL; ``Conflict`` for a URL known with
        another role, a registration of a worker the admin removed, or too many workers."""
        url = check_worker_url(url)
        handle = self.find_url(url)
        if handle is not None:
            if handle.expected_role != role:
                raise Conflict(f"{url} is already a {handle.expected_role} worker, not {role}")
            if source == "admin":
                handle.source, handle.lease_until = "admin", None
            elif source == "registered" and handle.source == "registered":
                self._renew(handle, heartbeat_s)
            return handle, False
        if source == "registered" and url in self._removed_by_admin:
            raise Conflict(f"{url} was removed by the admin; only the admin can add it again")
        if len(self.handles) >= MAX_WORKERS:
            raise Conflict(f"the gateway knows {MAX_WORKERS} workers already")
        self._removed_by_admin.discard(url)
        handle = self._new_handle(url, role, source)
        if source == "registered":
            self._renew(handle, heartbeat_s)
        self.handles.append(handle)
        logger.info("worker %s (%s) added (%s)", url, role, source)
        self._check_soon(handle)
        return handle, True

    def _renew(self, handle: WorkerHandle, heartbeat_s: float | None) -> None:
        interval_s = self.poll_interval_s if heartbeat_s is None else heartbeat_s
        handle.lease_until = self.clock() + LEASE_HEARTBEATS * interval_s

    def remove(self, handle: WorkerHandle, *, reason: str, by_admin: bool = True) -> None:
        """The worker leaves: it is polled no more, and what runs there is lost (``on_lost``).
        ``by_admin``: it is refused if it registers again, until the admin adds it."""
        if handle.is_removed:
            return
        handle.is_removed = True
        self.handles.remove(handle)
        if by_admin:
            self._removed_by_admin.add(handle.url)
        logger.info("worker %s removed: %s", handle.url, reason)
        self._lose(handle, f"was removed: {reason}")
        self.on_change()

    def drain(self, handle: WorkerHandle) -> None:
        """No new requests on the worker; it becomes ``drained`` once nothing is left on it (its
        next poll tells; ``refresh`` for an answer now)."""
        if not handle.drain_requested:
            logger.info("worker %s: draining", handle.url)
        handle.drain_requested = True
        if handle.state == "ready":
            handle.state = "draining"
        self.on_change()

    def undrain(self, handle: WorkerHandle) -> None:
        """Take new requests on the worker again (once it is ready)."""
        handle.drain_requested = False
        if handle.state in ("draining", "drained"):
            logger.info("worker %s: ready again (undrained)", handle.url)
            handle.state = "ready"
        self.on_change()

    def expire_leases(self) -> None:
        """Remove the registered workers whose registration lapsed and whose last poll failed
        (gone for good, most likely; a restarted one registers again)."""
        now = self.clock()
        for handle in list(self.handles):
            lapsed = handle.lease_until is not None and now > handle.lease_until
            if lapsed and handle.poll_failures > 0:
                self.remove(
                    handle, reason="its registration lapsed and it does not answer", by_admin=False
                )

    # ---- events from callers ----------------------------------------------------------------

    def mark_dead(self, handle: WorkerHandle, error: FairgateError) -> None:
        """A call found the worker unreachable: stop placing on it until a poll succeeds, and
        poll it at once (one failed call may be a reset connection to a live worker, which then
        comes back without waiting for the next round). An ejected worker stays ejected: only
        its health check brings it back."""
        if handle.is_removed or handle.state == "ejected":
            return
        if handle.state != "dead":
            logger.warning("worker %s marked dead: %s", handle.url, error.message)
        handle.state = "dead"
        handle.last_error = error.message
        self.on_change()
        self._check_soon(handle)

    def _check_soon(self, handle: WorkerHandle) -> None:
        """Poll one worker now, in the background (once started: on a loop, and stopped by
        ``stop``)."""
        if self._task is None or handle in self._checking:
            return  # (one check at a time: a lost worker's requests each mark it dead)
        self._checking.add(handle)
        check = asyncio.get_running_loop().create_task(self.refresh(handle))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)
        check.add_done_callback(lambda _: self._checking.discard(handle))

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
        self.expire_leases()
        # A worker whose poll is still under way (one that stopped answering takes the whole
        # poll timeout) is left to it: the round does not wait, so the others' reports stay
        # fresh.
        handles = [h for h in self.handles if not h.poll_lock.locked()]
        await asyncio.gather(*(self._poll(h) for h in handles))
        self.on_change()

    async def _poll(self, handle: WorkerHandle) -> None:
        async with handle.poll_lock:
            if handle.is_removed:
                return
            try:
                # The first report only says where the eviction log stands: what the worker
                # evicted before the gateway knew it is nothing its prefix index holds.
                load = await handle.client.load(
                    timeout_s=POLL_TIMEOUT_S, evictions_since=handle.eviction_seq
                )
                info = None
                if load.ready and self._needs_info(handle, load):
                    async with asyncio.timeout(POLL_TIMEOUT_S):
                        info = await handle.client.info()
            except TimeoutError:
                error = WorkerUnreachable(
                    f"{handle.url}: no answer within {POLL_TIMEOUT_S:g} s", worker_url=handle.url
                )
                if not handle.is_removed:
                    self._poll_failed(handle, error)
                return
            except FairgateError as exc:
                if not handle.is_removed:
                    self._poll_failed(handle, exc)
                return
            if not handle.is_removed:
                self._answered(handle, load, info)

    def _needs_info(self, handle: WorkerHandle, load: WorkerLoad) -> bool:
        """Whether the worker's identity must be read again: it was not usable (it may be
        another process now), or its report hints at a restart (its eviction log starts over)
        or names another worker."""
        return (
            handle.info is None
            or handle.state not in _USABLE
            or load.evictions_missed
            or load.worker_id != handle.info.worker_id
        )

    def _poll_failed(self, handle: WorkerHandle, error: FairgateError) -> None:
        handle.poll_failures += 1
        if handle.state == "ejected":
            handle.num_healthy_polls = 0  # stays ejected, with the reason it was
            return
        if handle.state not in ("dead", "unknown"):
            logger.warning("worker %s does not answer: %s", handle.url, error.message)
        if handle.state != "unknown":  # one that never answered is nothing to lose
            handle.state = "dead"
        handle.last_error = f"poll failed: {error.message}"
        self._lose(handle, f"does not answer its load poll ({error.message})")

    def _answered(self, handle: WorkerHandle, load: WorkerLoad, info: WorkerInfo | None) -> None:
        now = self.clock()
        handle.poll_failures = 0
        handle.last_seen = now
        if info is not None:
            is_restarted = handle.info is not None and info.instance_id != handle.info.instance_id
            problem = self._incompatibility(handle, info)
            handle.info = info
            if is_restarted:
                handle.progress.reset()
                self._lose(handle, "restarted: what ran there is gone")
            if problem is not None:
                if handle.state != "incompatible":
                    logger.warning("worker %s is incompatible: %s", handle.url, problem)
                self._lose(handle, f"is incompatible: {problem}")
                handle.state, handle.last_error = "incompatible", problem
                handle.load = load
                return
        handle.reported(load)
        self._note_evictions(handle, load)
        if not load.ready:
            self._lose(handle, "reports its engine not ready")
            if handle.state != "ejected":
                handle.state = "not_ready"
            return
        if handle.state == "ejected":
            self._probe(handle, load)
            return
        if handle.state in _USABLE:
            reason = handle.progress.observe(load, now)
            if reason is not None:
                self._eject(handle, load, reason)
                return
        else:
            # Back: its earlier reports say nothing of this run. The watch starts from this
            # report (a first report never names a stall).
            handle.progress.reset()
            handle.progress.observe(load, now)
        self._settle(handle, load)

    def _settle(self, handle: WorkerHandle, load: WorkerLoad) -> None:
        """A worker found ready: ready, or draining / drained when a drain was asked."""
        state: WorkerState = "ready"
        if handle.drain_requested:
            state = "drained" if _is_idle(handle, load) else "draining"
        if state != handle.state:
            logger.info("worker %s (%s) is %s", handle.url, handle.role, state)
        handle.state, handle.last_error = state, None
        handle.may_hold_requests = True

    def _eject(self, handle: WorkerHandle, load: WorkerLoad, reason: str) -> None:
        logger.warning("worker %s ejected as hung: %s", handle.url, reason)
        handle.state, handle.last_error = "ejected", reason
        handle.num_healthy_polls, handle.probe_num_steps = 0, load.num_steps
        self._lose(handle, f"was ejected as hung: {reason}")

    def _probe(self, handle: WorkerHandle, load: WorkerLoad) -> None:
        """An ejected worker's health check (half-open): a report that completes steps, or has
        no work, counts; ``RECOVERY_POLLS`` of them in a row bring it back."""
        is_healthy = not load.has_work or load.num_steps > handle.probe_num_steps
        handle.probe_num_steps = load.num_steps
        handle.num_healthy_polls = handle.num_healthy_polls + 1 if is_healthy else 0
        if handle.num_healthy_polls < RECOVERY_POLLS:
            return
        logger.info("worker %s passed its health check after an ejection", handle.url)
        handle.progress.reset()
        handle.progress.observe(load, self.clock())  # from this report on, as when back
        self._settle(handle, load)

    def _lose(self, handle: WorkerHandle, why: str) -> None:
        """``on_lost`` once per loss, for a worker that may hold requests placed here."""
        if not handle.may_hold_requests:
            return
        handle.may_hold_requests = False
        error = WorkerUnreachable(f"worker {handle.url} {why}", worker_url=handle.url)
        try:
            self.on_lost(handle, error)
        except Exception:
            # A failing callback must not stop the polls that every other worker depends on.
            logger.exception("on_lost failed for worker %s", handle.url)

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
        expected = handle.expected_role
        if info.role != expected:
            return f"added as a {expected} worker but it is a {info.role} worker"
        if info.protocol_version != PROTOCOL_VERSION:
            return (
                f"protocol version {info.protocol_version}, the gateway speaks {PROTOCOL_VERSION}"
            )
        twin = next(
            (
                h
                for h in self.handles
                if h is not handle
                and h.info is not None
                and h.info.worker_id == info.worker_id
                and h.state != "incompatible"
            ),
            None,
        )
        if twin is not None:
            # The policy knows workers by id: two handles on one worker would double it.
            return f"worker id {info.worker_id!r} is already known at {twin.url}"
        return self.pools.admit(info)
