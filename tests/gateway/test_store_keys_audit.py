"""The tenant stores' keys with limits and expiry, the per-key usage ledger and the audit log, on
both backends (an SQLite file and a PostgreSQL server of the session's own, as in
``test_store.py``, whose fixtures these tests share); and a database of schema version 2 migrated
to 3, keeping its keys."""

from __future__ import annotations

import msgspec
import pytest

from gateway.audit import AuditRecord
from gateway.errors import NotFound
from gateway.store_common import DISPLAY_PREFIX_LEN, hash_secret, new_secret
from gateway.stores import GatewayStore
from gateway.tenants import (
    ApiKey,
    KeyPatch,
    KeySpec,
    Quotas,
    TenantSpec,
    Usage,
    UsageDelta,
)
from tests.gateway.test_store import FEB_1, JAN_15, JAN_16, Backend
from tests.gateway.test_store import backend as backend
from tests.gateway.test_store import db_path as db_path
from tests.gateway.test_store import store as store
from tests.postgres import postgres_server as postgres_server
from tests.postgres import postgres_url as postgres_url

KEY_TABLES = ("key_usage", "audit_log")  # schema version 3's


async def test_a_keys_limits_and_expiry_round_trip_and_patch(
    store: GatewayStore, backend: Backend
) -> None:
    await store.create_tenant(TenantSpec(name="acme"))
    limits = Quotas(requests_per_minute=5, token_budget=100, budget_period="day")
    created = await store.create_key("acme", KeySpec(name="ci", quotas=limits, expires_at=JAN_16))
    key = created.key
    assert (key.quotas, key.expires_at, key.name) == (limits, JAN_16, "ci")
    plain = (await store.create_key("acme", KeySpec())).key
    assert (plain.quotas, plain.expires_at) == (Quotas(), None)
    assert await store.get_key(key.key_id) == key
    found = await store.find_key(created.secret)
    assert found is not None and found[0] == key

    # Unset fields stay; quotas replace the whole set; expires_at null clears it.
    renamed = await store.update_key(key.key_id, KeyPatch(name="ci-2"))
    assert renamed == msgspec.structs.replace(key, name="ci-2")
    requoted = await store.update_key(key.key_id, KeyPatch(quotas=Quotas(tokens_per_minute=9)))
    assert (requoted.quotas, requoted.expires_at) == (Quotas(tokens_per_minute=9), JAN_16)
    cleared = await store.update_key(key.key_id, KeyPatch(expires_at=None))
    assert cleared.expires_at is None and cleared.quotas == Quotas(tokens_per_minute=9)
    assert await store.list_keys(tenant_id="acme") == [cleared, plain]

    revoked = await store.revoke_key(key.key_id)
    patched = await store.update_key(key.key_id, KeyPatch(name="after"))
    assert patched.revoked_at == revoked.revoked_at is not None  # stays revoked
    assert backend.query("SELECT name FROM api_keys WHERE key_id = ?", (key.key_id,)) == [
        ("after",)
    ]
    with pytest.raises(NotFound):
        await store.update_key("key_nope", KeyPatch(name="x"))
    with pytest.raises(NotFound):
        await store.get_key("key_nope")


async def test_usage_with_a_key_goes_to_that_keys_ledger_too(store: GatewayStore) -> None:
    acme = await store.create_tenant(TenantSpec(name="acme"))
    other = await store.create_tenant(TenantSpec(name="other"))
    first = (await store.create_key("acme", KeySpec())).key
    second = (await store.create_key("acme", KeySpec())).key
    others = (await store.create_key("other", KeySpec())).key
    t = acme.tenant_id
    await store.record_usage(
        [
            UsageDelta(t, JAN_15, prompt_tokens=10, completion_tokens=5, key_id=first.key_id),
            UsageDelta(t, JAN_16, prompt_tokens=1, completion_tokens=2, key_id=first.key_id),
            UsageDelta(t, JAN_16, prompt_tokens=100, key_id=second.key_id, model_id="m"),
            UsageDelta(t, JAN_16, prompt_tokens=1000),  # no key
            UsageDelta(t, FEB_1, completion_tokens=7, key_id=first.key_id),
            # Another tenant's key named with this tenant: not this key's (nor the other's).
            UsageDelta(t, JAN_16, prompt_tokens=50, key_id=others.key_id),
            UsageDelta(t, JAN_16, prompt_tokens=60, key_id="key_unknown"),
        ]
    )
    assert await store.total_tokens(t, "month", "2025-01", key_id=first.key_id) == 18
    assert await store.total_tokens(t, "day", "2025-01-16", key_id=first.key_id) == 3
    assert await store.total_tokens(t, "month", "2025-02", key_id=first.key_id) == 7
    assert await store.total_tokens(t, "month", "2025-01", key_id=second.key_id) == 100
    assert await store.total_tokens(t, "month", "2025-01", model_id="m") == 100
    other_id = other.tenant_id
    assert await store.total_tokens(other_id, "month", "2025-01", key_id=others.key_id) == 0
    # The tenant's ledger has every delta, with a key or not.
    assert await store.total_tokens(t, "month", "2025-01") == 18 + 100 + 1000 + 50 + 60
    assert await store.usage("acme", "month", period="2025-02") == [Usage(t, "2025-02", 1, 0, 0, 7)]
    with pytest.raises(ValueError, match="not both"):
        await store.total_tokens(t, "month", "2025-01", model_id="m", key_id=first.key_id)

    # Deleting the tenant takes its keys' ledgers with it.
    await store.delete_tenant("acme")
    assert await store.total_tokens(t, "month", "2025-01", key_id=first.key_id) == 0


def _record(audit_id: str, at: float, tenant_id: str = "", **fields: object) -> AuditRecord:
    return AuditRecord(audit_id, at, "admin-token:0123abcd", "tenant.update", "tn_x", tenant_id,
                       **fields)  # type: ignore[arg-type]  # fmt: skip


async def test_the_audit_log_lists_newest_first_by_time_tenant_and_limit(
    store: GatewayStore,
) -> None:
    assert await store.list_audit() == []
    records = [
        _record("au_1", JAN_15, "tn_a", before=None, after={"weight": 1.0, "q": {"x": None}}),
        _record("au_2", JAN_16, "tn_b", before={"weight": 1.0}, after={"weight": 2.0}),
        _record("au_3", JAN_16, "tn_a", before={"name": "a"}, after=None),  # same time: later
        _record("au_4", FEB_1),
    ]
    for record in records:
        await store.record_audit(record)
    newest_first = [records[3], records[2], records[1], records[0]]
    assert await store.list_audit() == newest_first
    assert await store.list_audit(since=JAN_16) == newest_first[:3]
    assert await store.list_audit(tenant_id="tn_a") == [records[2], records[0]]
    assert await store.list_audit(since=JAN_16, tenant_id="tn_a", limit=5) == [records[2]]
    assert await store.list_audit(limit=2) == newest_first[:2]
    assert await store.list_audit(limit=0) == []


async def test_a_version_2_database_migrates_keeping_its_keys(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database an older fairgate wrote (schema version 2, its key rows in version 2's
    columns) gets migration 3 at the next start: its keys read as before, with no limits and no
    expiry, and may get both; the key ledger and the audit log start empty."""
    known = list(backend.module.MIGRATIONS)
    monkeypatch.setattr(backend.module, "MIGRATIONS", known[:2])
    old_store = await backend.open()
    try:
        tenant = await old_store.create_tenant(TenantSpec(name="acme"))
    finally:
        await old_store.close()
    monkeypatch.setattr(backend.module, "MIGRATIONS", known)
    assert backend.schema_version() == 2
    assert not any(backend.has_table(table) for table in KEY_TABLES)
    secret = new_secret()
    key = ApiKey(
        "key_0123456789abcdef", tenant.tenant_id, secret[:DISPLAY_PREFIX_LEN], "ci", JAN_15
    )
    backend.query(
        "INSERT INTO api_keys (key_id, tenant_id, key_hash, prefix, name, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (key.key_id, key.tenant_id, hash_secret(secret), key.prefix, key.name, key.created_at),
    )

    store = await backend.open()
    try:
        assert backend.schema_version() == len(known) >= 3
        assert all(backend.has_table(table) for table in KEY_TABLES)
        assert await store.find_key(secret) == (key, tenant)  # Quotas(), never expires
        limited = await store.update_key(
            key.key_id, KeyPatch(quotas=Quotas(requests_per_minute=3), expires_at=FEB_1)
        )
        assert limited == msgspec.structs.replace(
            key, quotas=Quotas(requests_per_minute=3), expires_at=FEB_1
        )
        await store.record_usage(
            [UsageDelta(tenant.tenant_id, JAN_16, prompt_tokens=4, key_id=key.key_id)]
        )
        total = await store.total_tokens(tenant.tenant_id, "month", "2025-01", key_id=key.key_id)
        assert total == 4
        assert await store.list_audit() == []
    finally:
        await store.close()
