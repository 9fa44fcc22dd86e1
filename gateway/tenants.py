"""Tenants, their API keys and quotas, the usage ledger, the models' aliases and settings, and the
repository interface that stores them (``TenantStore``; SQLite in ``gateway.store``, PostgreSQL in
``gateway.store_postgres``).

These structs are also the admin API's JSON bodies, so they are ``msgspec.Struct``s (the
OpenAPI document is generated from them, and says exactly what they accept). A tenant's
``default_class`` is always one of its ``allowed_classes``: a class named as the default is allowed
(``with_default_allowed``). A tenant's ``allowed_models`` name models by id or by alias (empty:
every model); its ``model_quotas`` are keyed by model id, so that moving an alias moves no quota.
Usage is counted in tokens and in normalised cost units (a model's cost factor times its
tokens); per model as well when the request named one (``ModelUsage``), and per key when the
request's key is known (``UsageDelta.key_id``). A key has limits of its own (``Quotas``, each
within its tenant's: ``gateway.admin`` checks that) and may expire (``expires_at``). Times are
Unix seconds (UTC). Torch-free.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

import msgspec

if TYPE_CHECKING:
    from gateway.audit import AuditDraft, AuditRecord

__all__ = [
    "DEFAULT_SLO_CLASSES",
    "MAX_MODELS_PER_TENANT",
    "MAX_MODEL_NAME_LEN",
    "MAX_QUOTA",
    "MAX_TIME",
    "MIN_WEIGHT",
    "ApiKey",
    "BudgetPeriod",
    "CreatedKey",
    "KeyPatch",
    "KeySpec",
    "ModelAlias",
    "ModelName",
    "ModelSetting",
    "ModelUsage",
    "OverQuotaPolicy",
    "Quotas",
    "SloClassName",
    "Tenant",
    "TenantPatch",
    "TenantSpec",
    "TenantStore",
    "Usage",
    "UsageDelta",
    "format_time",
    "period_bounds",
    "period_of",
    "unique_models",
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
# A moment as Unix seconds, within what a UTC date can name (years 1970 to 9999): a key's expiry.
MAX_TIME = 253_402_300_799.0  # 9999-12-31T23:59:59Z
Time = Annotated[float, msgspec.Meta(ge=0, le=MAX_TIME)]
# A model id or alias as tenants and admins write it: what a client may put in a request's
# "model", so anything printable; control characters are refused (they would forge lines in the
# logs and the CLI's tables). Bounded, like the lists of them, because they are stored per tenant.
MAX_MODEL_NAME_LEN = 256
MAX_MODELS_PER_TENANT = 256
ModelName = Annotated[
    str,
    msgspec.Meta(min_length=1, max_length=MAX_MODEL_NAME_LEN, pattern=r"^[^\x00-\x1f\x7f-\x9f]+\Z"),
]
AllowedModels = Annotated[list[ModelName], msgspec.Meta(max_length=MAX_MODELS_PER_TENANT)]
# One of the gateway's SLO classes: the admin API checks it against the configuration, and the
# OpenAPI document defines the component from the configuration
# (``gateway.openapi_document.Deployment``).
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


# A tenant's quotas per model, keyed by model id (not alias).
ModelQuotas = Annotated[dict[ModelName, Quotas], msgspec.Meta(max_length=MAX_MODELS_PER_TENANT)]


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
    allowed_models: AllowedModels = msgspec.field(default_factory=list)  # []: every model
    model_quotas: ModelQuotas = msgspec.field(default_factory=dict)


class TenantPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: the fields to change (absent fields stay as they are; ``quotas``,
    ``allowed_models`` and ``model_quotas`` replace the whole set). The tenant's default class,
    new or kept, is added to its allowed classes when they do not name it."""

    name: TenantName | msgspec.UnsetType = msgspec.UNSET
    weight: Weight | msgspec.UnsetType = msgspec.UNSET
    default_class: SloClassName | msgspec.UnsetType = msgspec.UNSET
    allowed_classes: list[SloClassName] | msgspec.UnsetType = msgspec.UNSET
    quotas: Quotas | msgspec.UnsetType = msgspec.UNSET
    over_quota: OverQuotaPolicy | msgspec.UnsetType = msgspec.UNSET
    allowed_models: AllowedModels | msgspec.UnsetType = msgspec.UNSET
    model_quotas: ModelQuotas | msgspec.UnsetType = msgspec.UNSET


class Tenant(msgspec.Struct, frozen=True):
    """A tenant as stored. ``allowed_models``: model ids or aliases, each once (empty: every
    model); ``model_quotas``: limits on the tenant's requests to one model, by model id, checked
    beside ``quotas`` (which count every model's requests)."""

    tenant_id: str
    name: str
    weight: float
    default_class: str
    allowed_classes: list[str]
    quotas: Quotas
    over_quota: OverQuotaPolicy
    created_at: float
    allowed_models: list[str] = msgspec.field(default_factory=list)
    model_quotas: dict[str, Quotas] = msgspec.field(default_factory=dict)


class KeySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: a key to create for a tenant. ``quotas``: the key's own limits, checked
    beside its tenant's (each at most the tenant's same limit); ``expires_at``: when it stops
    working (Unix seconds; ``None``: never)."""

    name: str = ""
    quotas: Quotas = Quotas()
    expires_at: Time | None = None


class KeyPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: what to change of a key (absent fields stay as they are; ``quotas``
    replaces the whole set; ``expires_at`` ``null``: it never expires)."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    quotas: Quotas | msgspec.UnsetType = msgspec.UNSET
    expires_at: Time | msgspec.UnsetType | None = msgspec.UNSET


class ApiKey(msgspec.Struct, frozen=True):
    """A key as the admin API shows it: never the secret, only its first characters.
    ``quotas``: its own limits (beside its tenant's); ``expires_at``: when it stops working
    (``None``: never)."""

    key_id: str
    tenant_id: str
    prefix: str  # e.g. "fg-Ab3dE5gH"
    name: str
    created_at: float
    revoked_at: float | None = None
    quotas: Quotas = Quotas()
    expires_at: float | None = None

    def is_expired(self, now: float) -> bool:
        """Whether the key has expired at ``now`` (Unix seconds, the wall clock)."""
        return self.expires_at is not None and now >= self.expires_at

    def own_quotas(self) -> Quotas | None:
        """Its limits for the quota manager's key scope, or None when it has none (no scope:
        a key without limits costs its requests nothing more; like a model scope, a limit set
        later counts the requests admitted after it)."""
        limits = self.quotas
        if (
            limits.requests_per_minute is None
            and limits.tokens_per_minute is None
            and limits.max_concurrent_requests is None
            and limits.token_budget is None
        ):
            return None
        return limits


class CreatedKey(msgspec.Struct, frozen=True):
    """The answer to creating a key: the only time the secret is shown."""

    key: ApiKey
    secret: str


class UsageDelta(msgspec.Struct, frozen=True):
    """One finished request's usage, to add to its tenant's ledger and, when ``model_id`` is
    set, to its ledger of that model; when ``key_id`` is set, to that key's ledger too.
    ``units``: normalised cost units, the model's cost factor (frozen at admission) times its
    prompt + completion tokens."""

    tenant_id: str
    at: float
    requests: int = 1
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    model_id: str = ""  # the resolved model id, never an alias; "": none
    units: float = 0.0
    key_id: str = ""  # the key the request came with; "": none (no key ledger)


class Usage(msgspec.Struct, frozen=True):
    """A tenant's usage in one period (``period`` is ``YYYY-MM-DD`` or ``YYYY-MM``), every
    model's requests together."""

    tenant_id: str
    period: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    units: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ModelUsage(msgspec.Struct, frozen=True):
    """A tenant's usage of one model (by id) in one period: its part of the tenant's ``Usage``
    (requests recorded without a model are in no ``ModelUsage``)."""

    tenant_id: str
    period_kind: BudgetPeriod
    period: str
    model_id: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    units: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ModelAlias(msgspec.Struct, frozen=True):
    """An admin's name for a model: requests naming ``alias`` go to ``model_id``, whatever
    model it names when they arrive (moving an alias takes effect on the next request)."""

    alias: str
    model_id: str
    updated_at: float


class ModelSetting(msgspec.Struct, frozen=True):
    """What an admin set for one model. ``cost_factor``: what one of its tokens costs in units
    of the reference model's tokens; ``None``: the gateway measures it."""

    model_id: str
    cost_factor: float | None = None


def with_default_allowed(default_class: str, allowed_classes: list[str]) -> list[str]:
    """``allowed_classes`` once each, in order, with ``default_class`` added if it is not there:
    a tenant may always use its default class."""
    allowed = list(dict.fromkeys(allowed_classes))
    return allowed if default_class in allowed else [*allowed, default_class]


def unique_models(names: list[str]) -> list[str]:
    """``names`` once each, in order: a tenant's ``allowed_models`` as stored."""
    return list(dict.fromkeys(names))


def format_time(at: float) -> str:
    """``at`` (Unix seconds) as UTC ISO 8601 to the second, e.g. ``2026-12-07T10:00:00Z``."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    tenant or key, ``Conflict`` for a duplicate tenant name.

    The methods that change a tenant, a key, an alias or a model's setting take ``audit``: when
    given, the store writes its record of the change (``AuditDraft.record``: ``before`` as read
    under the change's lock, ``after`` as written) in the change's own transaction, so that both
    are kept or neither is (``gateway.audit``). A call that fails writes no record."""

    async def create_tenant(
        self, spec: TenantSpec, *, audit: AuditDraft | None = None
    ) -> Tenant: ...

    async def get_tenant(self, tenant_id: str) -> Tenant: ...

    async def list_tenants(self) -> list[Tenant]: ...

    async def update_tenant(
        self, tenant_id: str, patch: TenantPatch, *, audit: AuditDraft | None = None
    ) -> Tenant: ...

    async def delete_tenant(self, tenant_id: str, *, audit: AuditDraft | None = None) -> Tenant:
        """Deletes the tenant, its keys and its usage; the tenant as it was."""

    async def create_key(
        self, tenant_id: str, spec: KeySpec, *, audit: AuditDraft | None = None
    ) -> CreatedKey: ...

    async def list_keys(
        self, *, tenant_id: str | None = None, prefix: str | None = None
    ) -> list[ApiKey]: ...

    async def get_key(self, key_id: str) -> ApiKey: ...

    async def update_key(
        self, key_id: str, patch: KeyPatch, *, audit: AuditDraft | None = None
    ) -> ApiKey:
        """Applies ``patch`` to the key; unset fields stay. A revoked key stays revoked."""

    async def revoke_key(self, key_id: str, *, audit: AuditDraft | None = None) -> ApiKey:
        """Revokes the key; revoking it again keeps the first ``revoked_at``."""

    async def find_key(self, secret: str) -> tuple[ApiKey, Tenant] | None:
        """The key whose secret this is (revoked keys included) and its tenant, or None."""

    async def record_usage(self, deltas: list[UsageDelta]) -> None:
        """Add to the day and the month ledgers of each delta's tenant (and of its model and
        its key, when it names them), in one transaction."""

    async def usage(
        self, tenant_id: str, kind: BudgetPeriod, *, period: str | None = None
    ) -> list[Usage]:
        """The tenant's usage per day or month, newest first; one period when ``period`` is
        given (an all-zero row when nothing was recorded)."""

    async def model_usage(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        *,
        period: str | None = None,
        model_id: str | None = None,
    ) -> list[ModelUsage]:
        """The tenant's usage per model and per day or month, newest first and by model id
        within a period; only ``period``'s and only ``model_id``'s rows when given. A model
        with nothing recorded in a period has no row."""

    async def total_tokens(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        period: str,
        *,
        model_id: str = "",
        key_id: str = "",
    ) -> int:
        """Prompt + completion tokens of the tenant (by id) in that one period: of every model
        and key, of one model (``model_id``), or of one of its keys (``key_id``; not both:
        ``ValueError``); 0 if none."""

    async def record_audit(self, record: AuditRecord) -> None:
        """Appends a record to the audit log, on its own: for a change the store does not hold
        (``gateway.audit``), or one that changed nothing."""

    async def list_audit(
        self, *, since: float | None = None, tenant_id: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """The audit log, newest first: records at or after ``since``, of one tenant (by id)
        when given, at most ``limit``."""

    async def list_aliases(self) -> list[ModelAlias]:
        """Every alias, by name."""

    async def set_alias(
        self, alias: str, model_id: str, *, audit: AuditDraft | None = None
    ) -> tuple[ModelAlias, bool]:
        """Points ``alias`` at ``model_id``: the alias as stored, and whether it is new (False:
        it existed and now names ``model_id``)."""

    async def delete_alias(self, alias: str, *, audit: AuditDraft | None = None) -> bool:
        """Deletes the alias; False when there was none (and no record is written)."""

    async def list_model_settings(self) -> list[ModelSetting]:
        """Every model an admin set something for, by id."""

    async def set_cost_factor(
        self, model_id: str, factor: float | None, *, audit: AuditDraft | None = None
    ) -> ModelSetting:
        """Sets the model's cost factor (finite and > 0, else ``ValueError``), or with ``None``
        clears it (the gateway measures it again)."""

    async def close(self) -> None: ...
