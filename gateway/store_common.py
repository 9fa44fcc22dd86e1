"""What the tenant stores share (``SQLiteStore`` in ``gateway.store``, ``PostgresStore`` in
``gateway.store_postgres``), so that both make the same ids, keys and rows: new tenants and keys,
a key's hash, a patch applied to a tenant or a key, a tenant, key or audit record from a row and
back, usage deltas summed per ledger row (the tenant's and, per model, ``model_usage``'s, per
key, ``key_usage``'s), a cost factor checked, and the errors both raise beyond ``NotFound`` and
``Conflict`` (``AuditWriteFailed``: a change refused because its audit record failed).

Both schemas name their columns alike and keep a tenant's ``allowed_classes``, ``quotas``,
``allowed_models`` and ``model_quotas``, a key's ``quotas`` and an audit record's ``before`` and
``after`` as JSON text, so one conversion serves both. Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from gateway.audit import AuditRecord
from gateway.errors import Unavailable
from gateway.tenants import (
    ApiKey,
    BudgetPeriod,
    KeyPatch,
    KeySpec,
    ModelUsage,
    Quotas,
    Tenant,
    TenantPatch,
    TenantSpec,
    UsageDelta,
    period_of,
    unique_models,
)
from transfer.errors import FairgateError

__all__ = [
    "AUDIT_COLUMNS",
    "AUDIT_FAILED",
    "DISPLAY_PREFIX_LEN",
    "KEY_COLUMNS",
    "MODEL_USAGE_COLUMNS",
    "PERIOD_KINDS",
    "RECORD_FAILED",
    "SECRET_PREFIX",
    "TENANT_COLUMNS",
    "USAGE_COLUMNS",
    "AuditWriteFailed",
    "KeyLedgerKey",
    "LedgerKey",
    "LedgerSums",
    "ModelLedgerKey",
    "SchemaTooNew",
    "StoreUnavailable",
    "api_key_from_row",
    "audit_from_row",
    "audit_values",
    "checked_cost_factor",
    "hash_secret",
    "hashes_match",
    "key_usage_totals",
    "key_values",
    "model_usage_from_row",
    "model_usage_totals",
    "new_api_key",
    "new_secret",
    "new_tenant",
    "patched_key",
    "patched_tenant",
    "tenant_from_row",
    "tenant_values",
    "usage_totals",
]

SECRET_PREFIX = "fg-"
DISPLAY_PREFIX_LEN = len(SECRET_PREFIX) + 8  # "fg-" + 8 characters, shown in listings
PERIOD_KINDS: tuple[BudgetPeriod, ...] = ("day", "month")

TENANT_COLUMNS = (  # Tenant's fields, in order
    "tenant_id, name, weight, default_class, allowed_classes, quotas, over_quota, created_at,"
    " allowed_models, model_quotas"
)
# ApiKey's fields, in order
KEY_COLUMNS = "key_id, tenant_id, prefix, name, created_at, revoked_at, quotas, expires_at"
USAGE_COLUMNS = "period, requests, prompt_tokens, cached_tokens, completion_tokens, units"
MODEL_USAGE_COLUMNS = (  # ModelUsage's fields, in order
    "tenant_id, period_kind, period, model_id, requests, prompt_tokens, cached_tokens,"
    " completion_tokens, units"
)

# A ledger row's key, (tenant_id, period kind, period), and its sums: (requests, prompt_tokens,
# cached_tokens, completion_tokens, units).
LedgerKey = tuple[str, BudgetPeriod, str]
LedgerSums = tuple[int, int, int, int, float]
# A model ledger row's key: (tenant_id, period kind, period, model_id).
ModelLedgerKey = tuple[str, BudgetPeriod, str, str]
# A key ledger row's key: (tenant_id, period kind, period, key_id).
KeyLedgerKey = tuple[str, BudgetPeriod, str, str]
AUDIT_COLUMNS = (  # AuditRecord's fields, in order
    "audit_id, at, actor, action, target, tenant_id, before, after"
)


class SchemaTooNew(FairgateError):
    """The database was written by a newer fairgate (its schema version is unknown here)."""

    code = "store_schema_too_new"


class AuditWriteFailed(Unavailable):
    """An audit record could not be written. Of a change in the store, the change was not
    made either: the record is written in the change's own transaction (``gateway.audit``),
    which fails with it. The message is ours; the driver's error is logged where this is
    raised."""

    code = "audit_write_failed"


# AuditWriteFailed's messages: of a change refused with its record, of a record on its own.
AUDIT_FAILED = "the audit log could not record this change, so it was not made; try again"
RECORD_FAILED = "the audit log could not write this record; try again"


class StoreUnavailable(Unavailable):
    """The tenant store's server did not answer, or not in time (PostgreSQL unreachable, its
    connection lost, a pool with no free connection). The message is ours and names no address;
    the driver's own error is logged where this is raised."""

    code = "store_unavailable"


def new_tenant(spec: TenantSpec) -> Tenant:
    return Tenant(
        tenant_id="tn_" + secrets.token_hex(8),
        name=spec.name,
        weight=spec.weight,
        default_class=spec.default_class,
        allowed_classes=list(spec.allowed_classes),
        quotas=spec.quotas,
        over_quota=spec.over_quota,
        created_at=time.time(),
        allowed_models=unique_models(spec.allowed_models),
        model_quotas=dict(spec.model_quotas),
    )


def patched_tenant(current: Tenant, patch: TenantPatch) -> Tenant:
    """``current`` with the fields ``patch`` sets."""
    changes = {
        field: value
        for field in patch.__struct_fields__
        if (value := getattr(patch, field)) is not msgspec.UNSET
    }
    if "allowed_models" in changes:
        changes["allowed_models"] = unique_models(changes["allowed_models"])
    return msgspec.structs.replace(current, **changes)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)  # 256 random bits


def new_api_key(tenant_id: str, secret: str, spec: KeySpec) -> ApiKey:
    return ApiKey(
        key_id="key_" + secrets.token_hex(8),
        tenant_id=tenant_id,
        prefix=secret[:DISPLAY_PREFIX_LEN],
        name=spec.name,
        created_at=time.time(),
        quotas=spec.quotas,
        expires_at=spec.expires_at,
    )


def patched_key(current: ApiKey, patch: KeyPatch) -> ApiKey:
    """``current`` with the fields ``patch`` sets."""
    changes = {
        field: value
        for field in patch.__struct_fields__
        if (value := getattr(patch, field)) is not msgspec.UNSET
    }
    return msgspec.structs.replace(current, **changes)


def key_values(key: ApiKey) -> tuple[Any, ...]:
    """The key as SQL parameters in ``KEY_COLUMNS``' order, its quotas as JSON."""
    values = list(msgspec.structs.astuple(key))
    values[KEY_COLUMNS.split(", ").index("quotas")] = msgspec.json.encode(key.quotas).decode()
    return tuple(values)


def hash_secret(secret: str) -> str:
    # A fast hash is right here: secrets are 256 random bits, so there is nothing to brute-force
    # and no salt or slow KDF (bcrypt, argon2) to add; SHA-256 also makes the lookup indexable.
    return hashlib.sha256(secret.encode()).hexdigest()


def hashes_match(stored: str, digest: str) -> bool:
    """The index lookup that found ``stored`` is not constant-time; confirm the match in
    constant time."""
    return hmac.compare_digest(stored, digest)


def tenant_values(tenant: Tenant) -> dict[str, Any]:
    """The tenant as named SQL parameters, its lists and structs as JSON."""
    values = msgspec.structs.asdict(tenant)
    values["allowed_classes"] = msgspec.json.encode(tenant.allowed_classes).decode()
    values["quotas"] = msgspec.json.encode(tenant.quotas).decode()
    values["allowed_models"] = msgspec.json.encode(tenant.allowed_models).decode()
    values["model_quotas"] = msgspec.json.encode(tenant.model_quotas).decode()
    return values


def tenant_from_row(row: tuple[Any, ...]) -> Tenant:
    """A row of ``TENANT_COLUMNS``."""
    (
        tenant_id,
        name,
        weight,
        default_class,
        allowed,
        quotas,
        over_quota,
        created_at,
        allowed_models,
        model_quotas,
    ) = row
    return Tenant(
        tenant_id=tenant_id,
        name=name,
        weight=weight,
        default_class=default_class,
        allowed_classes=msgspec.json.decode(allowed, type=list[str]),
        quotas=msgspec.json.decode(quotas, type=Quotas),
        over_quota=over_quota,
        created_at=created_at,
        allowed_models=msgspec.json.decode(allowed_models, type=list[str]),
        model_quotas=msgspec.json.decode(model_quotas, type=dict[str, Quotas]),
    )


def api_key_from_row(row: tuple[Any, ...]) -> ApiKey:
    """A row of ``KEY_COLUMNS``."""
    key_id, tenant_id, prefix, name, created_at, revoked_at, quotas, expires_at = row
    return ApiKey(
        key_id,
        tenant_id,
        prefix,
        name,
        created_at,
        revoked_at,
        msgspec.json.decode(quotas, type=Quotas),
        expires_at,
    )


def audit_values(record: AuditRecord) -> tuple[Any, ...]:
    """The record as SQL parameters in ``AUDIT_COLUMNS``' order, before and after as JSON."""
    return (
        *msgspec.structs.astuple(record)[:-2],
        _json_or_none(record.before),
        _json_or_none(record.after),
    )


def audit_from_row(row: tuple[Any, ...]) -> AuditRecord:
    """A row of ``AUDIT_COLUMNS``."""
    audit_id, at, actor, action, target, tenant_id, before, after = row
    return AuditRecord(
        audit_id,
        at,
        actor,
        action,
        target,
        tenant_id,
        None if before is None else msgspec.json.decode(before, type=dict[str, Any]),
        None if after is None else msgspec.json.decode(after, type=dict[str, Any]),
    )


def _json_or_none(thing: dict[str, Any] | None) -> str | None:
    return None if thing is None else msgspec.json.encode(thing).decode()


def model_usage_from_row(row: tuple[Any, ...]) -> ModelUsage:
    """A row of ``MODEL_USAGE_COLUMNS``."""
    return ModelUsage(*row)


def checked_cost_factor(factor: float | None) -> float | None:
    """``factor`` if it can be stored as a cost factor: ``None`` (measured) or finite and > 0.
    SQLite would store a NaN as NULL, which reads back as "measured"."""
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"a cost factor is finite and > 0, not {factor!r}")
    return factor


def usage_totals(deltas: Iterable[UsageDelta]) -> dict[LedgerKey, LedgerSums]:
    """The deltas summed per ledger row (each delta goes to its day's and its month's): a batch
    holds many requests of few rows, so the store upserts each row once."""
    totals: dict[LedgerKey, LedgerSums] = {}
    for delta in deltas:
        for kind in PERIOD_KINDS:
            key = (delta.tenant_id, kind, period_of(delta.at, kind))
            totals[key] = _added(totals.get(key), delta)
    return totals


def model_usage_totals(deltas: Iterable[UsageDelta]) -> dict[ModelLedgerKey, LedgerSums]:
    """As ``usage_totals``, per model ledger row: the deltas that name a model, summed per
    (tenant, period, model)."""
    return _totals_by(deltas, "model_id")


def key_usage_totals(deltas: Iterable[UsageDelta]) -> dict[KeyLedgerKey, LedgerSums]:
    """As ``usage_totals``, per key ledger row: the deltas that name a key, summed per
    (tenant, period, key)."""
    return _totals_by(deltas, "key_id")


def _totals_by(
    deltas: Iterable[UsageDelta], field: Literal["model_id", "key_id"]
) -> dict[tuple[str, BudgetPeriod, str, str], LedgerSums]:
    totals: dict[tuple[str, BudgetPeriod, str, str], LedgerSums] = {}
    for delta in deltas:
        name = getattr(delta, field)
        if not name:
            continue
        for kind in PERIOD_KINDS:
            key = (delta.tenant_id, kind, period_of(delta.at, kind), name)
            totals[key] = _added(totals.get(key), delta)
    return totals


def _added(sums: LedgerSums | None, delta: UsageDelta) -> LedgerSums:
    requests, prompt, cached, completion, units = sums or (0, 0, 0, 0, 0.0)
    # A NaN or infinite figure would poison the row for good (SQLite even refuses it as NULL,
    # failing the batch at every retry and so every tenant's usage): it counts as no units.
    delta_units = delta.units if math.isfinite(delta.units) else 0.0
    return (
        requests + delta.requests,
        prompt + delta.prompt_tokens,
        cached + delta.cached_tokens,
        completion + delta.completion_tokens,
        units + delta_units,
    )
