"""Carries out the scheduling policy's decisions: requests wait here for their workers.

``submit`` puts a request in the policy's queue and waits until the policy places it (or the
queue timeout passes, or the caller goes away). Whenever something changes that could let a
waiting request go (an arrival, a finished prefill or decode, a load report), ``wake`` schedules
one pass of the policy on the loop; passes coalesce, so a burst of events costs one pass.

The dispatcher also keeps the gateway's live accounting on the ``WorkerHandle``s: a placement adds
the prompt's tokens to its prefill worker's ``inflight_tokens`` until ``prefill_done``, and a KV
reservation to its decode worker until ``decode_done`` (or the next load report); both count the
request's class rank in ``ranks_inflight`` meanwhile.

Room for a higher class (``scheduling.md`` §6): when the most important waiting request fits on
no decode worker, and a decode worker runs requests of a lower SLO class, the dispatcher asks
that worker to ``make_room`` for it: the worker preempts what is less important than the request
(least important first, so lower classes before any of the request's own) and holds the room for
a while for this request's priority. One such call per worker at a time, and at most one per
request every ``ROOM_RETRY_S``. A worker that found no room is not asked again for as long, except
for a request of a higher class (which may preempt more); one that could not be asked, by no one.

Overload (``faults.md``): what the workers cannot serve in time is refused at once, not left
to wait for a client's timeout. ``check_backlog`` (called at admission, before the prompt is
tokenized) refuses a tenant's request with 429 ``queue_full`` while that tenant already has
``max_queued_per_tenant`` requests waiting, or while the oldest of its waiting requests of the
same class has waited longer than the class's ``max_queue_wait_s``: a standing queue, which new
arrivals would only lengthen. Both are per tenant, so a flooding tenant is refused its own excess
while the others, whose queues the fair policy keeps short, are not. A request that still waits
``queue_timeout_s`` ends with 503 ``queue_timeout``. When no worker can serve at all (the last of
a role died, for ``NO_WORKER_GRACE_S``), every waiting request ends with 503 ``no_worker``; each
of these answers carries ``Retry-After``.

Torch-free; everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.errors import NoWorkerAvailable, QueueFull, QueueTimeout, RequestShed
from gateway.scheduler import (
    Placement,
    QueuedRequest,
    Rejection,
    SchedulingPolicy,
    Shed,
    WorkerView,
)
from gateway.workers import WorkerHandle, WorkerRegistry
from transfer.errors import FairgateError
from transfer.messages import Priority, WorkerRole

__all__ = ["Dispatcher", "WorkerPair"]

logger = logging.getLogger(__name__)

ROOM_RETRY_S = 5.0  # the workers' default room hold: ask again for a request after this long
# Retry-After for no_worker: about what a supervised worker takes to restart (a small model).
NO_WORKER_RETRY_AFTER_S = 5.0
# How long no worker of a role may be ready before the requests waiting are failed: a live worker
# that one failed call marked dead is back by then (the registry polls it at once).
NO_WORKER_GRACE_S = 0.75


@dataclass(frozen=True, slots=True)
class WorkerPair:
    """Where a request runs: a prefill and a decode worker, or one colocated worker (``prefill``
    None); and what the placement saw: the prefix the policy expects the prefill worker to
    hold (for traces) and the tenant's counter (the priority the workers get, and traces)."""

    prefill: WorkerHandle | None
    decode: WorkerHandle
    num_expected_cached_tokens: int = field(default=0, compare=False)
    counter: float = field(default=0.0, compare=False)


class Dispatcher:
    def __init__(
        self,
        policy: SchedulingPolicy,
        registry: WorkerRegistry,
        *,
        max_prefill_inflight_tokens: int = 8192,
        max_prefill_inflight_s: float = 0.025,
        queue_timeout_s: float = 120.0,
        make_room_for_higher_classes: bool = True,
        max_queued_per_tenant: int = 256,
        max_queue_wait_s: Mapping[int, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_queue_wait_s``: by class rank, how long a tenant's oldest waiting request of
        that class may have waited before its new ones are refused (a rank not named: no such
        limit)."""
        self.policy = policy
        self.registry = registry
        self.max_prefill_inflight_tokens = max_prefill_inflight_tokens
        self.max_prefill_inflight_s = max_prefill_inflight_s
        self.queue_timeout_s = queue_timeout_s
        self.make_room_for_higher_classes = make_room_for_higher_classes
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_queue_wait_s = dict(max_queue_wait_s or {})
        self.clock = clock
        self._waiting: dict[str, asyncio.Future[WorkerPair]] = {}
        # The same requests by class rank (for ``_ask_for_room``, which looks at the top one).
        self._waiting_by_rank: dict[int, dict[str, QueuedRequest]] = {}
        # And by tenant, then rank: when each began to wait, oldest first (``check_backlog``).
        self._waiting_by_tenant: dict[str, dict[int, dict[str, float]]] = {}
        self._pass_scheduled = False
        # make_room: workers asked and not yet answered; when each request may ask again
        self._making_room: set[str] = set()
        self._room_asked_until: dict[str, float] = {}  # by request id
        # by worker id: until when, and the rank it was asked for (a higher one may ask)
        self._room_refused: dict[str, tuple[float, int]] = {}
        self._room_tasks: set[asyncio.Task[None]] = set()
        self._no_worker_logged_at = float("-inf")
        self._unservable_since: float | None = None  # when no worker could serve, since

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def check_backlog(self, tenant_id: str, rank: int) -> None:
        """Refuse (``QueueFull``) a new request of this tenant and class rank while the tenant's
        queue is full or standing (module docstring); cheap, so it runs before any heavy work."""
        by_rank = self._waiting_by_tenant.get(tenant_id)
        if not by_rank:
            return
        num_waiting = sum(len(same_rank) for same_rank in by_rank.values())
        if num_waiting >= self.max_queued_per_tenant:
            raise QueueFull(
                f"this tenant already has {num_waiting} requests waiting; try again shortly",
                retry_after_s=1.0,
            )
        max_wait_s = self.max_queue_wait_s.get(rank)
        same_rank = by_rank.get(rank)
        if max_wait_s is None or not same_rank:
            return
        waited_s = self.clock() - next(iter(same_rank.values()))
        if waited_s > max_wait_s:
            raise QueueFull(
                f"this tenant's oldest waiting request of this class has waited {waited_s:.1f} s "
                f"(over {max_wait_s:g} s): the workers cannot take more of its requests now",
                retry_after_s=max_wait_s,
            )

    def check_can_serve(self) -> None:
        """``NoWorkerAvailable`` (with Retry-After) when no worker could serve for
        ``NO_WORKER_GRACE_S``."""
        if self._is_unservable():
            raise self._no_worker()

    def _is_unservable(self) -> bool:
        """Whether no worker of a role the requests need has been ready for
        ``NO_WORKER_GRACE_S``. Shorter than that, it may be one failed call marking a live
        worker dead, which the registry's next poll undoes: meanwhile requests wait."""
        if self.registry.can_serve():
            self._unservable_since = None
            return False
        now = self.clock()
        if self._unservable_since is None:
            self._unservable_since = now
            asyncio.get_running_loop().call_later(NO_WORKER_GRACE_S, self.wake)
        return now - self._unservable_since >= NO_WORKER_GRACE_S

    def _no_worker(self) -> NoWorkerAvailable:
        # The registry's summary names internal addresses: the log gets it (at most once a
        # second: every request says the same), the tenant not.
        now = self.clock()
        if now - self._no_worker_logged_at >= 1.0:
            self._no_worker_logged_at = now
            logger.warning("no worker can serve: %s", self.registry.summary())
        return NoWorkerAvailable(
            "no worker can serve this request now; try again shortly",
            retry_after_s=NO_WORKER_RETRY_AFTER_S,
        )

    async def submit(self, request: QueuedRequest, *, requeue: bool = False) -> WorkerPair:
        """Wait for workers. ``requeue``: the request was placed before and could not start; it
        goes back ahead of later arrivals. ``NoWorkerAvailable`` when no worker can serve at all
        (now, or while it waits), ``QueueTimeout`` when none had room within the queue
        timeout."""
        self.check_can_serve()
        future: asyncio.Future[WorkerPair] = asyncio.get_running_loop().create_future()
        if requeue:
            self.policy.requeue(request, self.clock())
        else:
            try:
                self.policy.enqueue(request, self.clock())
            except Shed as exc:
                raise RequestShed(exc.reason) from None
        self._waiting[request.request_id] = future
        self._waiting_by_rank.setdefault(request.rank, {})[request.request_id] = request
        by_rank = self._waiting_by_tenant.setdefault(request.tenant_id, {})
        by_rank.setdefault(request.rank, {})[request.request_id] = self.clock()
        self.wake()
        try:
            # Not wait_for: on 3.11 it returns the result of a future that completed in the tick
            # its task was cancelled, and the cancellation is lost.
            async with asyncio.timeout(self.queue_timeout_s):
                return await future
        except TimeoutError:
            if _placed(future):
                return future.result()  # placed in the very tick the timeout fired
            raise QueueTimeout(
                f"this request waited {self.queue_timeout_s:g} s for a worker with room; the "
                "service is overloaded",
                retry_after_s=self.queue_timeout_s / 4,
            ) from None
        except asyncio.CancelledError:
            if _placed(future):  # placed, but its caller is gone: give the room back
                pair = future.result()
                self.prefill_done(pair, request)
                self.decode_done(pair, request, 0)
            raise
        finally:
            self._forget(request)
            if self._waiting.pop(request.request_id, None) is not None:
                self.policy.remove(request.request_id)
            if not future.done():
                future.cancel()

    def _forget(self, request: QueuedRequest) -> None:
        same_rank = self._waiting_by_rank.get(request.rank)
        if same_rank is not None:
            same_rank.pop(request.request_id, None)
            if not same_rank:
                del self._waiting_by_rank[request.rank]
        by_rank = self._waiting_by_tenant.get(request.tenant_id)
        if by_rank is not None:
            since = by_rank.get(request.rank)
            if since is not None:
                since.pop(request.request_id, None)
                if not since:
                    del by_rank[request.rank]
            if not by_rank:
                del self._waiting_by_tenant[request.tenant_id]
        self._room_asked_until.pop(request.request_id, None)

    def prefill_done(
        self, pair: WorkerPair, request: QueuedRequest, num_cached_tokens: int | None = None
    ) -> None:
        """The prefill stage ended (its first token, with ``num_cached_tokens`` found cached; or
        a failure, None): its tokens leave the prefill worker's account."""
        if pair.prefill is not None:
            pair.prefill.inflight_tokens -= request.num_prompt_tokens
            pair.prefill.inflight_requests -= 1
            _untrack_rank(pair.prefill, request.rank)
        if num_cached_tokens is not None:
            self.policy.on_first_token(request, num_cached_tokens, self.clock())
        self.wake()

    def tokens_generated(self, request: QueuedRequest, num_tokens: int) -> None:
        """``num_tokens`` more output tokens came from the request's decode worker."""
        self.policy.on_tokens(request, num_tokens, self.clock())

    def decode_done(
        self,
        pair: WorkerPair,
        request: QueuedRequest,
        num_output_tokens: int,
        *,
        finished: bool = True,
    ) -> None:
        """The request left its decode worker: it ended, whatever the outcome, or (``finished``
        False) the worker handed it back to be queued again."""
        decode = pair.decode
        decode.inflight_requests -= 1
        decode.inflight_tokens -= request.num_prompt_tokens
        _untrack_rank(decode, request.rank)
        decode.is_full = False  # it freed blocks
        decode.requests_ended_since_report += 1
        decode.tokens_freed_since_report += request.num_prompt_tokens + max(1, num_output_tokens)
        if finished:
            self.policy.on_finish(request, num_output_tokens, self.clock())
        self.wake()

    def given_up(self, request: QueuedRequest, num_output_tokens: int) -> None:
        """A request a decode worker handed back (``decode_done`` with ``finished`` False) that
        will not be queued again: it ends for the policy with what it generated."""
        self.policy.on_finish(request, num_output_tokens, self.clock())
        self.wake()

    def wake(self) -> None:
        if not self._pass_scheduled:
            self._pass_scheduled = True
            asyncio.get_running_loop().call_soon(self._schedule_pass)

    async def stop(self) -> None:
        """Cancel the make_room calls in flight (the gateway is stopping)."""
        tasks = list(self._room_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def fail_all(self, error: FairgateError) -> None:
        """Every waiting request ends with ``error`` (no worker left, or the gateway is
        stopping); each waiter takes itself out of the queue as it wakes."""
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)

    # ---- one pass ---------------------------------------------------------------------------

    def _schedule_pass(self) -> None:
        self._pass_scheduled = False
        if not self._waiting:
            if self.registry.can_serve():
                self._unservable_since = None  # a later outage gets its full grace
            return
        if self._is_unservable():
            # Fail fast: waiting for a worker to come back would hold the clients for up to
            # the queue timeout; they can retry sooner than that (Retry-After).
            self.fail_all(self._no_worker())
            return
        prefill_handles = {h.worker_id: h for h in self.registry.ready("prefill")}
        decode_role: WorkerRole = "decode" if prefill_handles else "colocated"
        decode_handles = {h.worker_id: h for h in self.registry.ready(decode_role)}
        if not decode_handles:
            return
        prefill_views = [
            WorkerView(
                h.worker_id,
                inflight_tokens=h.inflight_tokens,
                max_inflight_tokens=self._prefill_cap(h),
                prefill_tok_s=h.prefill_tok_s(),
                max_inflight_rank=max(h.ranks_inflight, default=None),
            )
            for h in prefill_handles.values()
        ]
        decode_views = [
            WorkerView(
                h.worker_id,
                inflight_tokens=h.inflight_tokens,
                free_kv_tokens=h.free_kv_tokens(),
                prefill_tok_s=h.prefill_tok_s(),
                free_slots=h.free_slots(),
            )
            for h in decode_handles.values()
        ]
        for decision in self.policy.schedule(prefill_views, decode_views, self.clock()):
            if isinstance(decision, Rejection):
                self._reject(decision)
            else:
                self._carry_out(decision, prefill_handles, decode_handles)
        if self._waiting and self.make_room_for_higher_classes:
            self._ask_for_room(list(decode_handles.values()))

    def _ask_for_room(self, decode_handles: list[WorkerHandle]) -> None:
        """If the most important waiting request fits on no decode worker, ask one that runs
        requests of a lower class to make room for it (module docstring)."""
        top_rank = max(self._waiting_by_rank)
        now = self.clock()
        candidates = [
            h
            for h in decode_handles
            if h.worker_id not in self._making_room
            and not self._refused(h.worker_id, top_rank, now)
            and min(h.ranks_inflight, default=top_rank) < top_rank
        ]
        if not candidates:
            return
        waiting = [
            r
            for r in self._waiting_by_rank[top_rank].values()
            if self._room_asked_until.get(r.request_id, 0.0) <= now
        ]
        if not waiting:
            return
        request = min(waiting, key=lambda r: r.arrival)
        needed = request.num_prompt_tokens + 1
        if any(h.free_kv_tokens() >= needed for h in decode_handles):
            return  # it fits somewhere: it waits for the prefill side or its turn, not for room
        # The worker with the most lower-class work to give up.
        handle = max(
            candidates,
            key=lambda h: sum(n for rank, n in h.ranks_inflight.items() if rank < top_rank),
        )
        self._room_asked_until[request.request_id] = now + ROOM_RETRY_S
        self._making_room.add(handle.worker_id)
        priority = Priority(
            rank=request.rank,
            counter=self.policy.counter(request.tenant_id),
            arrival=request.arrival,
        )
        task = asyncio.create_task(self._make_room(handle, needed, priority))
        self._room_tasks.add(task)
        task.add_done_callback(self._room_tasks.discard)

    def _refused(self, worker_id: str, rank: int, now: float) -> bool:
        """Whether the worker found no room lately for a request of this rank or higher (a
        worker only preempts less important requests, so a higher rank may find some)."""
        until, refused_rank = self._room_refused.get(worker_id, (0.0, 0))
        return now < until and rank <= refused_rank

    async def _make_room(self, handle: WorkerHandle, num_tokens: int, priority: Priority) -> None:
        has_room = False
        try:
            result = await handle.decode_client.make_room(num_tokens, priority)
            if result.num_preempted:
                logger.info(
                    "worker %s preempted %d requests to make room for a class-%d request",
                    handle.url,
                    result.num_preempted,
                    priority.rank,
                )
            if result.num_preempted or result.num_free_tokens >= num_tokens:
                # Swapped-out requests free blocks the gateway cannot count, and room found
                # without preempting may mean our view is old: ask the worker. (Free blocks
                # and no free batch slot is no room: make_room frees blocks only.)
                await self.registry.refresh(handle)
                has_room = result.num_preempted > 0 or handle.free_kv_tokens() >= num_tokens
            refused_rank = priority.rank
        except FairgateError as exc:
            logger.warning("worker %s could not make room: %s", handle.url, exc.message)
            refused_rank = sys.maxsize  # failing: no class asks it again for a while
        finally:
            self._making_room.discard(handle.worker_id)
        if not has_room:
            self._room_refused[handle.worker_id] = (self.clock() + ROOM_RETRY_S, refused_rank)

    def _prefill_cap(self, handle: WorkerHandle) -> int:
        """Prompt tokens a prefill worker may have in flight: ``max_prefill_inflight_tokens``,
        and no more than ``max_prefill_inflight_s`` of work at its measured speed. Work sent to
        a worker is done in the worker's order; work held here is done in the policy's, so the
        less a worker holds, the sooner a request the policy favours gets its turn (an idle
        worker still takes any one prompt)."""
        tok_s = handle.prefill_tok_s()
        if tok_s is None:
            return self.max_prefill_inflight_tokens
        return min(self.max_prefill_inflight_tokens, int(tok_s * self.max_prefill_inflight_s))

    def _reject(self, rejection: Rejection) -> None:
        self._forget(rejection.request)
        future = self._waiting.pop(rejection.request.request_id, None)
        if future is not None and not future.done():
            future.set_exception(RequestShed(rejection.reason))

    def _carry_out(
        self,
        placement: Placement,
        prefill_handles: dict[str, WorkerHandle],
        decode_handles: dict[str, WorkerHandle],
    ) -> None:
        request = placement.request
        self._forget(request)
        future = self._waiting.pop(request.request_id, None)
        if future is None or future.done():
            # Its caller gave up in this same tick: nothing was reserved on the workers, but the
            # policy dispatched it and must hear that it ended.
            self.policy.on_finish(request, 0, self.clock())
            return
        prefill = (
            None
            if placement.prefill_worker_id is None
            else prefill_handles[placement.prefill_worker_id]
        )
        decode = decode_handles[placement.decode_worker_id]
        if prefill is not None:
            prefill.inflight_tokens += request.num_prompt_tokens
            prefill.inflight_requests += 1
            prefill.ranks_inflight[request.rank] += 1
        decode.inflight_requests += 1
        decode.inflight_tokens += request.num_prompt_tokens
        decode.ranks_inflight[request.rank] += 1
        decode.tokens_reserved_since_report += request.num_prompt_tokens + 1
        decode.requests_placed_since_report += 1
        future.set_result(
            WorkerPair(
                prefill,
                decode,
                placement.num_cached_tokens,
                self.policy.counter(request.tenant_id),
            )
        )


def _untrack_rank(handle: WorkerHandle, rank: int) -> None:
    handle.ranks_inflight[rank] -= 1
    if not handle.ranks_inflight[rank]:
        del handle.ranks_inflight[rank]


def _placed(future: asyncio.Future[WorkerPair]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
