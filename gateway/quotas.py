"""Per-tenant quotas: concurrent requests, requests and tokens per minute, and the token budget of
a day or month.

**Reserve, then settle.** ``QuotaManager.admit`` charges a request before it runs, at its worst
case (prompt tokens + ``max_tokens``): one concurrency slot, one request and ``estimated_tokens`` in
the sliding 60 s windows, and ``estimated_tokens`` against the budget of the current period.
``QuotaManager.settle`` (when the request ends, however it ends) frees the slot and replaces the
estimate by the real usage, in the window and in that period's running total. Charging up front is
what keeps streaming and concurrent requests from overshooting a limit (LiteLLM's lesson in
``architecture.md``): the backend checks and reserves every limit in one atomic step.

**Reject or demote.** Over a limit, the tenant's ``over_quota`` policy decides: ``reject`` raises
``RateLimited`` (with the seconds until the window frees enough) or, for the budget,
``QuotaExhausted`` (with the seconds until the period ends); ``demote`` admits the request anyway
with ``Admission.demoted`` set, and the caller lowers its priority. A demoted request is charged
everywhere all the same: demotion changes priority, not accounting.

**Where the state lives** (``gateway.quotas_backend``): in this process's memory
(``MemoryQuotaBackend``, one gateway), or in Redis, shared by the gateway's replicas
(``gateway.quotas_redis``), where every reservation carries a lease that its replica renews while
the request runs, so a replica that dies leaks nothing for longer than the lease. This module is
the policy, the same for both: what to refuse, what to tell the tenant, when to load a budget.

The budget starts from the usage the store has recorded for the period, loaded once per
(tenant, period) and installed in the backend; from then on the backend keeps the running total
(the gateway writes the usage ledger separately). The tenant is passed on every call, so quota
changes apply at once. Torch-free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.errors import QuotaExhausted, RateLimited, Unavailable
from gateway.quotas_backend import (
    WINDOW_S,
    Breach,
    QuotaBackend,
    QuotaState,
    Reservation,
    Reserved,
    ReserveOrder,
)
from gateway.quotas_memory import MemoryQuotaBackend
from gateway.tenants import BudgetPeriod, Quotas, Tenant, period_bounds

__all__ = ["Admission", "BudgetUsage", "QuotaManager", "QuotaState"]

CONCURRENCY_RETRY_AFTER_S = 1.0  # no way to know when a running request ends: a short hint
MIN_RETRY_AFTER_S = 0.01
# An admission orders at most this many times: the budget it needs is loaded in between, and
# another replica or `forget` may drop it again; past this something is wrong with the state.
MAX_ORDERS = 4

# (tenant_id, kind, period) -> tokens recorded in the store, e.g. ``SQLiteStore.total_tokens``.
BudgetUsage = Callable[[str, BudgetPeriod, str], Awaitable[int]]


@dataclass(slots=True)
class Admission:
    """A request let in, with what it reserved; hand it to ``QuotaManager.settle`` exactly when
    the request ends (more calls do nothing). ``admitted_at``: the backend's clock (the Redis
    server's with Redis). ``period``: the budget period it was charged to, or None when the
    tenant has no budget. ``demoted``: over a limit under the ``demote`` policy,
    ``demoted_reason`` says which."""

    tenant_id: str
    estimated_tokens: int
    admitted_at: float
    period: str | None
    demoted: bool
    demoted_reason: str | None
    _reservation: Reservation = field(repr=False, compare=False)
    _is_settled: bool = field(default=False, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class _Refusal:
    """A breach put in words: what to raise under ``reject``, the demotion reason under
    ``demote``."""

    message: str
    retry_after_s: float
    is_budget: bool = False

    def error(self) -> RateLimited:
        kind = QuotaExhausted if self.is_budget else RateLimited
        return kind(self.message, retry_after_s=self.retry_after_s)


class QuotaManager:
    """Admits requests against their tenant's quotas and settles them when they end. Call
    everything from the gateway's event loop; ``settle`` and ``forget`` never wait. ``start``
    before the first admission and ``close`` at the end (with Redis: the lease renewals, the
    settles still on their way, the connection)."""

    def __init__(self, budget_usage: BudgetUsage, backend: QuotaBackend | None = None) -> None:
        self._budget_usage = budget_usage
        self._backend: QuotaBackend = MemoryQuotaBackend() if backend is None else backend
        self._loading: dict[tuple[str, BudgetPeriod, str], asyncio.Event] = {}
        # (tenant_id, kind) -> the period this manager installed last. Another admission's
        # `BudgetMissing` may have been answered before that install: order once more first.
        self._installed: dict[tuple[str, BudgetPeriod], str] = {}

    async def start(self) -> None:
        await self._backend.start()

    async def close(self) -> None:
        await self._backend.close()

    async def admit(self, tenant: Tenant, *, estimated_tokens: int) -> Admission:
        """Check and reserve; raises ``RateLimited`` / ``QuotaExhausted`` over a limit when the
        tenant's policy is ``reject``, ``Unavailable`` when the quota state cannot be reached."""
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, not {estimated_tokens}")
        quotas = tenant.quotas
        order = ReserveOrder(
            tenant_id=tenant.tenant_id,
            quotas=quotas,
            estimated_tokens=estimated_tokens,
            reserve_over_limit=tenant.over_quota == "demote",
        )
        is_reordered = False
        for _ in range(MAX_ORDERS):
            outcome = await self._backend.reserve(order)
            if isinstance(outcome, Reserved):
                break
            installed = self._installed.get((tenant.tenant_id, outcome.kind))
            if installed == outcome.period and not is_reordered:
                is_reordered = True
                continue
            await self._load_budget(tenant.tenant_id, outcome.kind, outcome.period)
        else:
            raise Unavailable(
                "this tenant's token budget could not be loaded; try again", retry_after_s=1.0
            )
        refusal = None
        if outcome.breach is not None:
            refusal = _refusal(outcome, quotas, estimated_tokens)
        if outcome.reservation is None:
            assert refusal is not None, "a backend refuses only over a limit"
            raise refusal.error()
        return Admission(
            tenant_id=tenant.tenant_id,
            estimated_tokens=estimated_tokens,
            admitted_at=outcome.at,
            period=outcome.period,
            demoted=refusal is not None,
            demoted_reason=None if refusal is None else refusal.message,
            _reservation=outcome.reservation,
        )

    def settle(self, admission: Admission, *, actual_tokens: int) -> None:
        """The request ended having used ``actual_tokens`` (prompt + completion; 0 when it failed
        before running): free its slot and replace its reservation by that. Idempotent."""
        if admission._is_settled:
            return
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, not {actual_tokens}")
        admission._is_settled = True
        admission._reservation.settle(actual_tokens)

    def forget(self, tenant_id: str) -> None:
        """Drop a deleted tenant's state; its requests still running settle harmlessly."""
        for key in [key for key in self._installed if key[0] == tenant_id]:
            del self._installed[key]
        self._backend.forget(tenant_id)

    async def snapshot(self, tenant_id: str) -> QuotaState:
        """The tenant's usage now, after this manager's own settles (with Redis: what every
        replica reserved and settled)."""
        return await self._backend.snapshot(tenant_id)

    async def _load_budget(self, tenant_id: str, kind: BudgetPeriod, period: str) -> None:
        """Load the store's usage for the period once, however many admissions wait for it, and
        install it. If the load fails, its caller sees the error and the waiters try again
        themselves."""
        key = (tenant_id, kind, period)
        loading = self._loading.get(key)
        if loading is not None:
            await loading.wait()  # Event.wait: cancelling one waiter leaves the others be
            return
        loading = self._loading[key] = asyncio.Event()
        try:
            used = await self._budget_usage(tenant_id, kind, period)
            await self._backend.install_budget(tenant_id, kind, period, used)
            self._installed[(tenant_id, kind)] = period
        finally:
            del self._loading[key]
            loading.set()


def _refusal(outcome: Reserved, quotas: Quotas, estimated: int) -> _Refusal:
    """What the tenant is told about the outcome's breach, and when to try again."""
    breach, now = outcome.breach, outcome.at
    assert breach is not None
    match breach.limit:
        case "max_concurrent_requests":
            return _Refusal(
                "too many concurrent requests: max_concurrent_requests is "
                f"{quotas.max_concurrent_requests}",
                CONCURRENCY_RETRY_AFTER_S,
            )
        case "requests_per_minute":
            return _Refusal(
                f"rate limit reached: requests_per_minute is {quotas.requests_per_minute}",
                _retry_after(breach.frees_at, now),
            )
        case "tokens_per_minute":
            limit = quotas.tokens_per_minute
            assert limit is not None, "a breached limit is set"
            if estimated > limit:
                return _Refusal(
                    f"this request needs up to {estimated} tokens (prompt + max_tokens), more "
                    f"than tokens_per_minute ({limit}) allows at all; lower max_tokens",
                    WINDOW_S,
                )
            return _Refusal(
                f"rate limit reached: tokens_per_minute is {limit}; {breach.num_used} are used "
                f"or reserved and this request needs up to {estimated}",
                _retry_after(breach.frees_at, now),
            )
        case "token_budget":
            return _budget_refusal(breach, quotas, now, estimated, outcome.period)


def _budget_refusal(
    breach: Breach, quotas: Quotas, now: float, estimated: int, period: str | None
) -> _Refusal:
    limit, kind = quotas.token_budget, quotas.budget_period
    assert limit is not None, "a breached limit is set"
    if estimated > limit:
        message = (
            f"this request needs up to {estimated} tokens (prompt + max_tokens), more than the "
            f"whole token_budget of {limit} per {kind}; lower max_tokens"
        )
    else:
        message = (
            f"token budget exhausted: token_budget is {limit} per {kind}; {breach.num_used} "
            f"are used or reserved in {period} and this request needs up to {estimated}"
        )
    return _Refusal(message, _retry_after(period_bounds(now, kind)[1], now), is_budget=True)


def _retry_after(frees_at: float, now: float) -> float:
    return max(MIN_RETRY_AFTER_S, frees_at - now)
