"""``SQLiteStore`` on real SQLite files: tenants and keys by id and by name, errors, the schema
version and migrations, what reaches the disk of a key, the usage ledger under concurrency, and
an event loop that keeps running while the store works."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import Conflict, NotFound
from gateway.store import MIGRATIONS, SchemaTooNew, SQLiteStore
from gateway.tenants import KeySpec, Quotas, TenantPatch, TenantSpec, Usage, UsageDelta

JAN_15 = dt.datetime(2025, 1, 15, 12, 0, tzinfo=dt.UTC).timestamp()
JAN_16 = dt.datetime(2025, 1, 16, 9, 0, tzinfo=dt.UTC).timestamp()
FEB_1 = dt.datetime(2025, 2, 1, 0, 30, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "fairgate.db"  # the directory does not exist yet


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


def read_pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as db:
        value = db.execute(f"PRAGMA {name}").fetchone()[0]
    db.close()
    return value


async def test_create_get_list_update_delete(store: SQLiteStore) -> None:
    quotas = Quotas(requests_per_minute=60, token_budget=1000, budget_period="day")
    acme = await store.create_tenant(
        TenantSpec(name="acme", weight=2.5, allowed_classes=["batch"], quotas=quotas)
    )
    assert acme.tenant_id.startswith("tn_") and len(acme.tenant_id) == 3 + 16
    assert (acme.name, acme.weight, acme.allowed_classes, acme.quotas) == (
        "acme",
        2.5,
        ["batch"],
        quotas,
    )
    assert await store.get_tenant(acme.tenant_id) == acme
    assert await store.get_tenant("acme") == acme
    beta = await store.create_tenant(TenantSpec(name="beta"))
    assert [t.name for t in await store.list_tenants()] == ["acme", "beta"]

    updated = await store.update_tenant("acme", TenantPatch(name="acme2", over_quota="demote"))
    assert (updated.tenant_id, updated.name, updated.over_quota) == (
        acme.tenant_id,
        "acme2",
        "demote",
    )
    assert (updated.weight, updated.quotas, updated.created_at) == (2.5, quotas, acme.created_at)
    assert await store.get_tenant("acme2") == updated
    with pytest.raises(NotFound):
        await store.get_tenant("acme")

    new_quotas = Quotas(tokens_per_minute=5)
    patched = await store.update_tenant(beta.tenant_id, TenantPatch(quotas=new_quotas, weight=3.0))
    assert (patched.name, patched.weight, patched.quotas) == ("beta", 3.0, new_quotas)

    await store.delete_tenant("acme2")
    assert await store.list_tenants() == [patched]
    await store.delete_tenant(beta.tenant_id)
    assert await store.list_tenants() == []


async def test_conflict_and_not_found(store: SQLiteStore) -> None:
    acme = await store.create_tenant(TenantSpec(name="acme"))
    await store.create_tenant(TenantSpec(name="beta"))
    with pytest.raises(Conflict, match="acme"):
        await store.create_tenant(TenantSpec(name="acme"))
    with pytest.raises(Conflict, match="beta"):
        await store.update_tenant("acme", TenantPatch(name="beta"))
    # Renaming to its own name is no conflict.
    assert (await store.update_tenant("acme", TenantPatch(name="acme"))).name == "acme"
    assert await store.get_tenant("acme") == acme

    for call in (
        store.get_tenant("nobody"),
        store.update_tenant("nobody", TenantPatch(weight=2.0)),
        store.delete_tenant("nobody"),
        store.create_key("nobody", KeySpec()),
        store.usage("nobody", "day"),
        store.list_keys(tenant_id="nobody"),
    ):
        with pytest.raises(NotFound, match="nobody") as caught:
            await call
        assert caught.value.param is None and caught.value.status == 404
    with pytest.raises(NotFound, match="key_missing"):
        await store.revoke_key("key_missing")


async def test_wal_mode_and_schema_version(store: SQLiteStore, db_path: Path) -> None:
    assert read_pragma(db_path, "journal_mode") == "wal"
    assert read_pragma(db_path, "user_version") == len(MIGRATIONS) >= 1


async def test_a_new_database_and_its_wal_are_readable_by_the_owner_only(
    store: SQLiteStore, db_path: Path
) -> None:
    """It holds key hashes and every tenant's usage: 0600 whatever the umask, and SQLite gives
    the WAL and shared-memory files the database's mode."""
    await store.create_tenant(TenantSpec(name="acme"))
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists()
    for path in (db_path, wal):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_reopening_keeps_data(db_path: Path) -> None:
    first = await SQLiteStore.open(db_path)
    tenant = await first.create_tenant(TenantSpec(name="acme", quotas=Quotas(token_budget=7)))
    created = await first.create_key("acme", KeySpec(name="ci"))
    await first.revoke_key(created.key.key_id)
    revoked = (await first.list_keys())[0]
    await first.record_usage([UsageDelta(tenant.tenant_id, JAN_15, prompt_tokens=3)])
    await first.close()
    await first.close()  # closing twice is harmless

    second = await SQLiteStore.open(db_path)
    try:
        assert await second.list_tenants() == [tenant]
        assert await second.list_keys() == [revoked]
        assert await second.find_key(created.secret) == (revoked, tenant)
        assert await second.total_tokens(tenant.tenant_id, "month", "2025-01") == 3
    finally:
        await second.close()
    assert read_pragma(db_path, "user_version") == len(MIGRATIONS)


async def test_newer_schema_is_refused(db_path: Path) -> None:
    await (await SQLiteStore.open(db_path)).close()
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(SchemaTooNew, match=f"version {len(MIGRATIONS) + 1}"):
        await SQLiteStore.open(db_path)


async def test_closed_store_refuses_work(db_path: Path) -> None:
    opened = await SQLiteStore.open(db_path)
    await opened.close()
    with pytest.raises(RuntimeError, match="closed"):
        await opened.list_tenants()


async def test_secret_is_stored_only_as_its_hash(store: SQLiteStore, db_path: Path) -> None:
    await store.create_tenant(TenantSpec(name="acme"))
    created = await store.create_key("acme", KeySpec(name="ci"))
    secret = created.secret
    assert secret.startswith("fg-") and len(secret) == 3 + 43
    assert created.key.prefix == secret[:11]
    assert created.key.key_id.startswith("key_") and len(created.key.key_id) == 4 + 16

    files = [db_path, db_path.with_name(db_path.name + "-wal")]
    on_disk = b"".join(path.read_bytes() for path in files if path.exists())
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in on_disk
    assert secret.encode() not in on_disk
    assert secret[11:].encode() not in on_disk  # not even the part after the display prefix


async def test_find_key(store: SQLiteStore) -> None:
    tenant = await store.create_tenant(TenantSpec(name="acme"))
    created = await store.create_key(tenant.tenant_id, KeySpec(name="ci"))
    other = await store.create_key("acme", KeySpec())

    assert await store.find_key(created.secret) == (created.key, tenant)
    assert await store.find_key(other.secret) == (other.key, tenant)
    mutated = created.secret[:-1] + ("A" if created.secret[-1] != "A" else "B")
    assert await store.find_key(mutated) is None
    assert await store.find_key("fg-unknown") is None
    assert await store.find_key("") is None

    revoked = await store.revoke_key(created.key.key_id)
    assert revoked.revoked_at is not None and revoked.revoked_at >= created.key.created_at
    again = await store.revoke_key(created.key.key_id)
    assert again.revoked_at == revoked.revoked_at  # the first revocation stands
    assert await store.find_key(created.secret) == (revoked, tenant)
    assert await store.find_key(other.secret) == (other.key, tenant)


async def test_list_keys_by_tenant_and_prefix(store: SQLiteStore) -> None:
    acme = await store.create_tenant(TenantSpec(name="acme"))
    await store.create_tenant(TenantSpec(name="beta"))
    a1 = (await store.create_key("acme", KeySpec(name="a1"))).key
    b1 = (await store.create_key("beta", KeySpec(name="b1"))).key
    a2 = (await store.create_key(acme.tenant_id, KeySpec(name="a2"))).key

    assert await store.list_keys() == [a1, b1, a2]
    assert await store.list_keys(tenant_id="acme") == [a1, a2]
    assert await store.list_keys(tenant_id=acme.tenant_id) == [a1, a2]
    assert await store.list_keys(prefix=b1.prefix) == [b1]
    assert await store.list_keys(prefix=b1.prefix[:8]) == [
        k for k in (a1, b1, a2) if k.prefix.startswith(b1.prefix[:8])
    ]
    assert await store.list_keys(tenant_id="acme", prefix=b1.prefix) == []
    assert await store.list_keys(prefix="fg-") == [a1, b1, a2]
    assert await store.list_keys(prefix="zz") == []


async def test_delete_cascades_keys_and_usage(store: SQLiteStore, db_path: Path) -> None:
    acme = await store.create_tenant(TenantSpec(name="acme"))
    beta = await store.create_tenant(TenantSpec(name="beta"))
    acme_key = await store.create_key("acme", KeySpec())
    beta_key = await store.create_key("beta", KeySpec())
    await store.record_usage(
        [UsageDelta(acme.tenant_id, JAN_15, prompt_tokens=5), UsageDelta(beta.tenant_id, JAN_15)]
    )

    await store.delete_tenant("acme")
    assert await store.find_key(acme_key.secret) is None
    assert await store.list_keys() == [beta_key.key]
    assert await store.total_tokens(acme.tenant_id, "day", "2025-01-15") == 0
    with sqlite3.connect(db_path) as db:
        counts = db.execute(
            "SELECT (SELECT count(*) FROM api_keys WHERE tenant_id = ?),"
            " (SELECT count(*) FROM usage WHERE tenant_id = ?),"
            " (SELECT count(*) FROM usage WHERE tenant_id = ?)",
            (acme.tenant_id, acme.tenant_id, beta.tenant_id),
        ).fetchone()
    db.close()
    assert counts == (0, 0, 2)

    # Usage of the deleted tenant arriving late is skipped; the rest of the batch is recorded.
    await store.record_usage(
        [UsageDelta(acme.tenant_id, JAN_15), UsageDelta(beta.tenant_id, JAN_15, prompt_tokens=4)]
    )
    assert await store.usage("beta", "day") == [Usage(beta.tenant_id, "2025-01-15", 2, 4, 0, 0)]


async def test_record_usage_sums_day_and_month_rows(store: SQLiteStore) -> None:
    acme = await store.create_tenant(TenantSpec(name="acme"))
    tid = acme.tenant_id
    await store.record_usage(
        [
            UsageDelta(tid, JAN_15, prompt_tokens=10, cached_tokens=4, completion_tokens=20),
            UsageDelta(tid, JAN_15 + 60, prompt_tokens=1, completion_tokens=2),
            UsageDelta(tid, JAN_16, requests=2, prompt_tokens=100, completion_tokens=200),
        ]
    )
    await store.record_usage([UsageDelta(tid, FEB_1, prompt_tokens=7, completion_tokens=8)])
    await store.record_usage([])

    assert await store.usage("acme", "day") == [
        Usage(tid, "2025-02-01", 1, 7, 0, 8),
        Usage(tid, "2025-01-16", 2, 100, 0, 200),
        Usage(tid, "2025-01-15", 2, 11, 4, 22),
    ]
    assert await store.usage(tid, "month") == [
        Usage(tid, "2025-02", 1, 7, 0, 8),
        Usage(tid, "2025-01", 4, 111, 4, 222),
    ]
    assert await store.usage("acme", "day", period="2025-01-16") == [
        Usage(tid, "2025-01-16", 2, 100, 0, 200)
    ]
    assert await store.usage("acme", "month", period="2024-12") == [
        Usage(tid, "2024-12", 0, 0, 0, 0)
    ]
    assert await store.total_tokens(tid, "month", "2025-01") == 333
    assert await store.total_tokens(tid, "day", "2025-01-15") == 33
    assert await store.total_tokens(tid, "day", "2025-01-17") == 0


async def test_concurrent_record_usage_sums_exactly(store: SQLiteStore) -> None:
    tid = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    batches = [
        [UsageDelta(tid, JAN_15 + i, prompt_tokens=i, completion_tokens=1) for _ in range(3)]
        for i in range(50)
    ]
    await asyncio.gather(*(store.record_usage(batch) for batch in batches))
    prompt = 3 * sum(range(50))
    assert await store.usage("acme", "month") == [Usage(tid, "2025-01", 150, prompt, 0, 150)]
    assert await store.usage("acme", "day") == [Usage(tid, "2025-01-15", 150, prompt, 0, 150)]


async def test_event_loop_stays_responsive(store: SQLiteStore) -> None:
    tid = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    # 5,000 requests over ~580 distinct days: over a thousand upserts in one transaction.
    deltas = [UsageDelta(tid, JAN_15 + i * 10_000.0, prompt_tokens=1) for i in range(5_000)]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.create_task(ticker())
    await store.record_usage(deltas)
    during = ticks
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert during >= 10, f"the loop ticked only {during} times while the store worked"
    months = await store.usage("acme", "month")
    assert sum(row.prompt_tokens for row in months) == 5_000
    assert len(await store.usage("acme", "day")) == len({int(d.at // 86_400) for d in deltas})
