"""Quota state in the gateway's memory: one gateway, one event loop, no threads.

Per tenant: the number of requests running, the sliding 60 s windows of requests and of tokens
(each admitted request's reservation, replaced by its actual usage when it settles), and the
running total of the budget period charged last. ``reserve`` never awaits, so a check and its
reservation are one step on the loop: no other admission can slip in between. A period's total
starts from the store's recorded usage (``install_budget``); a request charged to a period that
has since been replaced settles into that old total, which nobody reads any more. Torch-free.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.quotas_backend import (
    WINDOW_S,
    Breach,
    BudgetMissing,
    QuotaState,
    Reserved,
    ReserveOrder,
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
    """One period's running total for one tenant."""

    kind: BudgetPeriod
    period: str
    used: int  # recorded in the store when installed, plus what was settled since
    reserved: int = 0  # estimates of requests not settled yet

    @property
    def total(self) -> int:
        return self.used + self.reserved


@dataclass(slots=True)
class _TenantState:
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


@dataclass(slots=True)
class _MemoryReservation:
    state: _TenantState
    entry: _WindowEntry
    budget: _Budget | None
    estimated_tokens: int

    def settle(self, actual_tokens: int) -> None:
        state = self.state
        state.num_concurrent -= 1
        entry = self.entry
        if entry.is_in_window:
            state.num_window_tokens += actual_tokens - entry.tokens
        entry.tokens = actual_tokens
        budget = self.budget
        if budget is not None:  # the period it was charged to, even if a new one has begun
            budget.reserved -= self.estimated_tokens
            budget.used += actual_tokens


class MemoryQuotaBackend:
    """``QuotaBackend`` in this process's memory. ``clock``: seconds since the epoch (tests pass
    a fake one)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: dict[str, _TenantState] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def reserve(self, order: ReserveOrder) -> Reserved | BudgetMissing:
        now = self._clock()
        quotas = order.quotas
        state = self._states.get(order.tenant_id)
        budget = None
        if quotas.token_budget is not None:
            kind = quotas.budget_period
            period = period_of(now, kind)
            budget = None if state is None else state.budget
            if budget is None or (budget.kind, budget.period) != (kind, period):
                return BudgetMissing(kind, period)
        if state is None:
            state = self._states[order.tenant_id] = _TenantState()
        state.prune(now)
        estimated = order.estimated_tokens
        breach = _first_breach(state, budget, quotas, now, estimated)
        period_charged = None if budget is None else budget.period
        if breach is not None and not order.reserve_over_limit:
            return Reserved(now, period_charged, breach, None)
        entry = _WindowEntry(now, estimated)
        state.num_concurrent += 1
        state.entries.append(entry)
        state.num_window_tokens += estimated
        if budget is not None:
            budget.reserved += estimated
        return Reserved(
            now, period_charged, breach, _MemoryReservation(state, entry, budget, estimated)
        )

    async def install_budget(
        self, tenant_id: str, kind: BudgetPeriod, period: str, recorded_tokens: int
    ) -> None:
        state = self._states.setdefault(tenant_id, _TenantState())
        budget = state.budget
        if budget is not None and budget.kind == kind and budget.period >= period:
            return  # loaded already, or a later period has begun
        state.budget = _Budget(kind, period, recorded_tokens)  # the old one lives on in admissions

    def forget(self, tenant_id: str) -> None:
        self._states.pop(tenant_id, None)

    async def snapshot(self, tenant_id: str) -> QuotaState:
        state = self._states.get(tenant_id)
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


def _first_breach(
    state: _TenantState, budget: _Budget | None, quotas: Quotas, now: float, estimated: int
) -> Breach | None:
    """The first limit this request would break, in the order the checks are documented."""
    limit = quotas.max_concurrent_requests
    if limit is not None and state.num_concurrent >= limit:
        return Breach("max_concurrent_requests")
    limit = quotas.requests_per_minute
    num_requests = len(state.entries)
    if limit is not None and num_requests >= limit:
        # Demoted requests or a lowered limit can leave more than `limit` in the window: this
        # one fits once all but limit - 1 have left.
        return Breach(
            "requests_per_minute", frees_at=state.entries[num_requests - limit].at + WINDOW_S
        )
    limit = quotas.tokens_per_minute
    if limit is not None and state.num_window_tokens + estimated > limit:
        return Breach(
            "tokens_per_minute",
            num_used=state.num_window_tokens,
            frees_at=_tokens_free_at(state, state.num_window_tokens + estimated - limit, now),
        )
    limit = quotas.token_budget
    if limit is not None and budget is not None and budget.total + estimated > limit:
        return Breach("token_budget", num_used=budget.total)
    return None


def _tokens_free_at(state: _TenantState, excess: int, now: float) -> float:
    """Walk the window from its oldest entry until ``excess`` tokens have left. Only on refusal,
    and an upper bound: a request settling below its reservation frees tokens sooner."""
    for entry in state.entries:
        excess -= entry.tokens
        if excess <= 0:
            return entry.at + WINDOW_S
    return now + WINDOW_S
