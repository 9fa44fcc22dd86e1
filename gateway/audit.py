"""The audit log of admin changes: who changed what, when, from what to what.

Every admin route that changes something (``gateway.admin``: tenants, keys, workers, and the
workers' own registration; ``gateway.admin_models``: models' settings and aliases) writes one
``AuditRecord`` through an ``AuditLog`` once the change is made; a route that fails writes none.
The records live in the tenant store (``TenantStore.record_audit`` / ``list_audit``), and are read
with ``GET /admin/v1/audit`` and ``fairgate admin audit``.

Who: the credential, never itself. ``actor_of("admin-token", token)`` is ``admin-token:`` and the
first 8 hex digits of the token's SHA-256 (``registration-token:…`` for workers registering
themselves): enough to tell two admin tokens apart, nothing to log in with. What: ``before`` and
``after`` are JSON objects of the thing changed (``null``: it did not exist, or no longer does),
made by the views here; a key's view is its id, prefix, name, quotas, expiry and revocation,
never its secret (``ApiKey`` holds none; ``CreatedKey``, which does, is refused). Torch-free.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from gateway.tenants import ApiKey, CreatedKey, TenantStore

__all__ = [
    "ACTOR_HASH_HEX",
    "MAX_AUDIT_LIMIT",
    "AuditAction",
    "AuditList",
    "AuditLog",
    "AuditRecord",
    "CredentialKind",
    "actor_of",
    "key_view",
]

ACTOR_HASH_HEX = 8  # hex digits of the credential's SHA-256 that name it
MAX_AUDIT_LIMIT = 1000  # records one listing returns at most

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


class AuditLog:
    """Writes the admin routes' records to ``store``. ``clock``: the wall clock (Unix seconds)."""

    def __init__(self, store: TenantStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    async def record(
        self,
        actor: str,
        action: AuditAction,
        target: str,
        *,
        tenant_id: str = "",
        before: Any = None,
        after: Any = None,
    ) -> AuditRecord:
        """Writes one record; ``before`` / ``after``: a struct or a dict (``None``: absent)."""
        record = AuditRecord(
            audit_id="au_" + secrets.token_hex(8),
            at=self._clock(),
            actor=actor,
            action=action,
            target=target,
            tenant_id=tenant_id,
            before=_as_object(before),
            after=_as_object(after),
        )
        await self._store.record_audit(record)
        return record


def _as_object(thing: Any) -> dict[str, Any] | None:
    if thing is None:
        return None
    if isinstance(thing, CreatedKey):  # it holds the secret: its view is key_view(created.key)
        raise TypeError("an audit record never holds a secret: pass key_view(...) instead")
    converted = msgspec.to_builtins(thing)
    if not isinstance(converted, dict):
        raise TypeError(f"an audit record's before/after is an object, not {type(converted)}")
    return converted
