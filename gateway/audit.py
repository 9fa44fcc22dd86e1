"""The audit log of admin changes: who changed what, when, from what to what.

Every admin route that changes something (``gateway.admin``: tenants and workers, and the
workers' own registration; ``gateway.admin_keys``: keys; ``gateway.admin_models``: models'
settings and aliases) leaves exactly one ``AuditRecord``, a call that changes nothing (a patch
of nothing, a key revoked again) included; a route that fails leaves none. The records live in
the tenant store (``TenantStore.list_audit``), and are read with ``GET /admin/v1/audit`` and
``fairgate admin audit``.

How a record is written depends on where the change lives:

* A change in the store (a tenant, a key, a model's cost factor, an alias): the route hands the
  store's method an ``AuditDraft`` (who, and which action), and the store writes the record in
  the change's own transaction, ``before`` read from the row it locks and ``after`` from the row
  it writes. A change and its record are kept together or not at all: an audit write that fails
  fails the change (the store raises ``AuditWriteFailed``, the route answers 503
  ``audit_write_failed``, and nothing is applied here or sent to the other replicas), and
  there is no change the log does not have (PostgreSQL's connection lost at the COMMIT leaves
  it unknown whether the change was made, ``StoreUnavailable``: if it was, so is its record).
* A change in the worker registry (a worker added, removed, drained, undrained, registered or
  unregistered) lives in this process's memory, which no database transaction covers. Its
  record is written after the change (``AuditLog.record``), because ``after`` is only known
  then (a drain's outcome depends on the worker's answer) and because a record of a change
  that then failed would be worse than a late one. A failed write is retried (``RETRY_DELAYS_S``);
  if every try fails, the change stands, the route answers it as made (it was: telling the
  admin it failed would be the lie), and an ERROR ``unaudited admin change`` is logged with the
  record's fields (``extra={"fields": ...}``), which hold no secret, so that an operator can
  enter it by hand.

Who: the credential, never itself. ``actor_of("admin-token", token)`` is ``admin-token:`` and the
first 8 hex digits of the token's SHA-256 (``registration-token:…`` for workers registering
themselves): enough to tell two admin tokens apart, nothing to log in with. What: ``before`` and
``after`` are JSON objects of the thing changed (``null``: it did not exist, or no longer does),
made by the views here; a key's view is its id, prefix, name, quotas, expiry and revocation,
never its secret (``ApiKey`` holds none; ``CreatedKey``, which does, is refused). Torch-free.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from gateway.tenants import ApiKey, CreatedKey, ModelAlias, ModelSetting, Tenant, TenantStore

__all__ = [
    "ACTOR_HASH_HEX",
    "MAX_AUDIT_LIMIT",
    "RETRY_DELAYS_S",
    "AuditAction",
    "AuditDraft",
    "AuditList",
    "AuditLog",
    "AuditRecord",
    "Audited",
    "CredentialKind",
    "actor_of",
    "key_view",
    "setting_view",
]

logger = logging.getLogger(__name__)

ACTOR_HASH_HEX = 8  # hex digits of the credential's SHA-256 that name it
MAX_AUDIT_LIMIT = 1000  # records one listing returns at most
# A registry change's record: written once, then again after each of these pauses.
RETRY_DELAYS_S = (0.1, 0.5)
# The fields of an unaudited change's ERROR that its text shows (``extra`` has them all).
_LOGGED_INLINE = ("audit_id", "actor", "action", "target", "error")

CredentialKind = Literal["admin-token", "registration-token"]
AuditAction = Literal[
    "tenant.create",
    "tenant.update",
    "tenant.delete",
    "key.create",
    "key.update",
    "key.revoke",
    "worker.add",
    "worker.remove",
    "worker.drain",
    "worker.undrain",
    "worker.register",
    "worker.unregister",
    "model.update",
    "alias.set",
    "alias.delete",
]
# What the store changes and audits in the change's transaction (``AuditDraft.record``).
Audited = Tenant | ApiKey | ModelAlias | ModelSetting


class AuditRecord(msgspec.Struct, frozen=True):
    """One admin change. ``at``: Unix seconds; ``actor``: the credential that made it
    (module docstring); ``action``: an ``AuditAction`` (a string here, so that a record a newer
    gateway wrote still reads); ``target``: the id of what changed (a tenant or key id, a worker's
    URL, a model id, an alias); ``tenant_id``: the tenant it concerns ("" for none); ``before`` /
    ``after``: the thing as JSON, ``None`` before it existed or after it is gone."""

    audit_id: str
    at: float
    actor: str
    action: str
    target: str
    tenant_id: str = ""
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class AuditList(msgspec.Struct, frozen=True):
    data: list[AuditRecord]
    object: str = "list"


def actor_of(kind: CredentialKind, token: str) -> str:
    """How a record names the credential ``token`` of this kind (module docstring)."""
    return f"{kind}:{hashlib.sha256(token.encode()).hexdigest()[:ACTOR_HASH_HEX]}"


def key_view(key: ApiKey) -> dict[str, Any]:
    """What a record keeps of a key: never its secret (nor its hash)."""
    return {
        "key_id": key.key_id,
        "prefix": key.prefix,
        "name": key.name,
        "quotas": msgspec.to_builtins(key.quotas),
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }


def setting_view(setting: ModelSetting) -> dict[str, Any]:
    """What a record keeps of a model: the admin's cost factor (``None``: measured)."""
    return {"model": setting.model_id, "cost_factor": setting.cost_factor}


@dataclass(frozen=True, slots=True)
class AuditDraft:
    """A store change's record before the store has made the change: who makes it, and what
    it is. The store's mutating methods take one (``audit=``) and complete it with ``record``
    inside the change's transaction (module docstring)."""

    actor: str
    action: AuditAction

    def record(
        self, before: Audited | None, after: Audited | None, *, at: float | None = None
    ) -> AuditRecord:
        """The record of this change of a tenant, key, alias or model setting from ``before``
        to ``after`` (``None``: absent; not both), named by the thing's id."""
        thing = after if after is not None else before
        assert thing is not None, "a change has a before or an after"
        target, tenant_id = _names_of(thing)
        return AuditRecord(
            audit_id=new_audit_id(),
            at=time.time() if at is None else at,
            actor=self.actor,
            action=self.action,
            target=target,
            tenant_id=tenant_id,
            before=None if before is None else _view(before),
            after=None if after is None else _view(after),
        )


def new_audit_id() -> str:
    return "au_" + secrets.token_hex(8)


def _names_of(thing: Audited) -> tuple[str, str]:
    """(target, tenant_id) of a record of ``thing``."""
    match thing:
        case Tenant():
            return thing.tenant_id, thing.tenant_id
        case ApiKey():
            return thing.key_id, thing.tenant_id
        case ModelAlias():
            return thing.alias, ""
        case ModelSetting():
            return thing.model_id, ""


def _view(thing: Audited) -> dict[str, Any]:
    match thing:
        case ApiKey():
            return key_view(thing)
        case ModelSetting():
            return setting_view(thing)
        case Tenant() | ModelAlias():
            converted: dict[str, Any] = msgspec.to_builtins(thing)
            return converted


class AuditLog:
    """Writes the records of changes the store does not hold (the worker registry's: module
    docstring) to ``store``, retrying a failed write. ``clock``: the wall clock (Unix seconds);
    ``retry_delays_s``: the pauses between tries."""

    def __init__(
        self,
        store: TenantStore,
        *,
        clock: Callable[[], float] = time.time,
        retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S,
    ) -> None:
        self._store = store
        self._clock = clock
        self._retry_delays_s = retry_delays_s

    async def record(
        self,
        actor: str,
        action: AuditAction,
        target: str,
        *,
        tenant_id: str = "",
        before: Any = None,
        after: Any = None,
    ) -> AuditRecord | None:
        """Writes one record of a change already made; ``before`` / ``after``: a struct or a
        dict (``None``: absent). The record, or ``None`` when no try could write it (then an
        ERROR says so; module docstring): the change stands either way."""
        record = AuditRecord(
            audit_id=new_audit_id(),
            at=self._clock(),
            actor=actor,
            action=action,
            target=target,
            tenant_id=tenant_id,
            before=_as_object(before),
            after=_as_object(after),
        )
        for delay_s in self._retry_delays_s:
            failure = await self._write(record)
            if failure is None:
                return record
            logger.warning(
                "audit write of %s %s failed (%s): again in %g s",
                action,
                target,
                type(failure).__name__,
                delay_s,
            )
            await asyncio.sleep(delay_s)
        failure = await self._write(record)
        if failure is None:
            return record
        _log_unaudited(record, failure)
        return None

    async def _write(self, record: AuditRecord) -> Exception | None:
        """Writes ``record``; what failed it, if anything."""
        try:
            await self._store.record_audit(record)
        # Any error: each backend fails in its own way (sqlite3's errors, StoreUnavailable,
        # psycopg's), and the change is made whatever the reason; only cancellation ends it.
        except Exception as exc:
            return exc
        return None


def _log_unaudited(record: AuditRecord, exc: Exception) -> None:
    fields = {**msgspec.structs.asdict(record), "error": f"{type(exc).__name__}: {exc}"}
    logger.error(
        "unaudited admin change %s",
        " ".join(f"{key}={value}" for key, value in fields.items() if key in _LOGGED_INLINE),
        extra={"fields": fields},
    )


def _as_object(thing: Any) -> dict[str, Any] | None:
    if thing is None:
        return None
    if isinstance(thing, CreatedKey):  # it holds the secret: its view is key_view(created.key)
        raise TypeError("an audit record never holds a secret: pass key_view(...) instead")
    converted = msgspec.to_builtins(thing)
    if not isinstance(converted, dict):
        raise TypeError(f"an audit record's before/after is an object, not {type(converted)}")
    return converted
