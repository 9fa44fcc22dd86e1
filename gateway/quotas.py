"""Per-tenant quotas: concurrent requests, requests and tokens per minute, and the token budget of
a day or month, for the tenant overall, where its quotas name a model for that model alone, and
where the request's API key has limits of its own for that key alone.

**Reserve, then settle.** ``QuotaManager.admit`` charges a request before it runs, at its worst
case (prompt tokens + ``max_tokens``): one concurrency slot, one request and ``estimated_tokens`` in
the sliding 60 s windows, and ``estimated_tokens`` against the budget of the current period.
``QuotaManager.settle`` (when the request ends, however it ends) frees the slot and replaces the
estimate by the real usage, in the window and in that period's running total. Charging up front is
what keeps streaming and concurrent requests from overshooting a limit (LiteLLM's lesson in
``architecture.md``): the backend checks and reserves every limit in one atomic step.

**Per model, per key.** An admission may also carry the tenant's quotas for the request's model
(``model_quotas``, e.g. a tokens-per-minute limit on the large model alone) and its API key's own
limits (``key_quotas``): it is then charged in each of these scopes besides the tenant's overall
one, checked and reserved together (all or nothing; the overall scope is checked first, then the
model's, then the key's, and the first breach wins) and settled together. A refusal by a model's
limit names the model ("tokens_per_minute of model 'X' is ..."), one by a key's limit the key's
display prefix ("tokens_per_minute of API key fg-Ab3d... is ..."), never its secret.

**Rate-limit headers.** Every admission (``Admission.rate_limit``) and every refusal by a limit
(``RateLimited.rate_limit``) carries the ``RateLimitState`` of the request's scopes, for OpenAI's
``x-ratelimit-*`` headers; ``peek`` reads it without reserving, for answers that fail before
admission.

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
(tenant, scope, period) and installed in the backend; from then on the backend keeps the running
total (the gateway writes the usage ledger separately). The overall scope's usage comes from
``budget_usage``, a model scope's from ``model_budget_usage`` (the store's usage of that model
alone), a key scope's from ``key_budget_usage``. The tenant and its quotas are passed on every
call, so quota changes apply at once.
Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.errors import QuotaExhausted, RateLimited, Unavailable
from gateway.quotas_backend import (
    TENANT_SCOPE,
    WINDOW_S,
    Breach,
    QuotaBackend,
    QuotaState,
    RateLimitState,
    Reservation,
    Reserved,
    ReserveOrder,
    ScopeName,
)
from gateway.quotas_memory import MemoryQuotaBackend
from gateway.tenants import BudgetPeriod, Quotas, Tenant, period_bounds

__all__ = [
    "Admission",
    "BudgetUsage",
    "KeyBudgetUsage",
    "ModelBudgetUsage",
    "QuotaManager",
    "QuotaState",
    "RateLimitState",
]

logger = logging.getLogger(__name__)

CONCURRENCY_RETRY_AFTER_S = 1.0  # no way to know when a running request ends: a short hint
MIN_RETRY_AFTER_S = 0.01
# An admission orders at most this many times per scope: the budget it needs is loaded in
# between, and another replica or `forget` may drop it again; past this something is wrong.
MAX_ORDERS_PER_SCOPE = 4

# (tenant_id, kind, period) -> tokens recorded in the store, e.g. ``SQLiteStore.total_tokens``.
BudgetUsage = Callable[[str, BudgetPeriod, str], Awaitable[int]]


class ModelBudgetUsage(Protocol):
    """(tenant_id, kind, period, model_id=) -> the prompt + completion tokens the store recorded
    for the tenant's requests to that one model in that period (0 if none). A store method
    ``total_tokens(tenant_id, kind, period, *, model_id: str = "")`` (``""``: every model) is
    both this and a ``BudgetUsage``."""

    def __call__(
        self, tenant_id: str, kind: BudgetPeriod, period: str, *, model_id: str
    ) -> Awaitable[int]: ...


class KeyBudgetUsage(Protocol):
    """(tenant_id, kind, period, key_id=) -> the prompt + completion tokens the store recorded
    for the requests made with that one API key in that period (0 if none): the store's
    ``total_tokens(tenant_id, kind, period, *, key_id=...)``."""

    def __call__(
        self, tenant_id: str, kind: BudgetPeriod, period: str, *, key_id: str
    ) -> Awaitable[int]: ...


@dataclass(slots=True)
class Admission:
    """A request let in, with what it reserved; hand it to ``QuotaManager.settle`` exactly when
    the request ends (more calls do nothing). ``admitted_at``: the backend's clock (the Redis
    server's with Redis). ``period``: the budget period it was charged to, or None when the
    tenant has no budget. ``model_id``: the model it was admitted for (``""``: none given);
    ``model_period``: the period of that model's budget it was charged to, or None when it has
    none; ``key_id`` and ``key_period`` likewise for the API key. ``demoted``: over a limit under
    the ``demote`` policy, ``demoted_reason`` says which. ``rate_limit``: the state of its scopes
    with it admitted, for the answer's ``x-ratelimit-*`` headers."""

    tenant_id: str
    estimated_tokens: int
    admitted_at: float
    period: str | None
    model_id: str
    model_period: str | None
    key_id: str
    key_period: str | None
    demoted: bool
    demoted_reason: str | None
    rate_limit: RateLimitState
    _reservation: Reservation = field(repr=False, compare=False)
    _is_settled: bool = field(default=False, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class _Refusal:
    """A breach put in words: what to raise under ``reject``, the demotion reason under
    ``demote``."""

    message: str
    retry_after_s: float
    is_budget: bool = False

    def error(self, rate_limit: RateLimitState) -> RateLimited:
        kind = QuotaExhausted if self.is_budget else RateLimited
        return kind(self.message, retry_after_s=self.retry_after_s, rate_limit=rate_limit)


class QuotaManager:
    """Admits requests against their tenant's quotas and settles them when they end. Call
    everything from the gateway's event loop; ``settle`` and ``forget`` never wait. ``start``
    before the first admission and ``close`` at the end (with Redis: the lease renewals, the
    settles still on their way, the connection)."""

    def __init__(
        self,
        budget_usage: BudgetUsage,
        backend: QuotaBackend | None = None,
        *,
        model_budget_usage: ModelBudgetUsage | None = None,
        key_budget_usage: KeyBudgetUsage | None = None,
    ) -> None:
        """``budget_usage``: the store's usage of a tenant overall, to start a budget from.
        ``model_budget_usage``: its usage of one model, for per-model budgets; without it a
        per-model budget cannot be checked, and its admissions fail (``Unavailable``).
        ``key_budget_usage``: likewise, its usage of one API key, for per-key budgets."""
        self._budget_usage = budget_usage
        self._model_budget_usage = model_budget_usage
        self._key_budget_usage = key_budget_usage
        self._backend: QuotaBackend = MemoryQuotaBackend() if backend is None else backend
        # (tenant_id, scope, kind, period) -> set when its load ends
        self._loading: dict[tuple[str, ScopeName, BudgetPeriod, str], asyncio.Event] = {}
        # (tenant_id, scope, kind) -> the period this manager installed last. Another
        # admission's `BudgetMissing` may have been answered before that install: order once
        # more first.
        self._installed: dict[tuple[str, ScopeName, BudgetPeriod], str] = {}

    async def start(self) -> None:
        await self._backend.start()

    async def close(self) -> None:
        await self._backend.close()

    async def admit(
        self,
        tenant: Tenant,
        *,
        estimated_tokens: int,
        model_id: str = "",
        model_quotas: Quotas | None = None,
        key_id: str = "",
        key_quotas: Quotas | None = None,
        key_label: str = "",
    ) -> Admission:
        """Check and reserve, in the tenant's overall scope, with ``model_quotas`` (the tenant's
        quotas for ``model_id``) in that model's, and with ``key_quotas`` (the limits of the API
        key ``key_id``) in that key's; ``key_label`` names the key in refusals (its display
        prefix; never the secret; ``key_id`` when empty). Raises ``RateLimited`` /
        ``QuotaExhausted`` over a limit when the tenant's policy is ``reject`` (with its
        ``rate_limit`` set), ``Unavailable`` when the quota state cannot be reached."""
        if estimated_tokens < 0:
            raise ValueError(f"estimated_tokens must be >= 0, not {estimated_tokens}")
        order = _order(tenant, estimated_tokens, model_id, model_quotas, key_id, key_quotas)
        reordered: set[ScopeName] = set()  # the scopes ordered once more after this install
        for _ in range(MAX_ORDERS_PER_SCOPE * len(order.scopes())):
            outcome = await self._backend.reserve(order)
            if isinstance(outcome, Reserved):
                break
            scope = outcome.scope
            installed = self._installed.get((tenant.tenant_id, scope, outcome.kind))
            if installed == outcome.period and scope not in reordered:
                reordered.add(scope)
                continue
            await self._load_budget(tenant.tenant_id, scope, outcome.kind, outcome.period)
        else:
            raise Unavailable(
                "this tenant's token budget could not be loaded; try again", retry_after_s=1.0
            )
        refusal = None
        if outcome.breach is not None:
            refusal = _refusal(outcome, order, outcome.breach, key_label or key_id)
        if outcome.reservation is None:
            assert refusal is not None, "a backend refuses only over a limit"
            raise refusal.error(outcome.rate_limit)
        kinds = [scope.name.kind for scope in order.scopes()]
        periods = dict(zip(kinds, outcome.periods, strict=True))
        return Admission(
            tenant_id=tenant.tenant_id,
            estimated_tokens=estimated_tokens,
            admitted_at=outcome.at,
            period=outcome.period,
            model_id=model_id,
            model_period=periods.get("model"),
            key_id=key_id,
            key_period=periods.get("key"),
            demoted=refusal is not None,
            demoted_reason=None if refusal is None else refusal.message,
            rate_limit=outcome.rate_limit,
            _reservation=outcome.reservation,
        )

    async def peek(
        self,
        tenant: Tenant,
        *,
        model_id: str = "",
        model_quotas: Quotas | None = None,
        key_id: str = "",
        key_quotas: Quotas | None = None,
    ) -> RateLimitState:
        """The rate-limit state of the scopes an admission with these arguments would be
        charged in, reserving nothing: for the headers of answers that fail before admission.
        One cheap call (with Redis one round trip); ``Unavailable`` when the quota state cannot
        be reached."""
        order = _order(tenant, 0, model_id, model_quotas, key_id, key_quotas)
        return await self._backend.peek(order)

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
        """Drop a deleted tenant's state, in every scope; its requests still running settle
        harmlessly."""
        for key in [key for key in self._installed if key[0] == tenant_id]:
            del self._installed[key]
        self._backend.forget(tenant_id)

    async def snapshot(self, tenant_id: str, *, model_id: str = "", key_id: str = "") -> QuotaState:
        """The tenant's usage now, overall, or of one model's scope (``model_id``) or one API
        key's (``key_id``), after this manager's own settles (with Redis: what every replica
        reserved and settled)."""
        if model_id and key_id:
            raise ValueError("a snapshot is of one scope: a model's or a key's, not both")
        scope = TENANT_SCOPE
        if model_id:
            scope = ScopeName("model", model_id)
        elif key_id:
            scope = ScopeName("key", key_id)
        return await self._backend.snapshot(tenant_id, scope)

    async def _load_budget(
        self, tenant_id: str, scope: ScopeName, kind: BudgetPeriod, period: str
    ) -> None:
        """Load the store's usage of the scope for the period once, however many admissions
        wait for it, and install it. If the load fails, its caller sees the error and the
        waiters try again themselves."""
        key = (tenant_id, scope, kind, period)
        loading = self._loading.get(key)
        if loading is not None:
            await loading.wait()  # Event.wait: cancelling one waiter leaves the others be
            return
        loading = self._loading[key] = asyncio.Event()
        try:
            used = await self._recorded_usage(tenant_id, scope, kind, period)
            await self._backend.install_budget(tenant_id, kind, period, used, scope)
            self._installed[(tenant_id, scope, kind)] = period
        finally:
            del self._loading[key]
            loading.set()

    async def _recorded_usage(
        self, tenant_id: str, scope: ScopeName, kind: BudgetPeriod, period: str
    ) -> int:
        match scope.kind:
            case "tenant":
                return await self._budget_usage(tenant_id, kind, period)
            case "model" if self._model_budget_usage is not None:
                return await self._model_budget_usage(
                    tenant_id, kind, period, model_id=scope.scope_id
                )
            case "key" if self._key_budget_usage is not None:
                return await self._key_budget_usage(tenant_id, kind, period, key_id=scope.scope_id)
        # Fail closed: starting from 0 would let the tenant spend the budget again after every
        # restart. A wiring fault, not the tenant's: say so in the log.
        logger.error(
            "tenant %s has a token budget for its %s %r, but this gateway's quota manager has "
            "no usage per %s to start it from (%s_budget_usage)",
            tenant_id,
            scope.kind,
            scope.scope_id,
            scope.kind,
            scope.kind,
        )
        what = f"model {scope.scope_id!r}" if scope.kind == "model" else "this API key"
        raise Unavailable(
            f"this tenant's token budget for {what} cannot be checked right now",
            retry_after_s=60.0,
        )


def _order(
    tenant: Tenant,
    estimated_tokens: int,
    model_id: str,
    model_quotas: Quotas | None,
    key_id: str,
    key_quotas: Quotas | None,
) -> ReserveOrder:
    return ReserveOrder(
        tenant_id=tenant.tenant_id,
        quotas=tenant.quotas,
        estimated_tokens=estimated_tokens,
        reserve_over_limit=tenant.over_quota == "demote",
        model_id=model_id,
        model_quotas=model_quotas,
        key_id=key_id,
        key_quotas=key_quotas,
    )


def _refusal(outcome: Reserved, order: ReserveOrder, breach: Breach, key_label: str) -> _Refusal:
    """What the tenant is told about the outcome's breach, and when to try again."""
    now, estimated = outcome.at, order.estimated_tokens
    scopes = order.scopes()
    index = [scope.name for scope in scopes].index(breach.scope)
    quotas, period = scopes[index].quotas, outcome.periods[index]
    # The limit's name, and for a model's or a key's scope, whose: "tokens_per_minute of model
    # 'X'", "tokens_per_minute of API key fg-Ab3d...".
    of_scope = ""
    if breach.scope.kind == "model":
        of_scope = f" of model {breach.scope.scope_id!r}"
    elif breach.scope.kind == "key":
        of_scope = f" of API key {key_label}"
    match breach.limit:
        case "max_concurrent_requests":
            return _Refusal(
                f"too many concurrent requests: max_concurrent_requests{of_scope} is "
                f"{quotas.max_concurrent_requests}",
                CONCURRENCY_RETRY_AFTER_S,
            )
        case "requests_per_minute":
            return _Refusal(
                f"rate limit reached: requests_per_minute{of_scope} is "
                f"{quotas.requests_per_minute}",
                _retry_after(breach.frees_at, now),
            )
        case "tokens_per_minute":
            limit = quotas.tokens_per_minute
            assert limit is not None, "a breached limit is set"
            if estimated > limit:
                return _Refusal(
                    f"this request needs up to {estimated} tokens (prompt + max_tokens), more "
                    f"than tokens_per_minute{of_scope} ({limit}) allows at all; lower "
                    "max_tokens",
                    WINDOW_S,
                )
            return _Refusal(
                f"rate limit reached: tokens_per_minute{of_scope} is {limit}; "
                f"{breach.num_used} are used or reserved and this request needs up to "
                f"{estimated}",
                _retry_after(breach.frees_at, now),
            )
        case "token_budget":
            return _budget_refusal(breach, quotas, now, estimated, period, of_scope)


def _budget_refusal(
    breach: Breach, quotas: Quotas, now: float, estimated: int, period: str | None, of_scope: str
) -> _Refusal:
    limit, kind = quotas.token_budget, quotas.budget_period
    assert limit is not None, "a breached limit is set"
    if estimated > limit:
        message = (
            f"this request needs up to {estimated} tokens (prompt + max_tokens), more than the "
            f"whole token_budget of {limit} per {kind}{of_scope}; lower max_tokens"
        )
    else:
        message = (
            f"token budget exhausted: token_budget{of_scope} is {limit} per {kind}; "
            f"{breach.num_used} are used or reserved in {period} and this request needs up to "
            f"{estimated}"
        )
    return _Refusal(message, _retry_after(period_bounds(now, kind)[1], now), is_budget=True)


def _retry_after(frees_at: float, now: float) -> float:
    return max(MIN_RETRY_AFTER_S, frees_at - now)
