"""The tenant stores on real databases, each test on both backends where it applies: an SQLite
file (``SQLiteStore``) and a PostgreSQL server of the session's own (``PostgresStore``,
``tests/postgres.py``). Tenants and keys by id and by name, errors, the schema version and
migrations, what is kept of a key, the usage ledger under concurrency, an event loop that keeps
running while the store works; for PostgreSQL also what several replicas sharing one database
do at once (migrating, naming tenants, recording usage), and a server that drops connections or
holds a lock too long."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest

import gateway.store
import gateway.store_postgres
from gateway.config import ConfigError, StoreSection
from gateway.errors import Conflict, NotFound
from gateway.store import MIGRATIONS, SchemaTooNew, SQLiteStore
from gateway.store_common import StoreUnavailable
from gateway.store_postgres import PostgresStore
from gateway.stores import GatewayStore, open_store
from gateway.tenants import KeySpec, Quotas, Tenant, TenantPatch, TenantSpec, Usage, UsageDelta
from tests.postgres import FETCH_SCRIPT, PostgresServer
from tests.postgres import postgres_server as postgres_server
from tests.postgres import postgres_url as postgres_url

JAN_15 = dt.datetime(2025, 1, 15, 12, 0, tzinfo=dt.UTC).timestamp()
JAN_16 = dt.datetime(2025, 1, 16, 9, 0, tzinfo=dt.UTC).timestamp()
FEB_1 = dt.datetime(2025, 2, 1, 0, 30, tzinfo=dt.UTC).timestamp()
NEW_TABLES = ("model_aliases", "model_settings", "model_usage")  # schema version 2's


class Backend:
    """One database of one kind, and what a test needs beside the store: more stores on it,
    its rows read directly, its schema version read and set."""

    def __init__(self, name: str, module: ModuleType, location: str) -> None:
        self.name = name
        self.module = module  # gateway.store or gateway.store_postgres: its MIGRATIONS
        self.location = location  # the SQLite file, or the database's URL

    async def open(self) -> GatewayStore:
        if self.name == "sqlite":
            return await SQLiteStore.open(self.location)
        return await PostgresStore.open(self.location)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on a connection of its own (``?`` placeholders); its rows."""
        if self.name == "sqlite":
            with sqlite3.connect(self.location) as db:
                rows = db.execute(sql, params).fetchall()
            db.close()
            return rows
        with psycopg.connect(self.location, autocommit=True) as pg:
            cursor = pg.execute(sql.replace("?", "%s").encode(), params)
            return cursor.fetchall() if cursor.description is not None else []

    def schema_version(self) -> int:
        if self.name == "sqlite":
            return int(self.query("PRAGMA user_version")[0][0])
        return int(self.query("SELECT version FROM schema_version")[0][0])

    def set_schema_version(self, version: int) -> None:
        if self.name == "sqlite":
            self.query(f"PRAGMA user_version = {version}")
        else:
            self.query("UPDATE schema_version SET version = ?", (version,))

    def has_table(self, table: str) -> bool:
        if self.name == "sqlite":
            found = self.query("SELECT name FROM sqlite_master WHERE name = ?", (table,))
        else:
            found = self.query("SELECT to_regclass(?)::text", (table,))
        return bool(found) and found[0][0] is not None


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "fairgate.db"  # the directory does not exist yet


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, db_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", gateway.store, str(db_path))
    # Only here: the SQLite half of the module needs no PostgreSQL server.
    url: str = request.getfixturevalue("postgres_url")
    return Backend("postgres", gateway.store_postgres, url)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[GatewayStore]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()


def read_pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as db:
        value = db.execute(f"PRAGMA {name}").fetchone()[0]
    db.close()
    return value


async def test_create_get_list_update_delete(store: GatewayStore) -> None:
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


async def test_conflict_and_not_found(store: GatewayStore) -> None:
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


async def test_sqlite_wal_mode_and_schema_version(db_path: Path) -> None:
    await (await SQLiteStore.open(db_path)).close()
    assert read_pragma(db_path, "journal_mode") == "wal"
    assert read_pragma(db_path, "user_version") == len(MIGRATIONS) >= 1


async def test_schema_version(store: GatewayStore, backend: Backend) -> None:
    assert backend.schema_version() == len(backend.module.MIGRATIONS) >= 2
    for table in ("tenants", "api_keys", "usage", *NEW_TABLES):
        assert backend.has_table(table), table


def test_both_backends_know_the_same_schema_versions() -> None:
    """PostgreSQL's migrations are SQLite's in its dialect: the lists grow together."""
    assert len(gateway.store_postgres.MIGRATIONS) == len(gateway.store.MIGRATIONS)


async def test_a_new_database_and_its_wal_are_readable_by_the_owner_only(db_path: Path) -> None:
    """It holds key hashes and every tenant's usage: 0600 whatever the umask, and SQLite gives
    the WAL and shared-memory files the database's mode."""
    store = await SQLiteStore.open(db_path)
    try:
        await store.create_tenant(TenantSpec(name="acme"))
        wal = db_path.with_name(db_path.name + "-wal")
        assert wal.exists()  # until the store closes
        for path in (db_path, wal):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        await store.close()


async def test_reopening_keeps_data(backend: Backend) -> None:
    first = await backend.open()
    tenant = await first.create_tenant(TenantSpec(name="acme", quotas=Quotas(token_budget=7)))
    created = await first.create_key("acme", KeySpec(name="ci"))
    await first.revoke_key(created.key.key_id)
    revoked = (await first.list_keys())[0]
    await first.record_usage([UsageDelta(tenant.tenant_id, JAN_15, prompt_tokens=3)])
    await first.close()
    await first.close()  # closing twice is harmless

    second = await backend.open()
    try:
        assert await second.list_tenants() == [tenant]
        assert await second.list_keys() == [revoked]
        assert await second.find_key(created.secret) == (revoked, tenant)
        assert await second.total_tokens(tenant.tenant_id, "month", "2025-01") == 3
    finally:
        await second.close()
    assert backend.schema_version() == len(backend.module.MIGRATIONS)


async def test_newer_schema_is_refused(backend: Backend) -> None:
    await (await backend.open()).close()
    newer = len(backend.module.MIGRATIONS) + 1
    backend.set_schema_version(newer)
    with pytest.raises(SchemaTooNew, match=f"version {newer}") as caught:
        await backend.open()
    if backend.name == "postgres":
        password = str(psycopg.conninfo.conninfo_to_dict(backend.location)["password"])
        assert password and password not in str(caught.value)
    assert backend.schema_version() == newer  # refused, not rewritten


async def test_a_failed_migration_keeps_the_version_before_it(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each migration is its own transaction: the ones before a failing one stay applied, the
    failing one leaves nothing behind, and a later start applies it once it works."""
    known = list(backend.module.MIGRATIONS)
    broken = "CREATE TABLE extra (x INTEGER); CREATE TABLE broken (x NOSUCHSYNTAX("
    monkeypatch.setattr(backend.module, "MIGRATIONS", [*known, broken])
    with pytest.raises((sqlite3.Error, psycopg.Error)):
        await backend.open()
    assert backend.schema_version() == len(known)
    assert backend.has_table("tenants") and not backend.has_table("extra")

    monkeypatch.setattr(backend.module, "MIGRATIONS", [*known, "CREATE TABLE extra (x INTEGER)"])
    await (await backend.open()).close()
    assert backend.schema_version() == len(known) + 1
    assert backend.has_table("extra")


async def test_closed_store_refuses_work(backend: Backend) -> None:
    opened = await backend.open()
    await opened.close()
    with pytest.raises(RuntimeError, match="closed"):
        await opened.list_tenants()


async def test_secret_is_stored_only_as_its_hash(store: GatewayStore, backend: Backend) -> None:
    await store.create_tenant(TenantSpec(name="acme"))
    created = await store.create_key("acme", KeySpec(name="ci"))
    secret = created.secret
    assert secret.startswith("fg-") and len(secret) == 3 + 43
    assert created.key.prefix == secret[:11]
    assert created.key.key_id.startswith("key_") and len(created.key.key_id) == 4 + 16

    rows = repr(backend.query("SELECT * FROM api_keys"))
    assert hashlib.sha256(secret.encode()).hexdigest() in rows
    assert secret[11:] not in rows  # not even the part after the display prefix


async def test_sqlite_keeps_no_secret_on_disk(db_path: Path) -> None:
    store = await SQLiteStore.open(db_path)
    try:
        await store.create_tenant(TenantSpec(name="acme"))
        secret = (await store.create_key("acme", KeySpec(name="ci"))).secret
        files = [db_path, db_path.with_name(db_path.name + "-wal")]
        on_disk = b"".join(path.read_bytes() for path in files if path.exists())
    finally:
        await store.close()
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in on_disk
    assert secret.encode() not in on_disk
    assert secret[11:].encode() not in on_disk  # not even the part after the display prefix


async def test_find_key(store: GatewayStore) -> None:
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


async def test_list_keys_by_tenant_and_prefix(store: GatewayStore) -> None:
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


async def test_delete_cascades_keys_and_usage(store: GatewayStore, backend: Backend) -> None:
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
    counts = backend.query(
        "SELECT (SELECT count(*) FROM api_keys WHERE tenant_id = ?),"
        " (SELECT count(*) FROM usage WHERE tenant_id = ?),"
        " (SELECT count(*) FROM usage WHERE tenant_id = ?)",
        (acme.tenant_id, acme.tenant_id, beta.tenant_id),
    )
    assert counts == [(0, 0, 2)]

    # Usage of the deleted tenant arriving late is skipped; the rest of the batch is recorded.
    await store.record_usage(
        [UsageDelta(acme.tenant_id, JAN_15), UsageDelta(beta.tenant_id, JAN_15, prompt_tokens=4)]
    )
    assert await store.usage("beta", "day") == [Usage(beta.tenant_id, "2025-01-15", 2, 4, 0, 0)]


async def test_record_usage_sums_day_and_month_rows(store: GatewayStore) -> None:
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


async def test_concurrent_record_usage_sums_exactly(store: GatewayStore) -> None:
    tid = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    batches = [
        [UsageDelta(tid, JAN_15 + i, prompt_tokens=i, completion_tokens=1) for _ in range(3)]
        for i in range(50)
    ]
    await asyncio.gather(*(store.record_usage(batch) for batch in batches))
    prompt = 3 * sum(range(50))
    assert await store.usage("acme", "month") == [Usage(tid, "2025-01", 150, prompt, 0, 150)]
    assert await store.usage("acme", "day") == [Usage(tid, "2025-01-15", 150, prompt, 0, 150)]


async def test_event_loop_stays_responsive(store: GatewayStore) -> None:
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


# Which store a gateway opens


async def test_open_store_picks_the_backend_from_the_section(
    db_path: Path, postgres_url: str
) -> None:
    embedded = await open_store(StoreSection(path=str(db_path)))
    try:
        assert isinstance(embedded, SQLiteStore) and db_path.exists()
    finally:
        await embedded.close()
    shared = await open_store(
        StoreSection(path=str(db_path.with_name("unused.db")), url=postgres_url)
    )
    try:
        assert isinstance(shared, PostgresStore)
        assert (await shared.create_tenant(TenantSpec(name="acme"))).name == "acme"
    finally:
        await shared.close()
    assert not db_path.with_name("unused.db").exists()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("mysql://admin:hunter2secret@db/fairgate", "mysql://"),
        ("admin:hunter2secret@db/fairgate", "no scheme"),
        # libpq's own error would quote the password it cannot decode.
        ("postgresql://admin:hunter2secret%zz@db/fairgate", "not a valid PostgreSQL URL"),
    ],
)
async def test_open_store_refuses_other_urls_without_repeating_them(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=r"store\.url") as caught:
        await open_store(StoreSection(url=url))
    assert named in str(caught.value)
    assert "hunter2" not in str(caught.value) and caught.value.__cause__ is None


# PostgreSQL: several replicas on one database


async def test_postgres_replicas_starting_together_migrate_once(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the advisory lock the opens race: one fails creating a table another created."""
    caplog.set_level(logging.INFO, logger="gateway.store_postgres")
    stores = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(4)))
    try:
        migrated = [r for r in caplog.records if r.getMessage().startswith("migrated")]
        assert len(migrated) == len(gateway.store_postgres.MIGRATIONS)
        tenant = await stores[0].create_tenant(TenantSpec(name="acme"))
        assert [await store.get_tenant("acme") for store in stores] == [tenant] * 4
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_postgres_replicas_see_each_others_tenants_and_keys(postgres_url: str) -> None:
    first, second = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        tenant = await first.create_tenant(TenantSpec(name="acme"))
        created = await first.create_key("acme", KeySpec(name="ci"))
        assert await second.find_key(created.secret) == (created.key, tenant)
        revoked = await second.revoke_key(created.key.key_id)
        assert await first.find_key(created.secret) == (revoked, tenant)
        await second.delete_tenant("acme")
        assert await first.find_key(created.secret) is None
    finally:
        await first.close()
        await second.close()


async def test_postgres_one_name_taken_by_two_replicas_at_once(postgres_url: str) -> None:
    """The unique constraint decides: one create (or rename) wins, the other is a Conflict."""
    first, second = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        for round_ in range(10):
            outcomes = await asyncio.gather(
                first.create_tenant(TenantSpec(name=f"t{round_}")),
                second.create_tenant(TenantSpec(name=f"t{round_}")),
                return_exceptions=True,
            )
            assert sorted(type(outcome).__name__ for outcome in outcomes) == [
                "Conflict",
                "Tenant",
            ], outcomes
        a = await first.create_tenant(TenantSpec(name="a"))
        b = await first.create_tenant(TenantSpec(name="b"))
        outcomes = await asyncio.gather(
            first.update_tenant(a.tenant_id, TenantPatch(name="c")),
            second.update_tenant(b.tenant_id, TenantPatch(name="c")),
            return_exceptions=True,
        )
        assert sorted(type(outcome).__name__ for outcome in outcomes) == ["Conflict", "Tenant"]
        renamed = a if isinstance(outcomes[0], Tenant) else b
        kept = b if renamed is a else a
        names = {t.tenant_id: t.name for t in await second.list_tenants()}
        assert (names[renamed.tenant_id], names[kept.tenant_id]) == ("c", kept.name)
    finally:
        await first.close()
        await second.close()


async def test_postgres_usage_from_two_replicas_sums_exactly(postgres_url: str) -> None:
    """Two stores add to the same ledger rows at once, their batches naming the tenants in
    opposite orders: every token counts once, and no batch deadlocks another."""
    first, second = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        acme = (await first.create_tenant(TenantSpec(name="acme"))).tenant_id
        beta = (await first.create_tenant(TenantSpec(name="beta"))).tenant_id

        def batch(i: int, order: tuple[str, str]) -> list[UsageDelta]:
            return [
                UsageDelta(tid, JAN_15 + i, prompt_tokens=i, completion_tokens=1)
                for tid in order
                for _ in range(2)
            ]

        writes = [
            store.record_usage(batch(i, order))
            for i in range(40)
            for store, order in ((first, (acme, beta)), (second, (beta, acme)))
        ]
        await asyncio.gather(*writes)
        prompt = 2 * 2 * sum(range(40))  # two stores, two deltas per tenant per batch
        for tid in (acme, beta):
            assert await second.usage(tid, "month") == [Usage(tid, "2025-01", 160, prompt, 0, 160)]
            assert await first.total_tokens(tid, "day", "2025-01-15") == prompt + 160
    finally:
        await first.close()
        await second.close()


async def test_postgres_connections_the_server_dropped_are_replaced(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """A server restart or failover ends every connection; the pool checks a connection before
    handing it out, so the next call works instead of failing on a dead one."""
    store = await PostgresStore.open(postgres_url, max_connections=2)
    try:
        await store.create_tenant(TenantSpec(name="acme"))
        database = psycopg.conninfo.conninfo_to_dict(postgres_url)["dbname"]
        ended = postgres_server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )
        assert ended and all(row[0] for row in ended)
        assert [t.name for t in await store.list_tenants()] == ["acme"]
    finally:
        await store.close()


async def test_postgres_a_call_past_its_timeout_is_unavailable_and_the_store_goes_on(
    postgres_url: str,
) -> None:
    """Another session holds the tenant's row locked: the patch waits its timeout, fails with
    503 store_unavailable, and the store's next calls work."""
    store = await PostgresStore.open(postgres_url, timeout_s=0.5)
    try:
        tenant = await store.create_tenant(TenantSpec(name="acme"))
        async with await psycopg.AsyncConnection.connect(postgres_url) as holder:
            await holder.execute("SELECT 1 FROM tenants FOR UPDATE")  # in its open transaction
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(StoreUnavailable) as caught:
                await store.update_tenant("acme", TenantPatch(weight=2.0))
            assert 0.5 <= loop.time() - began < 5.0
            assert (caught.value.status, caught.value.code) == (503, "store_unavailable")
            await holder.rollback()
        assert await store.get_tenant("acme") == tenant  # the patch did not apply
        patched = await store.update_tenant("acme", TenantPatch(weight=3.0))
        assert patched.weight == 3.0
    finally:
        await store.close()


async def test_postgres_an_unreachable_server_is_unavailable(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The reason goes to the log, the password nowhere."""
    url = postgres_server.url("postgres").replace(f":{postgres_server.port}/", ":1/")
    with pytest.raises(StoreUnavailable, match="could not open") as caught:
        await PostgresStore.open(url, timeout_s=5.0)
    assert "refused" in caplog.text
    for text in (caplog.text, str(caught.value), repr(caught.value.__cause__)):
        assert postgres_server.password not in text


def test_postgres_script_says_why_it_has_no_server(tmp_path: Path) -> None:
    """Nothing on PATH and nothing installed: as root it would install Debian's package with
    apt-get (absent from this PATH); as anyone else it cannot, and says what to do. Either way:
    status 1 and no stdout. Run as root, the test runs it both as root and as ``nobody``."""
    bash = shutil.which("bash")
    assert bash is not None
    empty = tmp_path / "empty"
    empty.mkdir()
    tmp_path.chmod(0o755)  # ``nobody`` must pass through to its working directory
    runs: list[tuple[dict[str, Any], str]] = [({}, "not root, so cannot install them")]
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        runs = [({}, "no apt-get to install"), (as_nobody, runs[0][1])]
    for user, expected in runs:
        done = subprocess.run(
            [bash, str(FETCH_SCRIPT)],
            env={"PATH": str(empty), "FAIRGATE_POSTGRES_LIBDIR": str(empty)},
            cwd=empty,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            **user,
        )
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert expected in done.stderr and "FAIRGATE_SKIP_POSTGRES=1" in done.stderr, done.stderr
