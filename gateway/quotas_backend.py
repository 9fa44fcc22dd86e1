"""Where quota state lives: the interface a ``QuotaManager`` drives, and the plain data that
crosses it. Two backends implement it: ``gateway.quotas_memory`` (one gateway, in its memory) and
``gateway.quotas_redis`` (replicas sharing Redis, each reservation under a lease).

**Scopes.** An order is checked in one or two scopes: always the tenant's overall one, and, when
the order carries ``model_quotas``, the (tenant, model) one, whose limits count only that model's
requests. A scope is named by its ``model_id``: ``""`` for the tenant's overall scope. A model
scope counts only requests admitted with its quotas, so a model quota set while the tenant's
requests run binds from the requests admitted after it.

A backend's ``reserve`` is the one step that must be atomic: it checks every limit of every scope
of the order, the tenant's scope first, each in the documented order (concurrency, requests per
minute, tokens per minute, token budget), and, when none is broken or the order says to reserve
anyway, reserves all of them in both scopes together: a request refused in one scope reserves
nothing in the other. It reports the first breach it found as a ``Breach``; what to tell the
tenant (the message, ``Retry-After``, reject or demote) is the manager's policy, the same for
every backend. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from gateway.tenants import BudgetPeriod, Quotas

__all__ = [
    "WINDOW_S",
    "Breach",
    "BreachedLimit",
    "BudgetMissing",
    "QuotaBackend",
    "QuotaState",
    "Reservation",
    "ReserveOrder",
    "Reserved",
]

WINDOW_S = 60.0  # requests and tokens per minute: a sliding window this long

BreachedLimit = Literal[
    "max_concurrent_requests", "requests_per_minute", "tokens_per_minute", "token_budget"
]


@dataclass(slots=True)
class QuotaState:
    """One scope's quota usage now (a tenant's overall, or one model's), for the admin API and
    tests. Unsettled requests count at their reserved size in ``tokens_last_minute`` and
    ``budget_used``."""

    concurrent: int
    requests_last_minute: int
    tokens_last_minute: int
    budget_used: int  # in ``budget_period``: recorded + settled + reserved
    budget_period: str | None  # the period last charged ("2025-01", "2025-01-31"), or None


@dataclass(frozen=True, slots=True)
class ReserveOrder:
    """One admission to check and reserve. ``reserve_over_limit``: reserve even when a limit is
    broken (the tenant's ``demote`` policy); otherwise a breach reserves nothing. ``quotas``: the
    tenant's overall limits. ``model_id``: the model the request is for; ``model_quotas``: the
    tenant's limits for that model alone, or None for no model scope (the model's requests then
    count in the overall scope only)."""

    tenant_id: str
    quotas: Quotas
    estimated_tokens: int
    reserve_over_limit: bool
    model_id: str = ""
    model_quotas: Quotas | None = None

    def __post_init__(self) -> None:
        if self.model_quotas is not None and not self.model_id:
            raise ValueError("model_quotas needs the model_id they limit")

    def scopes(self) -> list[tuple[str, Quotas]]:
        """(model_id, quotas) of each scope to check, in order: the tenant's (``""``) first."""
        scopes = [("", self.quotas)]
        if self.model_quotas is not None:
            scopes.append((self.model_id, self.model_quotas))
        return scopes


@dataclass(frozen=True, slots=True)
class Breach:
    """The first limit an order breaks, with what it takes to say when it frees.
    ``num_used``: tokens in the window (``tokens_per_minute``) or in the period's budget
    (``token_budget``), reservations included. ``frees_at``: for the per-minute limits, when
    enough of the window has left for this order (``at + WINDOW_S`` when nothing that leaves is
    enough). ``model_id``: the scope whose limit it is (``""``: the tenant's overall)."""

    limit: BreachedLimit
    num_used: int = 0
    frees_at: float = 0.0
    model_id: str = ""


class Reservation(Protocol):
    """What one admission holds. ``settle`` is called once (the manager sees to it), from the
    event loop, and never waits: a backend that needs I/O for it does that in the background."""

    def settle(self, actual_tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Reserved:
    """The outcome of a checked order. ``at``: the backend's time of the check (the Redis
    server's, with Redis). ``period``: the overall budget period charged, or None without a
    budget; ``model_period``: likewise for the model scope. ``reservation``: None when the order
    broke a limit and was not to reserve over it; otherwise it holds every scope's share."""

    at: float
    period: str | None
    breach: Breach | None
    reservation: Reservation | None
    model_period: str | None = None


@dataclass(frozen=True, slots=True)
class BudgetMissing:
    """A scope of the order has a token budget and the backend holds no running total for its
    period yet: load the store's recorded usage of that scope (the tenant's overall when
    ``model_id`` is ``""``, else that model's) for it, ``install_budget`` it, and order again.
    Nothing was reserved."""

    kind: BudgetPeriod
    period: str
    model_id: str = ""


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
        *,
        model_id: str = "",
    ) -> None:
        """Start the period's running total of the scope at ``recorded_tokens`` unless one is
        there already (another waiter or another replica was first); a period that has been
        replaced by a later one stays over."""
        ...

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's state, in every scope."""
        ...

    async def snapshot(self, tenant_id: str, *, model_id: str = "") -> QuotaState:
        """One scope's usage: the tenant's overall, or ``model_id``'s."""
        ...
