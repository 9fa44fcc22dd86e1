"""Tenants, their API keys and quotas, the usage ledger, and the repository interface that stores
them (``TenantStore``; SQLite in ``gateway.store``).

These structs are also the admin API's JSON bodies, so they are ``msgspec.Struct``s (the
OpenAPI document is generated from them, and says exactly what they accept). A tenant's
``default_class`` is always one of its ``allowed_classes``: a class named as the default is allowed
(``with_default_allowed``). Times are Unix seconds (UTC). Torch-free.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal, Protocol

import msgspec

__all__ = [
    "DEFAULT_SLO_CLASSES",
    "MAX_QUOTA",
    "MIN_WEIGHT",
    "ApiKey",
    "BudgetPeriod",
    "CreatedKey",
    "KeySpec",
    "OverQuotaPolicy",
    "Quotas",
    "SloClassName",
    "Tenant",
    "TenantPatch",
    "TenantSpec",
    "TenantStore",
    "Usage",
    "UsageDelta",
    "period_bounds",
    "period_of",
    "with_default_allowed",
]

BudgetPeriod = Literal["day", "month"]
OverQuotaPolicy = Literal["reject", "demote"]
DEFAULT_SLO_CLASSES = ("interactive", "standard", "batch")

MAX_QUOTA = 2**63 - 1  # what SQLite and every JSON reader hold as an integer
Quota = Annotated[int, msgspec.Meta(ge=1, le=MAX_QUOTA)]
# A name is a path segment of the admin API: it starts with a letter, digit or underscore, so
# "." and ".." (which clients resolve away) and "-x" (a flag to the CLI) are never names. \Z, not
# $: msgspec searches with Python's re, whose $ also matches before a final newline (the document
# spells it $, JSON Schema's end of string).
TenantName = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z"),
]
# Fair-share counters grow by tokens / weight: a weight near 0 would make them infinite (and
# their differences NaN), so it is at least 1e-3 (a thousandth of the default share).
MIN_WEIGHT = 1e-3
Weight = Annotated[float, msgspec.Meta(ge=MIN_WEIGHT, le=1000)]
# One of the gateway's SLO classes: the admin API checks it against the configuration, and the
# OpenAPI document defines the component from the configuration (``gateway.openapi.Deployment``).
SloClassName = Annotated[
    str, msgspec.Meta(extra_json_schema={"$ref": "#/components/schemas/SloClassName"})
]


class Quotas(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant's limits; ``None`` is unlimited. Tokens are prompt + completion tokens."""

    requests_per_minute: Quota | None = None
    tokens_per_minute: Quota | None = None
    max_concurrent_requests: Quota | None = None
    token_budget: Quota | None = None  # per ``budget_period``
    budget_period: BudgetPeriod = "month"


class TenantSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: a tenant to create. ``default_class`` is added to ``allowed_classes``
    when they do not name it."""

    name: TenantName
    weight: Weight = 1.0
    default_class: SloClassName = "standard"
    allowed_classes: list[SloClassName] = msgspec.field(
        default_factory=lambda: list(DEFAULT_SLO_CLASSES)
    )
    quotas: Quotas = Quotas()
    over_quota: OverQuotaPolicy = "reject"


class TenantPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: the fields to change (absent fields stay as they are; ``quotas``
    replaces the whole set). The tenant's default class, new or kept, is added to its allowed
    classes when they do not name it."""

    name: TenantName | msgspec.UnsetType = msgspec.UNSET
    weight: Weight | msgspec.UnsetType = msgspec.UNSET
    default_class: SloClassName | msgspec.UnsetType = msgspec.UNSET
    allowed_classes: list[SloClassName] | msgspec.UnsetType = msgspec.UNSET
    quotas: Quotas | msgspec.UnsetType = msgspec.UNSET
    over_quota: OverQuotaPolicy | msgspec.UnsetType = msgspec.UNSET


class Tenant(msgspec.Struct, frozen=True):
    tenant_id: str
    name: str
    weight: float
    default_class: str
    allowed_classes: list[str]
    quotas: Quotas
    over_quota: OverQuotaPolicy
    created_at: float


class KeySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: a key to create for a tenant."""

    name: str = ""


class ApiKey(msgspec.Struct, frozen=True):
    """A key as the admin API shows it: never the secret, only its first characters."""

    key_id: str
    tenant_id: str
    prefix: str  # e.g. "fg-Ab3dE5gH"
    name: str
    created_at: float
    revoked_at: float | None = None


class CreatedKey(msgspec.Struct, frozen=True):
    """The answer to creating a key: the only time the secret is shown."""

    key: ApiKey
    secret: str


class UsageDelta(msgspec.Struct, frozen=True):
    """One finished request's usage, to add to its tenant's ledger."""

    tenant_id: str
    at: float
    requests: int = 1
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Usage(msgspec.Struct, frozen=True):
    """A tenant's usage in one period (``period`` is ``YYYY-MM-DD`` or ``YYYY-MM``)."""

    tenant_id: str
    period: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def with_default_allowed(default_class: str, allowed_classes: list[str]) -> list[str]:
    """``allowed_classes`` once each, in order, with ``default_class`` added if it is not there:
    a tenant may always use its default class."""
    allowed = list(dict.fromkeys(allowed_classes))
    return allowed if default_class in allowed else [*allowed, default_class]


def period_of(at: float, kind: BudgetPeriod) -> str:
    """The name of the UTC day or month ``at`` falls in."""
    day = dt.datetime.fromtimestamp(at, dt.UTC)
    return day.strftime("%Y-%m-%d" if kind == "day" else "%Y-%m")


def period_bounds(at: float, kind: BudgetPeriod) -> tuple[float, float]:
    """[start, end) of the UTC day or month ``at`` falls in."""
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    if kind == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


class TenantStore(Protocol):
    """Where tenants, keys and usage live. Every method is a coroutine that never blocks the event
    loop; it is safe to call from any task. Errors: ``gateway.errors.NotFound`` for an unknown
    tenant or key, ``Conflict`` for a duplicate tenant name."""

    async def create_tenant(self, spec: TenantSpec) -> Tenant: ...

    async def get_tenant(self, tenant_id: str) -> Tenant: ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def update_tenant(self, tenant_id: str, patch: TenantPatch) -> Tenant: ...

    async def delete_tenant(self, tenant_id: str) -> None:
        """Deletes the tenant, its keys and its usage."""

    async def create_key(self, tenant_id: str, spec: KeySpec) -> CreatedKey: ...

    async def list_keys(
        self, *, tenant_id: str | None = None, prefix: str | None = None
    ) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str) -> ApiKey: ...

    async def find_key(self, secret: str) -> tuple[ApiKey, Tenant] | None:
        """The key whose secret this is (revoked keys included) and its tenant, or None."""

    async def record_usage(self, deltas: list[UsageDelta]) -> None:
        """Add to the day and the month ledgers of each delta's tenant, in one transaction."""

    async def usage(
        self, tenant_id: str, kind: BudgetPeriod, *, period: str | None = None
    ) -> list[Usage]:
        """The tenant's usage per day or month, newest first; one period when ``period`` is
        given (an all-zero row when nothing was recorded)."""

    async def close(self) -> None: ...
