"""Quota state in the gateway's memory: one gateway, one event loop, no threads.

Per scope (a tenant's overall, one (tenant, model) or one (tenant, API key)): the number of
requests running, the sliding 60 s windows of requests and of tokens (each admitted request's
reservation, replaced by its actual usage when it settles), and the running total of the budget
period charged last.
``reserve`` never awaits, so a check and its reservation, in all of an order's scopes, are one
step on the loop: no other admission can slip in between. A period's total starts from the
store's recorded usage (``install_budget``); a request charged to a period that has since been
replaced settles into that old total, which nobody reads any more. Torch-free.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.quotas_backend import (
    TENANT_SCOPE,
    WINDOW_S,
    Breach,
    BudgetMissing,
    QuotaState,
    RateLimitState,
    Reserved,
    ReserveOrder,
    ScopeName,
    WindowUse,
    rate_limit_of,
)
from gateway.tenants import BudgetPeriod, Quotas, period_of

__all__ = ["MemoryQuotaBackend"]


@dataclass(slots=True)
class _WindowEntry:
    """One request in the windows: its reservation, then its actual usage."""

    at: float
    tokens: int
    is_in_window: bool = True


@dataclass(slots=True)
class _Budget:
    """One period's running total for one scope."""

    kind: BudgetPeriod
    period: str
    used: int  # recorded in the store when installed, plus what was settled since
    reserved: int = 0  # estimates of requests not settled yet

    @property
    def total(self) -> int:
        return self.used + self.reserved


@dataclass(slots=True)
class _ScopeState:
    """What one scope holds: a tenant's overall, one of its models' or one of its keys'."""

    num_concurrent: int = 0
    entries: deque[_WindowEntry] = field(default_factory=deque)  # oldest first
    num_window_tokens: int = 0  # invariant: the sum of entries' tokens
    budget: _Budget | None = None  # the period charged last

    def prune(self, now: float) -> None:
        """Drop what left the window; amortized O(1) per request, as each leaves once."""
        horizon = now - WINDOW_S
        while self.entries and self.entries[0].at <= horizon:
            entry = self.entries.popleft()
            entry.is_in_window = False
            self.num_window_tokens -= entry.tokens

    def use(self) -> WindowUse:
        """What the window holds (prune it first)."""
        newest_at = self.entries[-1].at if self.entries else None
        return WindowUse(len(self.entries), self.num_window_tokens, newest_at)


@dataclass(slots=True)
class _ScopeCharge:
    """What one reservation holds in one scope."""

    state: _ScopeState
    entry: _WindowEntry
    budget: _Budget | None


@dataclass(slots=True)
class _MemoryReservation:
    charges: list[_ScopeCharge]  # one per scope of the order
    estimated_tokens: int

    def settle(self, actual_tokens: int) -> None:
        for charge in self.charges:
            state, entry, budget = charge.state, charge.entry, charge.budget
            state.num_concurrent -= 1
            if entry.is_in_window:
                state.num_window_tokens += actual_tokens - entry.tokens
            entry.tokens = actual_tokens
            if budget is not None:  # the period it was charged to, even if a new one has begun
                budget.reserved -= self.estimated_tokens
                budget.used += actual_tokens


class MemoryQuotaBackend:
    """``QuotaBackend`` in this process's memory. ``clock``: seconds since the epoch (tests pass
    a fake one)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # tenant_id -> scope -> its state
        self._tenants: dict[str, dict[ScopeName, _ScopeState]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def reserve(self, order: ReserveOrder) -> Reserved | BudgetMissing:
        now = self._clock()
        scopes = self._tenants.get(order.tenant_id, {})
        # Every scope's budget first: one that is missing reserves nothing anywhere.
        budgets: list[_Budget | None] = []
        for scope in order.scopes():
            budget = None
            if scope.quotas.token_budget is not None:
                kind = scope.quotas.budget_period
                current = period_of(now, kind)
                state = scopes.get(scope.name)
                budget = None if state is None else state.budget
                if budget is None or (budget.kind, budget.period) != (kind, current):
                    return BudgetMissing(kind, current, scope.name)
            budgets.append(budget)
        scopes = self._tenants.setdefault(order.tenant_id, {})
        estimated = order.estimated_tokens
        states: list[_ScopeState] = []
        breach = None
        for scope, budget in zip(order.scopes(), budgets, strict=True):
            state = scopes.setdefault(scope.name, _ScopeState())
            state.prune(now)
            states.append(state)
            if breach is None:  # the first breach wins, in the order of the scopes
                breach = _first_breach(state, budget, scope.quotas, now, estimated, scope.name)
        periods = tuple(None if budget is None else budget.period for budget in budgets)
        reservation = None
        if breach is None or order.reserve_over_limit:
            charges = []
            for state, budget in zip(states, budgets, strict=True):
                entry = _WindowEntry(now, estimated)
                state.num_concurrent += 1
                state.entries.append(entry)
                state.num_window_tokens += estimated
                if budget is not None:
                    budget.reserved += estimated
                charges.append(_ScopeCharge(state, entry, budget))
            reservation = _MemoryReservation(charges, estimated)
        rate_limit = _rate_limit(order, states, now)
        return Reserved(now, periods, breach, reservation, rate_limit)

    async def install_budget(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        period: str,
        recorded_tokens: int,
        scope: ScopeName = TENANT_SCOPE,
    ) -> None:
        scopes = self._tenants.setdefault(tenant_id, {})
        state = scopes.setdefault(scope, _ScopeState())
        budget = state.budget
        if budget is not None and budget.kind == kind and budget.period >= period:
            return  # loaded already, or a later period has begun
        state.budget = _Budget(kind, period, recorded_tokens)  # the old one lives on in admissions

    def forget(self, tenant_id: str) -> None:
        self._tenants.pop(tenant_id, None)

    async def snapshot(self, tenant_id: str, scope: ScopeName = TENANT_SCOPE) -> QuotaState:
        state = self._tenants.get(tenant_id, {}).get(scope)
        if state is None:
            return QuotaState(0, 0, 0, 0, None)
        state.prune(self._clock())
        budget = state.budget
        return QuotaState(
            concurrent=state.num_concurrent,
            requests_last_minute=len(state.entries),
            tokens_last_minute=state.num_window_tokens,
            budget_used=0 if budget is None else budget.total,
            budget_period=None if budget is None else budget.period,
        )

    async def peek(self, order: ReserveOrder) -> RateLimitState:
        now = self._clock()
        scopes = self._tenants.get(order.tenant_id, {})
        states = []
        for scope in order.scopes():
            state = scopes.get(scope.name)
            if state is None:
                state = _ScopeState()  # not kept: a peek leaves no state behind
            state.prune(now)
            states.append(state)
        return _rate_limit(order, states, now)


def _rate_limit(order: ReserveOrder, states: list[_ScopeState], now: float) -> RateLimitState:
    """The rate-limit state of the order's scopes, whose windows are ``states`` (pruned)."""
    scopes = zip(order.scopes(), states, strict=True)
    return rate_limit_of([(scope.quotas, state.use()) for scope, state in scopes], now)


def _first_breach(
    state: _ScopeState,
    budget: _Budget | None,
    quotas: Quotas,
    now: float,
    estimated: int,
    scope: ScopeName,
) -> Breach | None:
    """The first limit of the scope this request would break, in the order the checks are
    documented."""
    limit = quotas.max_concurrent_requests
    if limit is not None and state.num_concurrent >= limit:
        return Breach("max_concurrent_requests", scope=scope)
    limit = quotas.requests_per_minute
    num_requests = len(state.entries)
    if limit is not None and num_requests >= limit:
        # Demoted requests or a lowered limit can leave more than `limit` in the window: this
        # one fits once all but limit - 1 have left.
        frees_at = state.entries[num_requests - limit].at + WINDOW_S
        return Breach("requests_per_minute", frees_at=frees_at, scope=scope)
    limit = quotas.tokens_per_minute
    if limit is not None and state.num_window_tokens + estimated > limit:
        return Breach(
            "tokens_per_minute",
            num_used=state.num_window_tokens,
            frees_at=_tokens_free_at(state, state.num_window_tokens + estimated - limit, now),
            scope=scope,
        )
    limit = quotas.token_budget
    if limit is not None and budget is not None and budget.total + estimated > limit:
        return Breach("token_budget", num_used=budget.total, scope=scope)
    return None


def _tokens_free_at(state: _ScopeState, excess: int, now: float) -> float:
    """Walk the window from its oldest entry until ``excess`` tokens have left. Only on refusal,
    and an upper bound: a request settling below its reservation frees tokens sooner."""
    for entry in state.entries:
        excess -= entry.tokens
        if excess <= 0:
            return entry.at + WINDOW_S
    return now + WINDOW_S
