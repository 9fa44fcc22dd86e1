"""Per-tenant quotas: concurrent requests, requests and tokens per minute, and the token budget of
a day or month.

**Reserve, then settle.** ``QuotaManager.admit`` charges a request before it runs, at its worst
case (prompt tokens + ``max_tokens``): one concurrency slot, one request and ``estimated_tokens`` in
the sliding 60 s windows, and ``estimated_tokens`` against the budget of the current period.
``QuotaManager.settle`` (when the request ends, however it ends) frees the slot and replaces the
estimate by the real usage, in the window and in that period's running total. Charging up front is
what keeps streaming and concurrent requests from overshooting a limit (LiteLLM's lesson in
``architecture.md``): between a check and its reservation there is no ``await``, so on one event
loop no other admission can slip in between.

**Reject or demote.** Over a limit, the tenant's ``over_quota`` policy decides: ``reject`` raises
``RateLimited`` (with the seconds until the window frees enough) or, for the budget,
``QuotaExhausted`` (with the seconds until the period ends); ``demote`` admits the request anyway
with ``Admission.demoted`` set, and the caller lowers its priority. A demoted request is charged
everywhere all the same: demotion changes priority, not accounting.

The budget starts from the usage the store has recorded for the period, loaded once per
(tenant, period); from then on the manager keeps the running total itself (the gateway writes the
usage ledger separately). The tenant is passed on every call, so quota changes apply at once.
In memory, one event loop, no threads. Torch-free.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.errors import QuotaExhausted, RateLimited
from gateway.tenants import BudgetPeriod, Quotas, Tenant, period_bounds, period_of

__all__ = ["Admission", "BudgetUsage", "QuotaManager", "QuotaState"]

WINDOW_S = 60.0
CONCURRENCY_RETRY_AFTER_S = 1.0  # no way to know when a running request ends: a short hint
MIN_RETRY_AFTER_S = 0.01

# (tenant_id, kind, period) -> tokens recorded in the store, e.g. ``SQLiteStore.total_tokens``.
BudgetUsage = Callable[[str, BudgetPeriod, str], Awaitable[int]]


@dataclass(slots=True)
class QuotaState:
    """A tenant's quota usage now, for the admin API and tests. Unsettled requests count at their
    reserved size in ``tokens_last_minute`` and ``budget_used``."""

    concurrent: int
    requests_last_minute: int
    tokens_last_minute: int
    budget_used: int  # in ``budget_period``: recorded + settled + reserved
    budget_period: str | None  # the period last charged ("2025-01", "2025-01-31"), or None


@dataclass(slots=True)
class _WindowEntry:
    """One request in the tokens-per-minute window: its reservation, then its actual usage."""

    at: float
    tokens: int
    is_in_window: bool = True


@dataclass(slots=True)
class _Budget:
    """One period's running total for one tenant."""

    kind: BudgetPeriod
    period: str
    used: int  # recorded in the store when loaded, plus what was settled since
    reserved: int = 0  # estimates of requests not settled yet

    @property
    def total(self) -> int:
        return self.used + self.reserved


@dataclass(slots=True)
class _TenantState:
    num_concurrent: int = 0
    request_times: deque[float] = field(default_factory=deque)
    token_entries: deque[_WindowEntry] = field(default_factory=deque)
    num_window_tokens: int = 0  # invariant: the sum of token_entries' tokens
    budget: _Budget | None = None  # the period charged last

    def prune(self, now: float) -> None:
        """Drop what left the window; amortized O(1) per request, as each leaves once."""
        horizon = now - WINDOW_S
        while self.request_times and self.request_times[0] <= horizon:
            self.request_times.popleft()
        while self.token_entries and self.token_entries[0].at <= horizon:
            entry = self.token_entries.popleft()
            entry.is_in_window = False
            self.num_window_tokens -= entry.tokens


@dataclass(slots=True)
class Admission:
    """A request let in, with what it reserved; hand it to ``QuotaManager.settle`` exactly when
    the request ends (more calls do nothing). ``period``: the budget period it was charged to, or
    None when the tenant has no budget. ``demoted``: over a limit under the ``demote`` policy,
    ``demoted_reason`` says which."""

    tenant_id: str
    estimated_tokens: int
    admitted_at: float
    period: str | None
    demoted: bool
    demoted_reason: str | None
    _state: _TenantState = field(repr=False, compare=False)
    _window_entry: _WindowEntry = field(repr=False, compare=False)
    _budget: _Budget | None = field(repr=False, compare=False)
    _is_settled: bool = field(default=False, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class _Refusal:
    """A failed check: what to raise under ``reject``, the demotion reason under ``demote``."""

    message: str
    retry_after_s: float
    is_budget: bool = False

    def error(self) -> RateLimited:
        kind = QuotaExhausted if self.is_budget else RateLimited
        return kind(self.message, retry_after_s=self.retry_after_s)


class QuotaManager:
    """Admits requests against their tenant's quotas and settles them when they end. Call
    everything from the gateway's event loop; ``settle`` and ``forget`` never wait."""

    def __init__(
        self, budget_usage: BudgetUsage, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._budget_usage = budget_usage
        self._clock = clock
        self._states: dict[str, _TenantState] = {}
        self._loading: dict[tuple[str, BudgetPeriod, str], asyncio.Event] = {}

    async def admit(self, tenant: Tenant, *, estimated_tokens: int) -> Admission:
        """Check and reserve; raises ``RateLimited`` / ``QuotaExhausted`` over a limit when the
        tenant's policy is ``reject``."""
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, not {estimated_tokens}")
        quotas = tenant.quotas
        budget = None
        while True:  # until the current period's budget is loaded; usually at most one await
            now = self._clock()
            if quotas.token_budget is None:
                break
            period = period_of(now, quotas.budget_period)
            budget = self._loaded_budget(tenant.tenant_id, quotas.budget_period, period)
            if budget is not None:
                break
            await self._load_budget(tenant.tenant_id, quotas.budget_period, period)
        # From here on no await: check and reserve are one step.
        state = self._states.setdefault(tenant.tenant_id, _TenantState())
        state.prune(now)
        refusal = _first_refusal(state, budget, quotas, now, estimated_tokens)
        if refusal is not None and tenant.over_quota == "reject":
            raise refusal.error()
        entry = _WindowEntry(now, estimated_tokens)
        state.num_concurrent += 1
        state.request_times.append(now)
        state.token_entries.append(entry)
        state.num_window_tokens += estimated_tokens
        if budget is not None:
            budget.reserved += estimated_tokens
        return Admission(
            tenant_id=tenant.tenant_id,
            estimated_tokens=estimated_tokens,
            admitted_at=now,
            period=None if budget is None else budget.period,
            demoted=refusal is not None,
            demoted_reason=None if refusal is None else refusal.message,
            _state=state,
            _window_entry=entry,
            _budget=budget,
        )

    def settle(self, admission: Admission, *, actual_tokens: int) -> None:
        """The request ended having used ``actual_tokens`` (prompt + completion; 0 when it failed
        before running): free its slot and replace its reservation by that. Idempotent."""
        if admission._is_settled:
            return
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, not {actual_tokens}")
        admission._is_settled = True
        state = admission._state
        state.num_concurrent -= 1
        entry = admission._window_entry
        if entry.is_in_window:
            state.num_window_tokens += actual_tokens - entry.tokens
        entry.tokens = actual_tokens
        budget = admission._budget
        if budget is not None:  # the period it was charged to, even if a new one has begun
            budget.reserved -= admission.estimated_tokens
            budget.used += actual_tokens

    def forget(self, tenant_id: str) -> None:
        """Drop a deleted tenant's state; its requests still running settle harmlessly."""
        self._states.pop(tenant_id, None)

    def snapshot(self, tenant_id: str) -> QuotaState:
        state = self._states.get(tenant_id)
        if state is None:
            return QuotaState(0, 0, 0, 0, None)
        state.prune(self._clock())
        budget = state.budget
        return QuotaState(
            concurrent=state.num_concurrent,
            requests_last_minute=len(state.request_times),
            tokens_last_minute=state.num_window_tokens,
            budget_used=0 if budget is None else budget.total,
            budget_period=None if budget is None else budget.period,
        )

    def _loaded_budget(self, tenant_id: str, kind: BudgetPeriod, period: str) -> _Budget | None:
        state = self._states.get(tenant_id)
        budget = None if state is None else state.budget
        if budget is None or (budget.kind, budget.period) != (kind, period):
            return None
        return budget

    async def _load_budget(self, tenant_id: str, kind: BudgetPeriod, period: str) -> None:
        """Load the store's usage for the period once, however many admissions wait for it. If
        the load fails, its caller sees the error and the waiters try again themselves."""
        key = (tenant_id, kind, period)
        loading = self._loading.get(key)
        if loading is not None:
            await loading.wait()  # Event.wait: cancelling one waiter leaves the others be
            return
        loading = self._loading[key] = asyncio.Event()
        try:
            used = await self._budget_usage(tenant_id, kind, period)
            state = self._states.setdefault(tenant_id, _TenantState())
            state.budget = _Budget(kind, period, used)  # a replaced period lives on in admissions
        finally:
            del self._loading[key]
            loading.set()


def _first_refusal(
    state: _TenantState, budget: _Budget | None, quotas: Quotas, now: float, estimated: int
) -> _Refusal | None:
    """The first limit this request would break, in the order the checks are documented."""
    return (
        _check_concurrency(state, quotas)
        or _check_requests_per_minute(state, quotas, now)
        or _check_tokens_per_minute(state, quotas, now, estimated)
        or _check_budget(budget, quotas, now, estimated)
    )


def _check_concurrency(state: _TenantState, quotas: Quotas) -> _Refusal | None:
    limit = quotas.max_concurrent_requests
    if limit is None or state.num_concurrent < limit:
        return None
    return _Refusal(
        f"too many concurrent requests: max_concurrent_requests is {limit}",
        CONCURRENCY_RETRY_AFTER_S,
    )


def _check_requests_per_minute(state: _TenantState, quotas: Quotas, now: float) -> _Refusal | None:
    limit = quotas.requests_per_minute
    num_requests = len(state.request_times)
    if limit is None or num_requests < limit:
        return None
    # Demoted requests or a lowered limit can leave more than `limit` in the window: this one
    # fits once all but limit - 1 have left.
    frees_at = state.request_times[num_requests - limit] + WINDOW_S
    return _Refusal(
        f"rate limit reached: requests_per_minute is {limit}", _retry_after(frees_at, now)
    )


def _check_tokens_per_minute(
    state: _TenantState, quotas: Quotas, now: float, estimated: int
) -> _Refusal | None:
    limit = quotas.tokens_per_minute
    if limit is None or state.num_window_tokens + estimated <= limit:
        return None
    if estimated > limit:
        return _Refusal(
            f"this request needs up to {estimated} tokens (prompt + max_tokens), more than "
            f"tokens_per_minute ({limit}) allows at all; lower max_tokens",
            WINDOW_S,
        )
    # Walk the window from its oldest entry until enough tokens have left. Only on refusal, and
    # an upper bound: a request settling below its reservation frees tokens sooner.
    excess = state.num_window_tokens + estimated - limit
    frees_at = now + WINDOW_S
    for entry in state.token_entries:
        excess -= entry.tokens
        if excess <= 0:
            frees_at = entry.at + WINDOW_S
            break
    return _Refusal(
        f"rate limit reached: tokens_per_minute is {limit}; {state.num_window_tokens} are used "
        f"or reserved and this request needs up to {estimated}",
        _retry_after(frees_at, now),
    )


def _check_budget(
    budget: _Budget | None, quotas: Quotas, now: float, estimated: int
) -> _Refusal | None:
    limit = quotas.token_budget
    if limit is None or budget is None or budget.total + estimated <= limit:
        return None
    period_end = period_bounds(now, budget.kind)[1]
    if estimated > limit:
        message = (
            f"this request needs up to {estimated} tokens (prompt + max_tokens), more than the "
            f"whole token_budget of {limit} per {budget.kind}; lower max_tokens"
        )
    else:
        message = (
            f"token budget exhausted: token_budget is {limit} per {budget.kind}; {budget.total} "
            f"are used or reserved in {budget.period} and this request needs up to {estimated}"
        )
    return _Refusal(message, _retry_after(period_end, now), is_budget=True)


def _retry_after(frees_at: float, now: float) -> float:
    return max(MIN_RETRY_AFTER_S, frees_at - now)
