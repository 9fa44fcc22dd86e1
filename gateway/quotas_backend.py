"""Where quota state lives: the interface a ``QuotaManager`` drives, and the plain data that
crosses it. Two backends implement it: ``gateway.quotas_memory`` (one gateway, in its memory) and
``gateway.quotas_redis`` (replicas sharing Redis, each reservation under a lease).

**Scopes.** An order is checked in one to three scopes (``ReserveOrder.scopes``): always the
tenant's overall one; when the order carries ``model_quotas``, the (tenant, model) one, whose
limits count only that model's requests; when it carries ``key_quotas``, the (tenant, API key) one,
whose limits count only that key's requests. A scope is named by a ``ScopeName`` (its kind and
id: the model's or the key's, ``""`` for the tenant's). A model or key scope counts only requests
admitted with its quotas, so a limit set while the tenant's requests run binds from the requests
admitted after it.

A backend's ``reserve`` is the one step that must be atomic: it checks every limit of every scope
of the order, in the order of ``scopes()`` (tenant, model, key), each in the documented order
(concurrency, requests per minute, tokens per minute, token budget), and, when none is broken or
the order says to reserve anyway, reserves all of them in every scope together: a request refused
in one scope reserves nothing in the others. It reports the first breach it found as a
``Breach``, and the rate-limit state the answer's ``x-ratelimit-*`` headers show
(``RateLimitState``); what to tell the tenant (the message, ``Retry-After``, reject or demote) is
the manager's policy, the same for every backend. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.tenants import BudgetPeriod, Quotas

__all__ = [
    "NO_RATE_LIMIT",
    "TENANT_SCOPE",
    "WINDOW_S",
    "Breach",
    "BreachedLimit",
    "BudgetMissing",
    "QuotaBackend",
    "QuotaState",
    "RateLimitState",
    "Reservation",
    "ReserveOrder",
    "Reserved",
    "Scope",
    "ScopeKind",
    "ScopeName",
    "WindowUse",
    "rate_limit_of",
]

WINDOW_S = 60.0  # requests and tokens per minute: a sliding window this long

BreachedLimit = Literal[
    "max_concurrent_requests", "requests_per_minute", "tokens_per_minute", "token_budget"
]
ScopeKind = Literal["tenant", "model", "key"]


@dataclass(frozen=True, slots=True)
class ScopeName:
    """Which scope of a tenant's: its overall one (``kind`` "tenant", ``scope_id`` ""), one of its
    models' (the model id) or one of its API keys' (the key id)."""

    kind: ScopeKind = "tenant"
    scope_id: str = ""

    def __post_init__(self) -> None:
        if (self.kind == "tenant") != (self.scope_id == ""):
            raise ValueError(f"only the tenant's own scope has an empty id, not {self!r}")


TENANT_SCOPE = ScopeName()


@dataclass(frozen=True, slots=True)
class Scope:
    """One scope of an order: its name and the limits that apply in it."""

    name: ScopeName
    quotas: Quotas


@dataclass(slots=True)
class QuotaState:
    """One scope's quota usage now (a tenant's overall, one model's or one key's), for the admin
    API and tests. Unsettled requests count at their reserved size in ``tokens_last_minute`` and
    ``budget_used``."""

    concurrent: int
    requests_last_minute: int
    tokens_last_minute: int
    budget_used: int  # in ``budget_period``: recorded + settled + reserved
    budget_period: str | None  # the period last charged ("2025-01", "2025-01-31"), or None


@dataclass(frozen=True, slots=True)
class RateLimitState:
    """What OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers say, across
    a request's scopes: for requests, the scope with the fewest requests left under its
    ``requests_per_minute``; for tokens, the one with the fewest tokens left under its
    ``tokens_per_minute`` (the first such scope on a tie). ``remaining_*``: the limit less what
    the scope's window holds after this admission (unsettled requests at their reservation),
    never below 0. ``reset_*_s``: seconds until that window is back to its full limit (its newest
    entry leaves it), 0 when it is empty. All None: no scope has such a limit."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


NO_RATE_LIMIT = RateLimitState()


@dataclass(frozen=True, slots=True)
class WindowUse:
    """What one scope's window holds now: ``newest_at``, the time of its newest entry (None when
    empty)."""

    num_requests: int
    num_tokens: int
    newest_at: float | None


def rate_limit_of(scopes: list[tuple[Quotas, WindowUse]], now: float) -> RateLimitState:
    """The ``RateLimitState`` of scopes whose windows hold ``WindowUse`` (each after this
    admission, if it reserved). The Redis backend's scripts compute the same in Lua."""
    requests: tuple[int, int, float] | None = None  # limit, remaining, reset_s
    tokens: tuple[int, int, float] | None = None
    for quotas, use in scopes:
        reset_s = 0.0 if use.newest_at is None else max(0.0, use.newest_at + WINDOW_S - now)
        limit = quotas.requests_per_minute
        if limit is not None:
            remaining = max(0, limit - use.num_requests)
            if requests is None or remaining < requests[1]:
                requests = (limit, remaining, reset_s)
        limit = quotas.tokens_per_minute
        if limit is not None:
            remaining = max(0, limit - use.num_tokens)
            if tokens is None or remaining < tokens[1]:
                tokens = (limit, remaining, reset_s)
    return RateLimitState(
        *((None, None, None) if requests is None else requests),
        *((None, None, None) if tokens is None else tokens),
    )


@dataclass(frozen=True, slots=True)
class ReserveOrder:
    """One admission to check and reserve. ``reserve_over_limit``: reserve even when a limit is
    broken (the tenant's ``demote`` policy); otherwise a breach reserves nothing. ``quotas``: the
    tenant's overall limits. ``model_id``: the model the request is for; ``model_quotas``: the
    tenant's limits for that model alone, or None for no model scope (the model's requests then
    count in the overall scope only). ``key_id`` and ``key_quotas``: likewise for the API key the
    request came with."""

    tenant_id: str
    quotas: Quotas
    estimated_tokens: int
    reserve_over_limit: bool
    model_id: str = ""
    model_quotas: Quotas | None = None
    key_id: str = ""
    key_quotas: Quotas | None = None

    def __post_init__(self) -> None:
        if self.model_quotas is not None and not self.model_id:
            raise ValueError("model_quotas needs the model_id they limit")
        if self.key_quotas is not None and not self.key_id:
            raise ValueError("key_quotas needs the key_id they limit")

    def scopes(self) -> list[Scope]:
        """Each scope to check, in order: the tenant's first, then the model's, then the key's."""
        scopes = [Scope(TENANT_SCOPE, self.quotas)]
        if self.model_quotas is not None:
            scopes.append(Scope(ScopeName("model", self.model_id), self.model_quotas))
        if self.key_quotas is not None:
            scopes.append(Scope(ScopeName("key", self.key_id), self.key_quotas))
        return scopes


@dataclass(frozen=True, slots=True)
class Breach:
    """The first limit an order breaks, with what it takes to say when it frees.
    ``num_used``: tokens in the window (``tokens_per_minute``) or in the period's budget
    (``token_budget``), reservations included. ``frees_at``: for the per-minute limits, when
    enough of the window has left for this order (``at + WINDOW_S`` when nothing that leaves is
    enough). ``scope``: the scope whose limit it is."""

    limit: BreachedLimit
    num_used: int = 0
    frees_at: float = 0.0
    scope: ScopeName = TENANT_SCOPE


class Reservation(Protocol):
    """What one admission holds. ``settle`` is called once (the manager sees to it), from the
    event loop, and never waits: a backend that needs I/O for it does that in the background."""

    def settle(self, actual_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Reserved:
    """The outcome of a checked order. ``at``: the backend's time of the check (the Redis
    server's, with Redis). ``periods``: per scope of ``order.scopes()``, the budget period
    charged, or None without a budget. ``reservation``: None when the order broke a limit and was
    not to reserve over it; otherwise it holds every scope's share. ``rate_limit``: the state
    after this outcome (with this order's reservation, if it made one)."""

    at: float
    periods: tuple[str | None, ...]
    breach: Breach | None
    reservation: Reservation | None
    rate_limit: RateLimitState = NO_RATE_LIMIT

    @property
    def period(self) -> str | None:
        """The tenant's overall budget period charged."""
        return self.periods[0]


@dataclass(frozen=True, slots=True)
class BudgetMissing:
    """A scope of the order has a token budget and the backend holds no running total for its
    period yet: load the store's recorded usage of that scope (the tenant's overall, a model's
    or a key's) for it, ``install_budget`` it, and order again. Nothing was reserved."""

    kind: BudgetPeriod
    period: str
    scope: ScopeName = TENANT_SCOPE


class QuotaBackend(Protocol):
    """Quota state behind a ``QuotaManager``. Call everything from one event loop. ``start``
    before the first order and ``close`` after the last; ``forget`` never waits (a backend that
    needs I/O does it in the background); everything else may raise
    ``gateway.errors.Unavailable`` when the state cannot be reached."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def reserve(self, order: ReserveOrder) -> Reserved | BudgetMissing: ...

    async def install_budget(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        period: str,
        recorded_tokens: int,
        scope: ScopeName = TENANT_SCOPE,
    ) -> None:
        """Start the period's running total of the scope at ``recorded_tokens`` unless one is
        there already (another waiter or another replica was first); a period that has been
        replaced by a later one stays over."""
        ...

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's state, in every scope."""
        ...

    async def snapshot(self, tenant_id: str, scope: ScopeName = TENANT_SCOPE) -> QuotaState:
        """One scope's usage."""
        ...

    async def peek(self, order: ReserveOrder) -> RateLimitState:
        """The rate-limit state of the order's scopes now, reserving nothing (for answers that
        fail before admission); the order's estimate and budgets play no part."""
        ...
