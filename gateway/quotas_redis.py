"""Quota state in Redis, shared by the gateway's replicas; every reservation under a lease.

Each admission is one round trip: a Lua script that checks every limit and reserves all of them
at once (Redis runs a script alone, so two replicas' admissions never interleave), and each
settle is one more, sent in the background. The scripts read the time from the Redis server
(``TIME``), so the replicas' clocks do not matter. Per tenant, under one hash tag::

    {prefix}{tenant}:leases      ZSET  reservation id -> lease deadline: the requests running
    {prefix}{tenant}:window      ZSET  reservation id -> admitted at: the 60 s window
    {prefix}{tenant}:tokens      HASH  reservation id -> tokens (reserved, then actual),
                                       and "#sum": their total, kept with them in one key
    {prefix}{tenant}:budget:day  HASH  period ("2025-01-31") -> the period's running total
    {prefix}{tenant}:budget:month      (the same per month)
    {prefix}{tenant}:meta        HASH  "budget" -> the kind of budget charged last (snapshots)

**Leases.** A reservation's slot is held until its lease deadline; the replica that made it
renews the leases of its running requests every third of the lease, all of them in one pipelined
call, so a long request keeps its slot. A replica that dies (``kill -9``) stops renewing, and its
reservations lapse within one lease: every script drops the lapsed ones before it counts. A
lapsed reservation stays charged at its estimate in the window and the budget (its replica may
have run it to ``max_tokens``, and the usage it would have written died with it): the lease frees
capacity, never accounting. Settling is exactly once: the settle script acts only when it removes
a live lease, so a retried settle, or one after the lease lapsed, changes nothing.

**Budgets.** A period's running total is installed once from the store's recorded usage, with
``HSETNX`` (the first replica's load wins), grows with every reservation and is corrected at
settle; installing a new period drops the ones before it. Keys expire when idle: the window and
tokens a second after the window, the leases after two leases, the budgets after their period.

A Redis error on an admission, a snapshot or an install is ``Unavailable`` (503, retry after a
second): quotas fail closed. Settles and renewals are retried in the background; they are
idempotent. The client does not retry by itself: a retried admission could reserve twice, so a
connection that Redis dropped (a restart) fails the one call it carried. Torch-free.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.errors import Unavailable
from gateway.quotas_backend import (
    WINDOW_S,
    Breach,
    BreachedLimit,
    BudgetMissing,
    QuotaState,
    Reserved,
    ReserveOrder,
)
from gateway.quotas_lua import ADMIT, INSTALL, RENEW, SETTLE, SNAPSHOT
from gateway.tenants import BudgetPeriod

__all__ = ["DEFAULT_KEY_PREFIX", "RedisQuotaBackend", "RedisReservation"]

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "fairgate:quota:"
DEFAULT_TIMEOUT_S = 2.0
# A settle that fails is tried again after each of these (then its lease lapses instead).
SETTLE_RETRY_DELAYS_S = (0.05, 0.25, 1.0)
# A budget's hash outlives its longest period by a day: after that only late settles need it.
BUDGET_TTL_S: dict[BudgetPeriod, int] = {"day": 2 * 86400, "month": 32 * 86400}
ERROR_LOG_INTERVAL_S = 10.0
_UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class _TenantKeys:
    leases: str
    window: str
    tokens: str
    meta: str
    budget_day: str
    budget_month: str

    @classmethod
    def of(cls, prefix: str, tenant_id: str) -> _TenantKeys:
        base = f"{prefix}{{{tenant_id}}}:"  # one hash tag: one cluster slot per tenant
        return cls(
            leases=f"{base}leases",
            window=f"{base}window",
            tokens=f"{base}tokens",
            meta=f"{base}meta",
            budget_day=f"{base}budget:day",
            budget_month=f"{base}budget:month",
        )

    def budget(self, kind: BudgetPeriod | None) -> str:
        """The budget hash of ``kind``; without a budget, a key of the tenant's the script does
        not touch (every key a script may touch is passed to it)."""
        return self.budget_day if kind == "day" else self.budget_month

    def all(self) -> list[str]:
        """Every key, in the order the snapshot script takes them."""
        return [
            self.leases,
            self.window,
            self.tokens,
            self.meta,
            self.budget_day,
            self.budget_month,
        ]


@dataclass(slots=True)
class RedisReservation:
    """One admission's reservation in Redis: its id, and what its settle corrects."""

    backend: RedisQuotaBackend
    tenant_id: str
    reservation_id: str
    estimated_tokens: int
    kind: BudgetPeriod | None
    period: str | None

    def settle(self, actual_tokens: int) -> None:
        self.backend._settle_in_background(self, actual_tokens)


class RedisQuotaBackend:
    """``QuotaBackend`` in the Redis at ``url``, shared with every replica using the same
    ``key_prefix``. ``lease_s``: how long a reservation outlives its replica. ``timeout_s``: the
    longest wait for Redis on one call. ``clock``: None for the Redis server's time (what
    replicas must use); tests pass a fake one."""

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = 30.0,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, not {lease_s}")
        self._client: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        kwargs = self._client.connection_pool.connection_kwargs
        # For messages: never the URL, which may carry a password.
        self.address = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        self.lease_s = lease_s
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        self._clock = clock
        self._admit = self._client.register_script(ADMIT)
        self._settle = self._client.register_script(SETTLE)
        self._renew = self._client.register_script(RENEW)
        self._install = self._client.register_script(INSTALL)
        self._snapshot = self._client.register_script(SNAPSHOT)
        # Reservation ids: unique across replicas, and in admission order within one.
        self._replica_tag = secrets.token_hex(4)
        self._ids = itertools.count()
        self._live: dict[str, set[str]] = {}  # tenant -> ids of its reservations running here
        # Settles and forgets on their way to Redis, per tenant: this replica's later calls
        # for the tenant wait for them, so it reads its own writes.
        self._pending: dict[str, set[asyncio.Task[None]]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._is_closed = False
        self._last_error_log = -math.inf

    async def start(self) -> None:
        """Check that Redis answers, and start renewing leases every third of a lease."""
        try:
            await self._client.ping()
        except RedisError as exc:
            raise ConnectionError(f"Redis at {self.address} does not answer: {exc}") from exc
        self._renewer = asyncio.create_task(self._renew_forever(), name="quota-lease-renewer")

    async def close(self) -> None:
        """Stop renewing, let the settles on their way land (for up to ``timeout_s`` and their
        retries), close the connections. Leases still held here lapse on their own. Closing
        again does nothing."""
        if self._is_closed:
            return
        self._is_closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        pending = {task for tasks in self._pending.values() for task in tasks}
        if pending:
            limit_s = self._timeout_s * (1 + len(SETTLE_RETRY_DELAYS_S))
            limit_s += sum(SETTLE_RETRY_DELAYS_S)
            _, late = await asyncio.wait(pending, timeout=limit_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._client.aclose()

    async def reserve(self, order: ReserveOrder) -> Reserved | BudgetMissing:
        tenant_id, quotas = order.tenant_id, order.quotas
        await self._after_pending(tenant_id)
        keys = _TenantKeys.of(self._prefix, tenant_id)
        kind = quotas.budget_period if quotas.token_budget is not None else None
        reservation_id = f"{next(self._ids):012x}.{self._replica_tag}"
        reply = await self._call(
            self._admit,
            [keys.leases, keys.window, keys.tokens, keys.budget(kind), keys.meta],
            [
                reservation_id,
                order.estimated_tokens,
                _limit(quotas.max_concurrent_requests),
                _limit(quotas.requests_per_minute),
                _limit(quotas.tokens_per_minute),
                _limit(quotas.token_budget),
                kind or "",
                "1" if order.reserve_over_limit else "0",
                self.lease_s,
                WINDOW_S,
                self._now(),
            ],
        )
        outcome, at, period = reply[0], float(reply[1]), reply[2] or None
        if outcome == "missing":
            assert kind is not None and period is not None
            return BudgetMissing(kind, period)
        limit: BreachedLimit | None = reply[3] or None
        breach = None
        if limit is not None:
            breach = Breach(limit, num_used=int(reply[4]), frees_at=float(reply[5]))
        if outcome == "refused":
            return Reserved(at, period, breach, None)
        self._live.setdefault(tenant_id, set()).add(reservation_id)
        reservation = RedisReservation(
            self, tenant_id, reservation_id, order.estimated_tokens, kind, period
        )
        return Reserved(at, period, breach, reservation)

    async def install_budget(
        self, tenant_id: str, kind: BudgetPeriod, period: str, recorded_tokens: int
    ) -> None:
        keys = _TenantKeys.of(self._prefix, tenant_id)
        await self._call(
            self._install, [keys.budget(kind)], [period, recorded_tokens, BUDGET_TTL_S[kind]]
        )

    def forget(self, tenant_id: str) -> None:
        self._live.pop(tenant_id, None)
        keys = _TenantKeys.of(self._prefix, tenant_id).all()
        self._in_background(tenant_id, self._forget(tenant_id, keys))

    async def snapshot(self, tenant_id: str) -> QuotaState:
        await self._after_pending(tenant_id)
        keys = _TenantKeys.of(self._prefix, tenant_id)
        reply = await self._call(
            self._snapshot,
            keys.all(),
            [WINDOW_S, self._now()],
        )
        concurrent, requests, tokens, period, total = reply
        return QuotaState(int(concurrent), int(requests), int(tokens), int(total), period or None)

    async def settle_now(self, reservation: RedisReservation, actual_tokens: int) -> bool:
        """Settle in Redis now: True when this call settled it, False when it was not live any
        more (settled already, lapsed, or its tenant forgotten). Safe to repeat."""
        keys = _TenantKeys.of(self._prefix, reservation.tenant_id)
        settled = await self._settle(
            [keys.leases, keys.tokens, keys.budget(reservation.kind)],
            [
                reservation.reservation_id,
                reservation.estimated_tokens,
                actual_tokens,
                reservation.period or "",
                self._now(),
            ],
        )
        return bool(settled)

    async def renew_now(self) -> int:
        """Renew the leases of every reservation running here, in one pipelined call; how many
        had lapsed already (they stay lapsed, and are no longer renewed)."""
        live = {tenant: sorted(ids) for tenant, ids in self._live.items() if ids}
        if not live:
            return 0
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, ids in live.items():
                leases = _TenantKeys.of(self._prefix, tenant_id).leases
                await self._renew([leases], [self.lease_s, self._now(), *ids], client=pipe)
            replies = await pipe.execute()
        num_lapsed = 0
        for tenant_id, lost in zip(live, replies, strict=True):
            running = self._live.get(tenant_id, set())
            lapsed = running.intersection(lost)  # not those settled since the renewal left
            running.difference_update(lapsed)
            num_lapsed += len(lapsed)
        if num_lapsed:
            logger.warning(
                "%d quota reservations lapsed before their lease was renewed (Redis at %s out "
                "of reach for longer than %g s?); their requests run on uncounted",
                num_lapsed,
                self.address,
                self.lease_s,
            )
        return num_lapsed

    def _settle_in_background(self, reservation: RedisReservation, actual_tokens: int) -> None:
        running = self._live.get(reservation.tenant_id)
        if running is not None:
            running.discard(reservation.reservation_id)
            if not running:
                del self._live[reservation.tenant_id]
        self._in_background(
            reservation.tenant_id, self._settle_with_retries(reservation, actual_tokens)
        )

    async def _settle_with_retries(self, reservation: RedisReservation, actual_tokens: int) -> None:
        for delay_s in SETTLE_RETRY_DELAYS_S:
            try:
                await self.settle_now(reservation, actual_tokens)
                return
            except RedisError:
                await asyncio.sleep(delay_s)
        try:
            await self.settle_now(reservation, actual_tokens)
        except RedisError as exc:
            logger.warning(
                "could not settle a quota reservation of tenant %s in Redis at %s (%s): its slot "
                "frees when its lease lapses, within %g s, and it stays charged at its estimate",
                reservation.tenant_id,
                self.address,
                exc,
                self.lease_s,
            )

    async def _forget(self, tenant_id: str, keys: list[str]) -> None:
        try:
            await self._client.unlink(*keys)
        except RedisError as exc:
            logger.warning(
                "could not drop the quota state of tenant %s in Redis at %s (%s); it expires "
                "when idle",
                tenant_id,
                self.address,
                exc,
            )

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.renew_now()
            except RedisError as exc:  # the next tick tries again, within the lease
                self._log_error("renewing quota leases", exc)

    def _in_background(self, tenant_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task this backend owns: later calls for the tenant wait for it,
        ``close`` waits for it or cancels it, and its failure is logged."""
        task = asyncio.create_task(work)
        tasks = self._pending.setdefault(tenant_id, set())
        tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            tasks.discard(finished)
            if not tasks and self._pending.get(tenant_id) is tasks:
                del self._pending[tenant_id]
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("quota state update failed", exc_info=finished.exception())

        task.add_done_callback(done)

    async def _after_pending(self, tenant_id: str) -> None:
        tasks = self._pending.get(tenant_id)
        if tasks:  # at most a round trip, usually; bounded all the same
            await asyncio.wait(set(tasks), timeout=self._timeout_s)

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """A script whose failure the tenant sees: Redis errors become ``Unavailable``."""
        try:
            return await script(keys, args)
        except RedisError as exc:
            self._log_error("a quota check", exc)
            raise Unavailable(
                "quotas cannot be checked right now; try again", retry_after_s=1.0
            ) from exc

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def _log_error(self, what: str, exc: RedisError) -> None:
        """At most one line per ``ERROR_LOG_INTERVAL_S``: an outage fails every request."""
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            logger.warning("%s failed: Redis at %s: %r", what, self.address, exc)


def _limit(value: int | None) -> int:
    return _UNLIMITED if value is None else value
