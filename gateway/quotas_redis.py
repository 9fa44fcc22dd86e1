"""Quota state in Redis, shared by the gateway's replicas; every reservation under a lease.

Each admission is one round trip: a Lua script that checks every limit and reserves all of them
at once (Redis runs a script alone, so two replicas' admissions never interleave), and each
settle is one more, sent in the background. The scripts read the time from the Redis server
(``TIME``), so the replicas' clocks do not matter. Per tenant, under one hash tag (so that every
script touches one cluster slot)::

    {prefix}{tenant}:leases      ZSET  reservation id -> lease deadline: the requests running
    {prefix}{tenant}:window      ZSET  reservation id -> admitted at: the 60 s window
    {prefix}{tenant}:tokens      HASH  reservation id -> tokens (reserved, then actual),
                                       and "#sum": their total, kept with them in one key
    {prefix}{tenant}:budget:day  HASH  period ("2025-01-31") -> the period's running total
    {prefix}{tenant}:budget:month      (the same per month)
    {prefix}{tenant}:meta        HASH  "budget" -> the kind of budget charged last (snapshots)
    {prefix}{tenant}:models      SET   the model ids that have a scope (for ``forget``)
    {prefix}{tenant}:keys        SET   the API key ids that have a scope (for ``forget``)

and the same six keys for each (tenant, model) scope, ``{prefix}{tenant}:m:{model}:leases`` and
so on, and for each (tenant, API key) scope, ``{prefix}{tenant}:k:{key}:leases`` and so on, the
id percent-encoded (``org%2Fmodel%3Av1``: no ``:``, ``{`` or ``}`` of its own, and one id gives
one name; ``m:`` and ``k:`` keep a model and a key of the same id apart). A reservation with
model or key scopes has its id in every scope's keys, under the same lease: it is reserved,
renewed and settled in all of them by one script.

**Rate-limit state.** The admission script also reads, after it reserved, what the answer's
``x-ratelimit-*`` headers say (``RateLimitState``): admitting stays one round trip. A ``peek``
(for answers that fail before admission) is one more script, which reserves nothing.

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
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.errors import Unavailable
from gateway.quotas_backend import (
    TENANT_SCOPE,
    WINDOW_S,
    Breach,
    BreachedLimit,
    BudgetMissing,
    QuotaState,
    RateLimitState,
    Reserved,
    ReserveOrder,
    ScopeKind,
    ScopeName,
)
from gateway.quotas_lua import ADMIT, INSTALL, PEEK, RENEW, SETTLE, SNAPSHOT
from gateway.tenants import BudgetPeriod, Quotas

__all__ = ["DEFAULT_KEY_PREFIX", "RedisQuotaBackend", "RedisReservation"]

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "fairgate:quota:"
DEFAULT_TIMEOUT_S = 2.0
# A settle that fails is tried again after each of these (then its lease lapses instead).
SETTLE_RETRY_DELAYS_S = (0.05, 0.25, 1.0)
# A budget's hash outlives its longest period by a day: after that only late settles need it.
BUDGET_TTL_S: dict[BudgetPeriod, int] = {"day": 2 * 86400, "month": 32 * 86400}
# The sets of a tenant's model and key scopes outlive every key of theirs (renewed on each
# admission).
REGISTRY_TTL_S = max(BUDGET_TTL_S.values())
# The namespace of a model's or a key's scope under its tenant's, and the set that lists them.
_SCOPE_NAMESPACE: dict[ScopeKind, str] = {"tenant": "", "model": "m:", "key": "k:"}
_REGISTRY: dict[ScopeKind, str] = {"model": "models", "key": "keys"}
ERROR_LOG_INTERVAL_S = 10.0
_UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class _ScopeKeys:
    """The keys of one scope: a tenant's overall, one of its models' or one of its keys'."""

    leases: str
    window: str
    tokens: str
    meta: str
    budget_day: str
    budget_month: str

    @classmethod
    def of(cls, prefix: str, tenant_id: str, scope: ScopeName = TENANT_SCOPE) -> _ScopeKeys:
        base = _tenant_base(prefix, tenant_id)
        if scope.kind != "tenant":
            base += f"{_SCOPE_NAMESPACE[scope.kind]}{quote(scope.scope_id, safe='')}:"
        return cls(
            leases=f"{base}leases",
            window=f"{base}window",
            tokens=f"{base}tokens",
            meta=f"{base}meta",
            budget_day=f"{base}budget:day",
            budget_month=f"{base}budget:month",
        )

    def budget(self, kind: BudgetPeriod | None) -> str:
        """The budget hash of ``kind``; without a budget, a key of the scope's the script does
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


def _tenant_base(prefix: str, tenant_id: str) -> str:
    return f"{prefix}{{{tenant_id}}}:"  # one hash tag: one cluster slot per tenant


def _registry_key(prefix: str, tenant_id: str, kind: ScopeKind) -> str:
    """The set of the tenant's scopes of ``kind`` ("model" or "key"), for ``forget``."""
    return f"{_tenant_base(prefix, tenant_id)}{_REGISTRY[kind]}"


@dataclass(frozen=True, slots=True)
class _ChargedScope:
    """One scope a reservation is charged in, and the budget its settle corrects there."""

    name: ScopeName
    kind: BudgetPeriod | None
    period: str | None


@dataclass(slots=True)
class RedisReservation:
    """One admission's reservation in Redis: its id, and what its settle corrects, in each scope
    it is charged in (``scopes``: the tenant's first, then its model's and key's, if any)."""

    backend: RedisQuotaBackend
    tenant_id: str
    reservation_id: str
    estimated_tokens: int
    scopes: tuple[_ChargedScope, ...]

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
        self._peek = self._client.register_script(PEEK)
        # Reservation ids: unique across replicas, and in admission order within one.
        self._replica_tag = secrets.token_hex(4)
        self._ids = itertools.count()
        # tenant -> its reservations running here: id -> its scopes besides the tenant's
        self._live: dict[str, dict[str, tuple[ScopeName, ...]]] = {}
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
        tenant_id = order.tenant_id
        await self._after_pending(tenant_id)
        reservation_id = f"{next(self._ids):012x}.{self._replica_tag}"
        scopes = order.scopes()
        kinds = [_budget_kind(scope.quotas) for scope in scopes]
        keys, args = self._admit_arguments(order, reservation_id, kinds)
        reply = await self._call(self._admit, keys, args)
        outcome, at, scope_index = reply[0], float(reply[1]), int(reply[5])
        periods = tuple(period or None for period in reply[6])
        if outcome == "missing":
            kind, period = kinds[scope_index - 1], periods[scope_index - 1]
            assert kind is not None and period is not None
            return BudgetMissing(kind, period, scopes[scope_index - 1].name)
        rate_limit = _rate_limit_state(reply[7])
        limit: BreachedLimit | None = reply[2] or None
        breach = None
        if limit is not None:
            breach = Breach(
                limit,
                num_used=int(reply[3]),
                frees_at=float(reply[4]),
                scope=scopes[scope_index - 1].name,
            )
        if outcome == "refused":
            return Reserved(at, periods, breach, None, rate_limit)
        charged = tuple(
            _ChargedScope(scope.name, kind, period)
            for scope, kind, period in zip(scopes, kinds, periods, strict=True)
        )
        self._live.setdefault(tenant_id, {})[reservation_id] = tuple(
            scope.name for scope in scopes[1:]
        )
        reservation = RedisReservation(
            self, tenant_id, reservation_id, order.estimated_tokens, charged
        )
        return Reserved(at, periods, breach, reservation, rate_limit)

    def _admit_arguments(
        self, order: ReserveOrder, reservation_id: str, kinds: list[BudgetPeriod | None]
    ) -> tuple[list[str], list[Any]]:
        """The admission script's KEYS and ARGV (``gateway.quotas_lua.ADMIT``)."""
        keys: list[str] = []
        args: list[Any] = [
            reservation_id,
            order.estimated_tokens,
            "1" if order.reserve_over_limit else "0",
            self.lease_s,
            WINDOW_S,
            self._now(),
            REGISTRY_TTL_S,
        ]
        for scope, kind in zip(order.scopes(), kinds, strict=True):
            scope_keys = _ScopeKeys.of(self._prefix, order.tenant_id, scope.name)
            is_tenant = scope.name.kind == "tenant"
            registry = (
                scope_keys.meta  # the tenant's own scope is in no registry: any key of its own
                if is_tenant
                else _registry_key(self._prefix, order.tenant_id, scope.name.kind)
            )
            keys += [
                scope_keys.leases,
                scope_keys.window,
                scope_keys.tokens,
                scope_keys.budget(kind),
                scope_keys.meta,
                registry,
            ]
            quotas = scope.quotas
            args += [
                "" if is_tenant else scope.name.scope_id,
                _limit(quotas.max_concurrent_requests),
                _limit(quotas.requests_per_minute),
                _limit(quotas.tokens_per_minute),
                _limit(quotas.token_budget),
                kind or "",
            ]
        return keys, args

    async def install_budget(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        period: str,
        recorded_tokens: int,
        scope: ScopeName = TENANT_SCOPE,
    ) -> None:
        keys = _ScopeKeys.of(self._prefix, tenant_id, scope)
        await self._call(
            self._install, [keys.budget(kind)], [period, recorded_tokens, BUDGET_TTL_S[kind]]
        )

    def forget(self, tenant_id: str) -> None:
        self._live.pop(tenant_id, None)
        self._in_background(tenant_id, self._forget(tenant_id))

    async def snapshot(self, tenant_id: str, scope: ScopeName = TENANT_SCOPE) -> QuotaState:
        await self._after_pending(tenant_id)
        keys = _ScopeKeys.of(self._prefix, tenant_id, scope)
        reply = await self._call(
            self._snapshot,
            keys.all(),
            [WINDOW_S, self._now()],
        )
        concurrent, requests, tokens, period, total = reply
        return QuotaState(int(concurrent), int(requests), int(tokens), int(total), period or None)

    async def peek(self, order: ReserveOrder) -> RateLimitState:
        await self._after_pending(order.tenant_id)
        keys: list[str] = []
        args: list[Any] = [WINDOW_S, self._now()]
        for scope in order.scopes():
            scope_keys = _ScopeKeys.of(self._prefix, order.tenant_id, scope.name)
            keys += [scope_keys.window, scope_keys.tokens]
            args += [
                _limit(scope.quotas.requests_per_minute),
                _limit(scope.quotas.tokens_per_minute),
            ]
        return _rate_limit_state(await self._call(self._peek, keys, args))

    async def settle_now(self, reservation: RedisReservation, actual_tokens: int) -> bool:
        """Settle in Redis now: True when this call settled it, False when it was not live any
        more (settled already, lapsed, or its tenant forgotten). Safe to repeat."""
        keys: list[str] = []
        args: list[str | int] = [
            reservation.reservation_id,
            reservation.estimated_tokens,
            actual_tokens,
            self._now(),
        ]
        for scope in reservation.scopes:
            scope_keys = _ScopeKeys.of(self._prefix, reservation.tenant_id, scope.name)
            keys += [scope_keys.leases, scope_keys.tokens, scope_keys.budget(scope.kind)]
            args.append(scope.period or "")
        settled = await self._settle(keys, args)
        return bool(settled)

    async def renew_now(self) -> int:
        """Renew the leases of every reservation running here, in one pipelined call; how many
        had lapsed already (they stay lapsed, and are no longer renewed)."""
        live = {tenant: dict(sorted(ids.items())) for tenant, ids in self._live.items() if ids}
        if not live:
            return 0
        async with self._client.pipeline(transaction=False) as pipe:
            for tenant_id, ids in live.items():
                keys = [_ScopeKeys.of(self._prefix, tenant_id).leases]
                scope_index: dict[ScopeName, int] = {}  # scope -> its leases' index in KEYS
                args: list[Any] = [self.lease_s, self._now()]
                for reservation_id, others in ids.items():
                    args += [reservation_id, len(others)]
                    for scope in others:
                        if scope not in scope_index:
                            keys.append(_ScopeKeys.of(self._prefix, tenant_id, scope).leases)
                            scope_index[scope] = len(keys)  # 1-based, as Lua counts
                        args.append(scope_index[scope])
                await self._renew(keys, args, client=pipe)
            replies = await pipe.execute()
        num_lapsed = 0
        for tenant_id, lost in zip(live, replies, strict=True):
            running = self._live.get(tenant_id, {})
            lapsed = running.keys() & set(lost)  # not those settled since the renewal left
            for reservation_id in lapsed:
                del running[reservation_id]
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
            running.pop(reservation.reservation_id, None)
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

    async def _forget(self, tenant_id: str) -> None:
        """Drop every key of the tenant's, its model and key scopes' included: two round trips,
        so a scope an admission adds in between (another replica's; this one's wait for this)
        stays until it expires when idle."""
        registries: dict[ScopeKind, str] = {
            kind: _registry_key(self._prefix, tenant_id, kind) for kind in _REGISTRY
        }
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for registry in registries.values():
                    pipe.smembers(registry)
                members = await pipe.execute()
            keys = [*_ScopeKeys.of(self._prefix, tenant_id).all(), *registries.values()]
            for kind, scope_ids in zip(registries, members, strict=True):
                for member in sorted(scope_ids):  # str, as the client decodes responses
                    scope_id = member.decode() if isinstance(member, bytes) else member
                    keys += _ScopeKeys.of(self._prefix, tenant_id, ScopeName(kind, scope_id)).all()
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


def _budget_kind(quotas: Quotas) -> BudgetPeriod | None:
    return quotas.budget_period if quotas.token_budget is not None else None


def _rate_limit_state(reply: list[str]) -> RateLimitState:
    """The scripts' ``rate_limit`` (``gateway.quotas_lua``): limit, remaining, reset_s of
    requests, then of tokens, as strings ('' : no such limit; %.17g, so counts are read as
    floats first)."""
    limit_requests, remaining_requests, reset_requests_s = reply[:3]
    limit_tokens, remaining_tokens, reset_tokens_s = reply[3:]
    return RateLimitState(
        limit_requests=_count(limit_requests),
        remaining_requests=_count(remaining_requests),
        reset_requests_s=_seconds(reset_requests_s),
        limit_tokens=_count(limit_tokens),
        remaining_tokens=_count(remaining_tokens),
        reset_tokens_s=_seconds(reset_tokens_s),
    )


def _count(value: str) -> int | None:
    return None if value == "" else int(float(value))


def _seconds(value: str) -> float | None:
    return None if value == "" else float(value)
