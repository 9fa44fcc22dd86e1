"""Carries out the scheduling policy's decisions: requests wait here for their workers.

``submit`` puts a request in the policy's queue and waits until the policy places it (or the
queue timeout passes, or the caller goes away). Whenever something changes that could let a
waiting request go (an arrival, a finished prefill or decode, a load report), ``wake`` schedules
one pass of the policy on the loop; passes coalesce, so a burst of events costs one pass.

What is the same in the simulator lives in ``gateway.core``: the worker accounts this keeps on
the ``WorkerHandle``s, the views and prefill caps a policy decides on, and what carrying out a
decision and each step of a request do to the accounts and the policy. This module adds the
transport: futures its callers wait on, the loop, and the worker calls a decision needs.

Room for a higher class (``scheduling.md`` §6): a policy's ``MakeRoom`` decision is carried out
by asking the decode worker to ``make_room``: it preempts what is less important than the
request (least important first, so lower classes before any of the request's own) until KV and
a batch slot are free for it, and holds the room a while for this request's priority.

Overload (``faults.md``): what the workers cannot serve in time is refused at once, not left to
wait for a client's timeout. ``check_backlog`` (called at admission, before the prompt is
tokenized) refuses a tenant's request with 429 ``queue_full`` while that tenant already has
``max_queued_per_tenant`` requests waiting, or while the oldest of its waiting requests of the same
class and model has waited longer than the class's ``max_queue_wait_s``: a standing queue, which
new arrivals would only lengthen. Both are per tenant, so a flooding tenant is refused its own
excess while the others, whose queues the fair policy keeps short, are not. A request that still
waits ``queue_timeout_s`` ends with 503 ``queue_timeout``. When no worker can serve at all (the
last of a role died, for ``NO_WORKER_GRACE_S``), every waiting request ends with 503 ``no_worker``;
each of these answers carries ``Retry-After``.

Each request has one ledger here (``gateway.ledger.RequestLedger``), from ``open`` to
``close``: its ``Generation`` reports what happens on its workers (``first_token``, ``tokens``,
``left``, ``failed``) and this settles the worker accounts, the policy and the registry from it
once, and decides whether a request whose worker failed goes on elsewhere: at most
``max_migrations`` times, each time queued again at its arrival with its output so far
(``failed``). A worker found lost (dead, hung, restarted, removed: ``worker_lost``, from the
registry) stops the runs on it at once, which then fail and move the same way.

Torch-free; everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from gateway.core import SchedulingCore
from gateway.errors import NoWorkerAvailable, QueueFull, QueueTimeout, RequestShed
from gateway.ledger import RequestLedger, WorkerPair, is_migratable
from gateway.scheduler import (
    ROOM_RETRY_S,
    Decision,
    MakeRoom,
    Placement,
    QueuedRequest,
    Rejection,
    SchedulingPolicy,
    Shed,
)
from gateway.workers import WorkerHandle, WorkerRegistry
from transfer.errors import (
    EngineFailed,
    FairgateError,
    NoRoomError,
    WorkerNotReady,
    WorkerUnreachable,
)
from transfer.messages import Priority, WorkerRole

__all__ = ["ROOM_RETRY_S", "Dispatcher", "RequestLedger", "WorkerPair"]

logger = logging.getLogger(__name__)

# Retry-After for no_worker: about what a supervised worker takes to restart (a small model).
NO_WORKER_RETRY_AFTER_S = 5.0
# How long no worker of a role may be ready before the requests waiting are failed: a live worker
# that one failed call marked dead is back by then (the registry polls it at once).
NO_WORKER_GRACE_S = 0.75


class Dispatcher:
    def __init__(
        self,
        policy: SchedulingPolicy,
        registry: WorkerRegistry,
        *,
        max_prefill_inflight_tokens: int = 8192,
        max_prefill_inflight_s: float = 0.025,
        queue_timeout_s: float = 120.0,
        max_queued_per_tenant: int = 256,
        max_queue_wait_s: Mapping[int, float] | None = None,
        max_migrations: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_queue_wait_s``: by class rank, how long a tenant's oldest waiting request of
        that class may have waited before its new ones are refused (a rank not named: no such
        limit)."""
        self.policy = policy
        self.registry = registry
        self.core = SchedulingCore(
            policy,
            max_prefill_inflight_tokens=max_prefill_inflight_tokens,
            max_prefill_inflight_s=max_prefill_inflight_s,
        )
        self.queue_timeout_s = queue_timeout_s
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_queue_wait_s = dict(max_queue_wait_s or {})
        self.max_migrations = max_migrations
        self.clock = clock
        self._ledgers: dict[str, RequestLedger] = {}  # every request from ``open`` to ``close``
        self._waiting: dict[str, asyncio.Future[WorkerPair]] = {}
        self._waiting_models: dict[str, str] = {}  # the same requests' models
        # The same requests by tenant, then rank: when each began to wait, oldest first
        # (``check_backlog``).
        self._waiting_by_tenant: dict[str, dict[tuple[str, int], dict[str, float]]] = {}
        self._pass_scheduled = False
        self._room_tasks: set[asyncio.Task[None]] = set()
        self._no_worker_logged_at = float("-inf")
        # By model: since when no worker of its pool could serve.
        self._unservable_since: dict[str, float] = {}

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def waiting_by_rank(self) -> dict[tuple[str, int], int]:
        """By (tenant id, class rank): its requests waiting for workers, every model's."""
        counts: dict[tuple[str, int], int] = {}
        for tenant_id, by_rank in self._waiting_by_tenant.items():
            for (_, rank), waiting in by_rank.items():
                key = (tenant_id, rank)
                counts[key] = counts.get(key, 0) + len(waiting)
        return counts

    def check_backlog(self, tenant_id: str, rank: int, model: str | None = None) -> None:
        """Refuse (``QueueFull``) a new request of this tenant and class rank while the tenant's
        queue is full (all its models' requests together) or, for ``model``, standing (module
        docstring): a standing queue for a full large model does not refuse the tenant's
        requests for an idle small one. Cheap, so it runs before any heavy work (the gatekeeper
        calls it before the model is known: the count only)."""
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
        same_rank = None if model is None else by_rank.get((model, rank))
        if max_wait_s is None or not same_rank:
            return
        waited_s = self.clock() - next(iter(same_rank.values()))
        if waited_s > max_wait_s:
            raise QueueFull(
                f"this tenant's oldest waiting request of this class has waited {waited_s:.1f} s "
                f"(over {max_wait_s:g} s): the workers cannot take more of its requests now",
                retry_after_s=max_wait_s,
            )

    def check_can_serve(self, model: str) -> None:
        """``NoWorkerAvailable`` (with Retry-After) when no worker of ``model``'s pool could
        serve for ``NO_WORKER_GRACE_S``."""
        if self._is_unservable(model):
            raise self._no_worker(model)

    def _is_unservable(self, model: str) -> bool:
        """Whether no worker of a role ``model``'s requests need has been ready for
        ``NO_WORKER_GRACE_S``. Shorter than that, it may be one failed call marking a live
        worker dead, which the registry's next poll undoes: meanwhile requests wait."""
        if self.registry.can_serve(model):
            self._unservable_since.pop(model, None)
            return False
        now = self.clock()
        since = self._unservable_since.setdefault(model, now)
        if since == now:
            asyncio.get_running_loop().call_later(NO_WORKER_GRACE_S, self.wake)
        return now - since >= NO_WORKER_GRACE_S

    def _no_worker(self, model: str) -> NoWorkerAvailable:
        # The registry's summary names internal addresses: the log gets it (at most once a
        # second: every request says the same), the tenant not.
        now = self.clock()
        if now - self._no_worker_logged_at >= 1.0:
            self._no_worker_logged_at = now
            logger.warning("no worker can serve model %r: %s", model, self.registry.summary())
        return NoWorkerAvailable(
            f"no worker of model {model!r} can serve this request now; try again shortly",
            retry_after_s=NO_WORKER_RETRY_AFTER_S,
        )

    # ---- a request's ledger ----------------------------------------------------------------

    def open(
        self,
        request: QueuedRequest,
        *,
        received: float | None = None,
        on_lost: Callable[[FairgateError], None] | None = None,
    ) -> RequestLedger:
        """The request's ledger, kept until ``close``. ``received``: when the gateway got it
        (monotonic; now if None). ``on_lost``: see ``RequestLedger``."""
        ledger = RequestLedger(
            request, self.clock() if received is None else received, on_lost=on_lost
        )
        self._ledgers[request.request_id] = ledger
        return ledger

    def close(self, ledger: RequestLedger) -> None:
        """The request's life in the gateway is over, whatever the outcome: what it still held
        is settled (a run not reported as left ends now; one handed back and not queued again
        ends for the policy with what it generated)."""
        if self._ledgers.get(ledger.request.request_id) is ledger:
            del self._ledgers[ledger.request.request_id]
        if ledger.stage in ("prefill", "decode"):
            self.left(ledger, handed_back=False)
        elif ledger.stage == "off":
            self.core.given_up(ledger.request, ledger.num_output_tokens, self.clock())
            self.wake()
        ledger.stage = "ended"

    def ledger(self, request_id: str) -> RequestLedger | None:
        """The ledger of a request between ``open`` and ``close``."""
        return self._ledgers.get(request_id)

    def first_token(self, ledger: RequestLedger, num_cached_tokens: int) -> None:
        """The prefill worker answered with the first token, ``num_cached_tokens`` found
        cached: its tokens leave the prefill worker's account."""
        assert ledger.pair is not None and ledger.stage == "prefill"
        self.core.prefill_done(ledger.pair.prefill, ledger.request, num_cached_tokens, self.clock())
        ledger.stage = "decode"
        self.wake()

    def tokens(self, ledger: RequestLedger, num_tokens: int) -> None:
        """``num_tokens`` more output tokens came from the request's workers."""
        ledger.num_output_tokens += num_tokens
        ledger.num_frames_here += 1
        ledger.progressed_at = now = self.clock()
        self.core.tokens_generated(ledger.request, num_tokens, now)

    def left(self, ledger: RequestLedger, *, handed_back: bool) -> None:
        """The request left its pair: it ended there (finished, or its client went away), or
        (``handed_back``) it is to be queued again or to end off any pair: a decode worker
        handed it back, or the run failed (then ``failed`` follows). Idempotent."""
        pair = ledger.pair
        if pair is None or ledger.stage not in ("prefill", "decode"):
            return
        now = self.clock()
        if ledger.stage == "prefill":
            self.core.prefill_done(pair.prefill, ledger.request, None, now)
        self.core.decode_done(
            pair.decode, ledger.request, ledger.num_output_tokens, now, finished=not handed_back
        )
        ledger.stage = "off" if handed_back else "ended"
        self.wake()

    def failed(self, ledger: RequestLedger, error: FairgateError) -> FairgateError | None:
        """The request's run failed with ``error`` (after ``left(handed_back=True)``): the
        worker at fault is marked (full, or dead), and the request goes on elsewhere (None:
        ``submit`` it again, with its output so far) or ends with the error returned (ledger
        module: which errors move a request; at most ``max_migrations`` moves)."""
        pair = ledger.pair
        handle = None if pair is None else pair.handle_of(error.worker_url)
        if error is ledger.lost_error:
            handle = None  # the registry found it lost: it is marked already
        ledger.lost_error = None
        request_id = ledger.request.request_id
        if isinstance(error, NoRoomError):
            # The view of the decode worker was stale: no reservations there until it reports;
            # the request waits its turn again, within the time it may wait for workers at all
            # since it last made progress.
            if handle is not None:
                self.registry.mark_full(handle)
            waiting_since = ledger.progressed_at or ledger.received
            return error if self.clock() - waiting_since > self.queue_timeout_s else None
        if not is_migratable(error):
            return error
        if handle is not None and isinstance(
            error, WorkerUnreachable | EngineFailed | WorkerNotReady
        ):
            self.registry.mark_dead(handle, error)
        ledger.num_migrations += 1
        if ledger.num_migrations > self.max_migrations:
            logger.warning(
                "request %s: its worker failed again, %d moves already: %s",
                request_id,
                self.max_migrations,
                error.message,
            )
            return WorkerUnreachable(
                f"the workers of {request_id} failed {ledger.num_migrations} times; giving up "
                f"(last: {error.message})"
            )
        logger.info(
            "request %s: moved off a failed worker after %d tokens (move %d): %s",
            request_id,
            ledger.num_output_tokens,
            ledger.num_migrations,
            error.message,
        )
        return None

    def worker_lost(self, handle: WorkerHandle, error: FairgateError) -> None:
        """The registry found ``handle`` lost (dead, hung, restarted, removed): every request
        running there is stopped (``RequestLedger.on_lost``) and fails with ``error``."""
        for ledger in [ledger for ledger in self._ledgers.values() if ledger.runs_on(handle)]:
            if ledger.on_lost is not None:
                ledger.lost_error = error
                ledger.on_lost(error)

    async def submit(self, ledger: RequestLedger, *, requeue: bool = False) -> WorkerPair:
        """Wait for workers. ``requeue``: the request was placed before and could not start or
        go on there; it goes back ahead of later arrivals. ``NoWorkerAvailable`` when no worker
        can serve at all (now, or while it waits), ``QueueTimeout`` when none had room within
        the queue timeout."""
        request = ledger.request
        self.check_can_serve(request.model)
        if self.registry.pools.block_size is not None:
            self.policy.set_block_size(self.registry.pools.block_size)
        future: asyncio.Future[WorkerPair] = asyncio.get_running_loop().create_future()
        if requeue:
            self.policy.requeue(request, self.clock())
        else:
            try:
                self.policy.enqueue(request, self.clock())
            except Shed as exc:
                raise RequestShed(exc.reason) from None
        ledger.stage = "queued"
        self._waiting[request.request_id] = future
        self._waiting_models[request.request_id] = request.model
        by_rank = self._waiting_by_tenant.setdefault(request.tenant_id, {})
        by_rank.setdefault((request.model, request.rank), {})[request.request_id] = self.clock()
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
                self.left(ledger, handed_back=False)
            raise
        finally:
            self._forget(request)
            if self._waiting.pop(request.request_id, None) is not None:
                self.policy.remove(request.request_id)
            if ledger.stage == "queued":
                ledger.stage = "ended"  # out of the policy's queue, never placed
            if not future.done():
                future.cancel()

    def _forget(self, request: QueuedRequest) -> None:
        self._waiting_models.pop(request.request_id, None)
        by_rank = self._waiting_by_tenant.get(request.tenant_id)
        if by_rank is not None:
            since = by_rank.get((request.model, request.rank))
            if since is not None:
                since.pop(request.request_id, None)
                if not since:
                    del by_rank[(request.model, request.rank)]
            if not by_rank:
                del self._waiting_by_tenant[request.tenant_id]

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

    def fail_all(self, error: FairgateError, model: str | None = None) -> None:
        """Every waiting request (of ``model`` only, unless None) ends with ``error`` (no
        worker left, or the gateway is stopping); each waiter takes itself out of the queue as
        it wakes."""
        for request_id, future in self._waiting.items():
            if not future.done() and model in (None, self._waiting_models.get(request_id)):
                future.set_exception(error)

    # ---- one pass ---------------------------------------------------------------------------

    def _schedule_pass(self) -> None:
        """One pass per model with requests waiting, over that model's pool only: its
        requests are placed on its own workers, and an outage of one pool fails only its own
        waiters."""
        self._pass_scheduled = False
        waiting = dict.fromkeys(self._waiting_models.values())  # in order of arrival
        for model in list(self._unservable_since):
            if model not in waiting and self.registry.can_serve(model):
                del self._unservable_since[model]  # a later outage gets its full grace
        for model in waiting:
            self._schedule_model(model)

    def _schedule_model(self, model: str) -> None:
        if self._is_unservable(model):
            # Fail fast: waiting for a worker to come back would hold the clients for up to
            # the queue timeout; they can retry sooner than that (Retry-After).
            self.fail_all(self._no_worker(model), model)
            return
        prefill_handles = {h.worker_id: h for h in self.registry.ready("prefill", model)}
        decode_role: WorkerRole = "decode" if prefill_handles else "colocated"
        decode_handles = {h.worker_id: h for h in self.registry.ready(decode_role, model)}
        if not decode_handles:
            return
        decisions = self.core.schedule(
            list(prefill_handles.values()),
            list(decode_handles.values()),
            self.clock(),
            model=model,
        )
        for decision in decisions:
            if decision.request.model != model:
                # A policy of one pool given several models' requests: placing this one here
                # would pair it with another model's workers. Loud, not silent.
                self._misplaced(decision, model)
            elif isinstance(decision, Rejection):
                self._reject(decision)
            elif isinstance(decision, MakeRoom):
                self._ask_for_room(decision, decode_handles[decision.decode_worker_id])
            else:
                self._carry_out(decision, prefill_handles, decode_handles)

    def _misplaced(self, decision: Decision, model: str) -> None:
        request = decision.request
        logger.error(
            "the policy decided on a request of model %r in the pass of model %r: refused (a "
            "policy per model is needed: gateway.policies.per_model)",
            request.model,
            model,
        )
        if isinstance(decision, Placement):
            self.core.not_placed(decision, self.clock())  # dispatched by the policy: undo
        future = self._waiting.get(request.request_id)
        if future is not None and not future.done():
            # Its waiter takes it out of the queue (a MakeRoom's request is still queued).
            future.set_exception(self._no_worker(request.model))

    def _ask_for_room(self, room: MakeRoom, handle: WorkerHandle) -> None:
        request = room.request
        if request.request_id not in self._waiting:
            return  # placed or gone since: nothing to make room for
        self.core.room_asked(handle)
        priority = Priority(
            rank=request.rank,
            counter=self.policy.counter(request.tenant_id),
            arrival=request.arrival,
        )
        task = asyncio.create_task(self._make_room(handle, room, priority))
        self._room_tasks.add(task)
        task.add_done_callback(self._room_tasks.discard)

    async def _make_room(self, handle: WorkerHandle, room: MakeRoom, priority: Priority) -> None:
        has_room: bool | None = False
        num_tokens = room.num_tokens
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
                # Swapped-out requests free blocks and slots the gateway cannot count, and
                # room found without preempting may mean our view is old: ask the worker.
                await self.registry.refresh(handle)
                has_room = result.num_preempted > 0 or handle.free_kv_tokens() >= num_tokens
        except FairgateError as exc:
            logger.warning("worker %s could not make room: %s", handle.url, exc.message)
            has_room = None
        finally:
            self.core.room_answered(handle, room, has_room, self.clock())
        self.wake()

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
            # Its caller gave up in this same tick: nothing was reserved on the workers.
            self.core.not_placed(placement, self.clock())
            return
        prefill = (
            None
            if placement.prefill_worker_id is None
            else prefill_handles[placement.prefill_worker_id]
        )
        decode = decode_handles[placement.decode_worker_id]
        self.core.placed(placement, prefill, decode)
        pair = WorkerPair(
            prefill, decode, placement.num_cached_tokens, self.policy.counter(request.tenant_id)
        )
        ledger = self._ledgers.get(request.request_id)
        if ledger is not None:
            ledger.pair, ledger.stage = pair, "prefill"
            ledger.num_placements += 1
            ledger.num_frames_here = 0
        future.set_result(pair)


def _placed(future: asyncio.Future[WorkerPair]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
