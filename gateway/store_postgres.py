"""``PostgresStore``: tenants, API keys, the usage ledger (per tenant, per model and per key), the
models' aliases and settings, and the audit log of admin changes in PostgreSQL (``TenantStore``),
the store that several gateway replicas share. It behaves as ``SQLiteStore`` does, error for
error; what the two share is in ``gateway.store_common``.

Connections: psycopg 3's async driver through a pool (``psycopg_pool.AsyncConnectionPool``), in
autocommit mode, so that the only transactions are the ones ``conn.transaction()`` opens. Every
operation has ``timeout_s`` to get a connection and finish; past it, or when the server cannot be
reached, it raises ``StoreUnavailable`` (503) and logs the driver's error. A write cut off that
way after its COMMIT was sent may or may not have been applied: nothing can tell.

Replicas write at once, so every write is safe against the others at READ COMMITTED: a tenant's
name is unique by constraint (a lost race is a ``Conflict``), a patch (of a tenant or a key) locks
its row before reading it, usage is added with ``INSERT … ON CONFLICT DO UPDATE SET x = x +
EXCLUDED.x`` (row locks make concurrent additions sum exactly) in a fixed row order (no deadlock
between two batches), and the tenants of a batch are locked ``FOR KEY SHARE`` first, so a tenant
deleted meanwhile is either deleted before (its deltas are skipped, as SQLite's store does) or
after the batch. Setting an alias or a cost factor locks the row if it is there, else inserts
it if it is still absent (``_lock_or_insert``), so two admins setting one alias at once get one
"created" between them, and each change's ``before`` is what the one before it wrote. An admin
change's audit record (``audit=``, ``gateway.audit``) is written in the change's transaction:
a change cut off as above was applied with its record or not at all.

Schema: ``MIGRATIONS[i]`` moves the schema from version ``i`` to ``i + 1`` and is SQLite's
``gateway.store.MIGRATIONS[i]`` in PostgreSQL's dialect: the two lists grow together. The version
lives in the one row of ``schema_version`` (PostgreSQL has no ``user_version``). ``open`` applies
the missing ones, each in its own transaction that first takes a transaction-scoped advisory lock
(``MIGRATION_LOCK_ID``), so replicas starting together migrate one after the other and each
migration runs once; a database written by a newer fairgate is refused (``SchemaTooNew``). The
role in the URL needs to create tables in its schema (PostgreSQL 15 and later: own it, or be
granted CREATE on it). Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.audit import AuditDraft, Audited, AuditRecord
from gateway.errors import Conflict, NotFound
from gateway.store_common import (
    AUDIT_COLUMNS,
    AUDIT_FAILED,
    KEY_COLUMNS,
    MODEL_USAGE_COLUMNS,
    RECORD_FAILED,
    TENANT_COLUMNS,
    USAGE_COLUMNS,
    AuditWriteFailed,
    SchemaTooNew,
    StoreUnavailable,
    api_key_from_row,
    audit_from_row,
    audit_values,
    checked_cost_factor,
    hash_secret,
    hashes_match,
    key_usage_totals,
    key_values,
    model_usage_from_row,
    model_usage_totals,
    new_api_key,
    new_secret,
    new_tenant,
    patched_key,
    patched_tenant,
    tenant_from_row,
    tenant_values,
    usage_totals,
)
from gateway.tenants import (
    ApiKey,
    BudgetPeriod,
    CreatedKey,
    KeyPatch,
    KeySpec,
    ModelAlias,
    ModelSetting,
    ModelUsage,
    Tenant,
    TenantPatch,
    TenantSpec,
    Usage,
    UsageDelta,
)

__all__ = ["MIGRATIONS", "MIGRATION_LOCK_ID", "PostgresStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Connection = AsyncConnection[tuple[Any, ...]]
# How ``_find_tenant`` locks the row it finds until the transaction ends: against a delete while
# a key or usage refers to it (KEY SHARE), against a concurrent patch (NO KEY UPDATE), or to
# delete it (UPDATE).
RowLock = Literal["", "FOR KEY SHARE", "FOR NO KEY UPDATE", "FOR UPDATE"]

# pg_advisory_xact_lock's key while migrating: "fairgate" in ASCII, as a positive bigint. Advisory
# locks are per database, so stores of different databases on one server do not wait on each other.
MIGRATION_LOCK_ID = 0x6661697267617465
TIMEOUT_S = 10.0
NAME_CONSTRAINT = "tenants_name_unique"
CALL_FAILED = "the tenant store is unavailable; try again shortly"
OPEN_FAILED = "could not open the tenant store's PostgreSQL database (store.url); the log says why"
# find_key reads the key and its tenant in one query: the key's columns, its hash, the tenant's.
_KEY_AND_TENANT_COLUMNS = ", ".join(
    [*(f"k.{c}" for c in KEY_COLUMNS.split(", ")), "k.key_hash"]
    + [f"t.{c}" for c in TENANT_COLUMNS.split(", ")]
)
_NUM_KEY_COLUMNS = len(KEY_COLUMNS.split(", "))

MIGRATIONS: list[str] = [
    # 0 -> 1: tenants, their keys, their usage per day and per month. ``seq`` orders rows created
    # within the same ``created_at`` as SQLite's rowid does.
    """
    CREATE TABLE tenants (
        tenant_id       TEXT PRIMARY KEY,
        name            TEXT NOT NULL CONSTRAINT tenants_name_unique UNIQUE,
        weight          DOUBLE PRECISION NOT NULL,
        default_class   TEXT NOT NULL,
        allowed_classes TEXT NOT NULL,  -- JSON list of class names
        quotas          TEXT NOT NULL,  -- JSON of gateway.tenants.Quotas
        over_quota      TEXT NOT NULL CHECK (over_quota IN ('reject', 'demote')),
        created_at      DOUBLE PRECISION NOT NULL,
        seq             BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE TABLE api_keys (
        key_id     TEXT PRIMARY KEY,
        tenant_id  TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        key_hash   TEXT NOT NULL UNIQUE,  -- SHA-256 hex of the secret; the secret is not kept
        prefix     TEXT NOT NULL,
        name       TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        seq        BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX api_keys_prefix ON api_keys (prefix);
    CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
    CREATE TABLE usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        period_kind       TEXT NOT NULL CHECK (period_kind IN ('day', 'month')),
        period            TEXT NOT NULL,  -- YYYY-MM-DD or YYYY-MM (UTC)
        requests          BIGINT NOT NULL DEFAULT 0,
        prompt_tokens     BIGINT NOT NULL DEFAULT 0,
        cached_tokens     BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, period_kind, period)
    );
    """,
    # 1 -> 2: several models. The models a tenant may use and its quotas per model; usage also
    # in normalised cost units (a model's cost factor times its tokens) and per model; the
    # admins' aliases of models and their settings per model.
    """
    -- JSON list of model ids or aliases ([]: every model), JSON {model id: Quotas}
    ALTER TABLE tenants ADD COLUMN allowed_models TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE tenants ADD COLUMN model_quotas TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE usage ADD COLUMN units DOUBLE PRECISION NOT NULL DEFAULT 0;
    CREATE TABLE model_aliases (
        alias      TEXT PRIMARY KEY,
        model_id   TEXT NOT NULL,  -- a model id, which need not have a worker yet
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE model_settings (
        model_id    TEXT PRIMARY KEY,
        cost_factor DOUBLE PRECISION  -- NULL: measured
    );
    CREATE TABLE model_usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        period_kind       TEXT NOT NULL CHECK (period_kind IN ('day', 'month')),
        period            TEXT NOT NULL,  -- YYYY-MM-DD or YYYY-MM (UTC)
        model_id          TEXT NOT NULL,
        requests          BIGINT NOT NULL DEFAULT 0,
        prompt_tokens     BIGINT NOT NULL DEFAULT 0,
        cached_tokens     BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        units             DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, period_kind, period, model_id)
    );
    """,
    # 2 -> 3: keys' own limits and expiry; usage per key; the audit log of admin changes (kept
    # when its tenant is deleted: no reference to tenants).
    """
    ALTER TABLE api_keys ADD COLUMN quotas TEXT NOT NULL DEFAULT '{}';  -- JSON of Quotas
    ALTER TABLE api_keys ADD COLUMN expires_at DOUBLE PRECISION;  -- NULL: never
    CREATE TABLE key_usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        period_kind       TEXT NOT NULL CHECK (period_kind IN ('day', 'month')),
        period            TEXT NOT NULL,  -- YYYY-MM-DD or YYYY-MM (UTC)
        key_id            TEXT NOT NULL REFERENCES api_keys (key_id) ON DELETE CASCADE,
        requests          BIGINT NOT NULL DEFAULT 0,
        prompt_tokens     BIGINT NOT NULL DEFAULT 0,
        cached_tokens     BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        units             DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, period_kind, period)
    );
    CREATE INDEX key_usage_tenant ON key_usage (tenant_id);
    CREATE TABLE audit_log (
        audit_id  TEXT PRIMARY KEY,
        at        DOUBLE PRECISION NOT NULL,
        actor     TEXT NOT NULL,  -- e.g. admin-token:3f9a1c2b, never the credential
        action    TEXT NOT NULL,
        target    TEXT NOT NULL,
        tenant_id TEXT NOT NULL,  -- '' for none
        before    TEXT,           -- JSON object; NULL: it did not exist
        after     TEXT,           -- JSON object; NULL: it is gone
        seq       BIGINT GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX audit_log_at ON audit_log (at);
    CREATE INDEX audit_log_tenant ON audit_log (tenant_id, at);
    """,
]


def _add_sums(table: str) -> str:
    """Adds a batch's sums to ``table``'s ledger row that is already there."""
    return " DO UPDATE SET " + ", ".join(
        f"{column} = {table}.{column} + EXCLUDED.{column}"
        for column in ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "units")
    )


# The ledger's upserts: (tenant, kind, period[, model]) then the five sums.
_ADD_USAGE = (
    f"INSERT INTO usage (tenant_id, period_kind, {USAGE_COLUMNS})"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
    f" ON CONFLICT (tenant_id, period_kind, period){_add_sums('usage')}"
)
_ADD_MODEL_USAGE = (
    f"INSERT INTO model_usage ({MODEL_USAGE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
    f" ON CONFLICT (tenant_id, period_kind, period, model_id){_add_sums('model_usage')}"
)
_ADD_KEY_USAGE = (
    "INSERT INTO key_usage (tenant_id, period_kind, period, key_id, requests, prompt_tokens,"
    " cached_tokens, completion_tokens, units) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
    f" ON CONFLICT (key_id, period_kind, period){_add_sums('key_usage')}"
)
_KEY_MARKS = ", ".join(["%s"] * len(KEY_COLUMNS.split(", ")))
_INSERT_AUDIT = f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"

# Created by the first migrating transaction, under the lock (a CREATE racing another would fail).
_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_version (
        id      INTEGER PRIMARY KEY CHECK (id = 1),  -- one row
        version INTEGER NOT NULL
    )
"""


class PostgresStore:
    """``TenantStore`` on a PostgreSQL database. Build it with ``await PostgresStore.open(url)``;
    every method is safe to call from any task on the loop that opened it, and any number of
    stores (in this process or in other replicas) may use the same database at once; ``close``
    ends it."""

    def __init__(self, pool: AsyncConnectionPool[Connection], timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, *, max_connections: int = 10, timeout_s: float = TIMEOUT_S
    ) -> PostgresStore:
        """Connects to the database at ``url`` (``postgresql://user:password@host:port/db``),
        migrates it, and opens a pool of up to ``max_connections``. ``StoreUnavailable`` when
        the server does not answer within ``timeout_s``; the wait for another replica's
        migration counts in it."""
        try:
            async with asyncio.timeout(timeout_s):
                connection = await AsyncConnection.connect(url, autocommit=True)
                try:
                    await _migrate(connection)
                finally:
                    await connection.close()
        except (TimeoutError, psycopg.OperationalError) as exc:
            raise _unavailable("opening the database", exc, timeout_s, OPEN_FAILED) from exc
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True},
            # A connection the server dropped (a restart, a failover) is replaced before use,
            # not handed to a request that would fail on it.
            check=AsyncConnectionPool.check_connection,
            timeout=timeout_s,
            name="fairgate-store",
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=timeout_s)
        except PoolTimeout as exc:
            await pool.close()
            raise _unavailable("opening the database", exc, timeout_s, OPEN_FAILED) from exc
        return cls(pool, timeout_s)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.close(timeout=self._timeout_s)

    async def _run(self, name: str, work: Callable[[Connection], Awaitable[T]]) -> T:
        """``work`` on a connection of the pool, within ``timeout_s`` in all."""
        if self._closed:
            raise RuntimeError("the tenant store is closed")
        try:
            async with asyncio.timeout(self._timeout_s), self._pool.connection() as connection:
                return await work(connection)
        except (TimeoutError, PoolTimeout, psycopg.OperationalError) as exc:
            raise _unavailable(name, exc, self._timeout_s) from exc

    # Tenants

    async def create_tenant(self, spec: TenantSpec, *, audit: AuditDraft | None = None) -> Tenant:
        tenant = new_tenant(spec)

        async def work(db: Connection) -> Tenant:
            async with db.transaction():
                with _name_conflict(tenant.name):  # taken, maybe by another replica just now
                    await db.execute(
                        f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES (%(tenant_id)s, %(name)s,"
                        " %(weight)s, %(default_class)s, %(allowed_classes)s, %(quotas)s,"
                        " %(over_quota)s, %(created_at)s, %(allowed_models)s, %(model_quotas)s)",
                        tenant_values(tenant),
                    )
                await _audit(db, audit, None, tenant)
            return tenant

        return await self._run("create_tenant", work)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        """The tenant with this id or, failing that, this name."""
        return await self._run("get_tenant", lambda db: _find_tenant(db, tenant_id))

    async def list_tenants(self) -> list[Tenant]:
        async def work(db: Connection) -> list[Tenant]:
            cursor = await db.execute(
                f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at, seq"
            )
            return [tenant_from_row(row) for row in await cursor.fetchall()]

        return await self._run("list_tenants", work)

    async def update_tenant(
        self, tenant_id: str, patch: TenantPatch, *, audit: AuditDraft | None = None
    ) -> Tenant:
        """Applies ``patch`` to the tenant with this id or name; unset fields stay. The row is
        locked from read to write, so patches from two replicas both apply."""

        async def work(db: Connection) -> Tenant:
            async with db.transaction():
                current = await _find_tenant(db, tenant_id, lock="FOR NO KEY UPDATE")
                updated = patched_tenant(current, patch)
                # A rename to a name that is taken; renaming to its own name is no conflict.
                with _name_conflict(updated.name):
                    await db.execute(
                        "UPDATE tenants SET name = %(name)s, weight = %(weight)s,"
                        " default_class = %(default_class)s,"
                        " allowed_classes = %(allowed_classes)s, quotas = %(quotas)s,"
                        " over_quota = %(over_quota)s, allowed_models = %(allowed_models)s,"
                        " model_quotas = %(model_quotas)s WHERE tenant_id = %(tenant_id)s",
                        tenant_values(updated),
                    )
                await _audit(db, audit, current, updated)
            return updated

        return await self._run("update_tenant", work)

    async def delete_tenant(self, tenant_id: str, *, audit: AuditDraft | None = None) -> Tenant:
        """Deletes the tenant with this id or name, its keys and its usage (by cascade); the
        tenant as it was."""

        async def work(db: Connection) -> Tenant:
            async with db.transaction():
                tenant = await _find_tenant(db, tenant_id, lock="FOR UPDATE")
                await db.execute("DELETE FROM tenants WHERE tenant_id = %s", (tenant.tenant_id,))
                await _audit(db, audit, tenant, None)
            return tenant

        return await self._run("delete_tenant", work)

    # Keys

    async def create_key(
        self, tenant_id: str, spec: KeySpec, *, audit: AuditDraft | None = None
    ) -> CreatedKey:
        """A new key for the tenant with this id or name; the secret is returned only here."""
        secret = new_secret()
        key_hash = hash_secret(secret)

        async def work(db: Connection) -> CreatedKey:
            async with db.transaction():
                # The tenant cannot be deleted between finding it and the insert.
                tenant = await _find_tenant(db, tenant_id, lock="FOR KEY SHARE")
                key = new_api_key(tenant.tenant_id, secret, spec)
                await db.execute(
                    f"INSERT INTO api_keys (key_hash, {KEY_COLUMNS}) VALUES (%s, {_KEY_MARKS})",
                    (key_hash, *key_values(key)),
                )
                await _audit(db, audit, None, key)
            return CreatedKey(key=key, secret=secret)

        return await self._run("create_key", work)

    async def list_keys(
        self, *, tenant_id: str | None = None, prefix: str | None = None
    ) -> list[ApiKey]:
        """Keys, oldest first: of one tenant (by id or name), whose display prefix starts with
        ``prefix``, or both."""

        async def work(db: Connection) -> list[ApiKey]:
            clauses: list[str] = []
            params: list[Any] = []
            if tenant_id is not None:
                clauses.append("tenant_id = %s")
                params.append((await _find_tenant(db, tenant_id)).tenant_id)
            if prefix is not None:
                # starts_with, not LIKE: '_' and '%' occur in url-safe secrets' prefixes.
                clauses.append("starts_with(prefix, %s)")
                params.append(prefix)
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            cursor = await db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys {where} ORDER BY created_at, seq", params
            )
            return [api_key_from_row(row) for row in await cursor.fetchall()]

        return await self._run("list_keys", work)

    async def get_key(self, key_id: str) -> ApiKey:
        return await self._run("get_key", lambda db: _find_key(db, key_id))

    async def update_key(
        self, key_id: str, patch: KeyPatch, *, audit: AuditDraft | None = None
    ) -> ApiKey:
        """Applies ``patch`` to the key; unset fields stay. A revoked key stays revoked. The row
        is locked from read to write, so patches from two replicas both apply."""

        async def work(db: Connection) -> ApiKey:
            async with db.transaction():
                current = await _find_key(db, key_id, lock="FOR NO KEY UPDATE")
                updated = patched_key(current, patch)
                await db.execute(
                    "UPDATE api_keys SET name = %s, quotas = %s, expires_at = %s WHERE key_id = %s",
                    (
                        updated.name,
                        msgspec.json.encode(updated.quotas).decode(),
                        updated.expires_at,
                        key_id,
                    ),
                )
                await _audit(db, audit, current, updated)
            return updated

        return await self._run("update_key", work)

    async def revoke_key(self, key_id: str, *, audit: AuditDraft | None = None) -> ApiKey:
        """Revokes the key; revoking it again keeps the first ``revoked_at``."""

        async def work(db: Connection) -> ApiKey:
            async with db.transaction():
                # The row lock orders two revocations: the second one reads the first one's
                # time, and its coalesce keeps it. The time is ours, as created_at is (not the
                # server's).
                current = await _find_key(db, key_id, lock="FOR NO KEY UPDATE")
                cursor = await db.execute(
                    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, %s) WHERE key_id = %s"
                    f" RETURNING {KEY_COLUMNS}",
                    (time.time(), key_id),
                )
                row = await cursor.fetchone()
                assert row is not None, "locked above"
                revoked = api_key_from_row(row)
                await _audit(db, audit, current, revoked)
            return revoked

        return await self._run("revoke_key", work)

    async def find_key(self, secret: str) -> tuple[ApiKey, Tenant] | None:
        """The key whose secret this is (revoked keys included) and its tenant, or None."""
        digest = hash_secret(secret)

        async def work(db: Connection) -> tuple[ApiKey, Tenant] | None:
            cursor = await db.execute(
                f"SELECT {_KEY_AND_TENANT_COLUMNS} FROM api_keys k JOIN tenants t"
                " ON t.tenant_id = k.tenant_id WHERE k.key_hash = %s",
                (digest,),
            )
            row = await cursor.fetchone()
            if row is None or not hashes_match(row[_NUM_KEY_COLUMNS], digest):
                return None
            return (
                api_key_from_row(row[:_NUM_KEY_COLUMNS]),
                tenant_from_row(row[_NUM_KEY_COLUMNS + 1 :]),
            )

        return await self._run("find_key", work)

    # Usage

    async def record_usage(self, deltas: list[UsageDelta]) -> None:
        """Adds each delta to its tenant's day and month rows and, when it names a model or a
        key, to the tenant's rows of that model and the key's rows, all in one transaction.
        Deltas of a tenant deleted meanwhile are skipped: its ledger went with it, so they have
        nowhere to go (and failing the whole batch would lose the other tenants' usage); so is
        the key part of a delta whose key is not the tenant's."""
        totals = usage_totals(deltas)
        # Every writer upserts its rows in this one order (the tenants' rows, the models', then
        # the keys'), so two batches that share rows wait for each other instead of deadlocking.
        rows = sorted(totals.items())
        model_rows = sorted(model_usage_totals(deltas).items())
        key_rows = sorted(key_usage_totals(deltas).items())

        async def work(db: Connection) -> None:
            async with db.transaction():
                cursor = await db.execute(
                    "SELECT tenant_id FROM tenants WHERE tenant_id = ANY(%s)"
                    " ORDER BY tenant_id FOR KEY SHARE",
                    (sorted({tenant_id for tenant_id, _, _ in totals}),),
                )
                known = {row[0] for row in await cursor.fetchall()}
                upserts = [(*key, *sums) for key, sums in rows if key[0] in known]
                model_upserts = [(*key, *sums) for key, sums in model_rows if key[0] in known]
                # A key goes only with its tenant (a cascade), which is locked above.
                cursor = await db.execute(
                    "SELECT tenant_id, key_id FROM api_keys WHERE key_id = ANY(%s)",
                    (sorted({key_id for (_, _, _, key_id), _ in key_rows}),),
                )
                known_keys = {(row[0], row[1]) for row in await cursor.fetchall()}
                key_upserts = [
                    (*key, *sums)
                    for key, sums in key_rows
                    if key[0] in known and (key[0], key[3]) in known_keys
                ]
                async with db.cursor() as upsert:
                    if upserts:
                        await upsert.executemany(_ADD_USAGE, upserts)
                    if model_upserts:
                        await upsert.executemany(_ADD_MODEL_USAGE, model_upserts)
                    if key_upserts:
                        await upsert.executemany(_ADD_KEY_USAGE, key_upserts)

        if deltas:
            await self._run("record_usage", work)

    async def usage(
        self, tenant_id: str, kind: BudgetPeriod, *, period: str | None = None
    ) -> list[Usage]:
        """The tenant's (by id or name) usage per ``kind``, newest first; with ``period``, exactly
        that period's row (zeros when nothing was recorded)."""

        async def work(db: Connection) -> list[Usage]:
            found = (await _find_tenant(db, tenant_id)).tenant_id
            query = f"SELECT {USAGE_COLUMNS} FROM usage WHERE tenant_id = %s AND period_kind = %s"
            params: list[Any] = [found, kind]
            if period is not None:
                query += " AND period = %s"
                params.append(period)
            # COLLATE "C": by character, whatever the database's collation makes of '-'.
            cursor = await db.execute(query + ' ORDER BY period COLLATE "C" DESC', params)
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
            if period is not None and not rows:
                rows = [(period, 0, 0, 0, 0, 0.0)]
            return [Usage(found, *row) for row in rows]

        return await self._run("usage", work)

    async def model_usage(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        *,
        period: str | None = None,
        model_id: str | None = None,
    ) -> list[ModelUsage]:
        """The tenant's (by id or name) usage per model and per ``kind``, newest first and by
        model id within a period; only ``period``'s and ``model_id``'s rows when given. A model
        with nothing recorded in a period has no row."""

        async def work(db: Connection) -> list[ModelUsage]:
            found = (await _find_tenant(db, tenant_id)).tenant_id
            query = (
                f"SELECT {MODEL_USAGE_COLUMNS} FROM model_usage"
                " WHERE tenant_id = %s AND period_kind = %s"
            )
            params: list[Any] = [found, kind]
            if period is not None:
                query += " AND period = %s"
                params.append(period)
            if model_id is not None:
                query += " AND model_id = %s"
                params.append(model_id)
            # COLLATE "C": by character, as SQLite orders them.
            cursor = await db.execute(
                query + ' ORDER BY period COLLATE "C" DESC, model_id COLLATE "C"', params
            )
            return [model_usage_from_row(row) for row in await cursor.fetchall()]

        return await self._run("model_usage", work)

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
        if model_id and key_id:
            raise ValueError("total_tokens: a model's or a key's, not both")

        async def work(db: Connection) -> int:
            if key_id:
                cursor = await db.execute(
                    "SELECT prompt_tokens + completion_tokens FROM key_usage WHERE"
                    " tenant_id = %s AND period_kind = %s AND period = %s AND key_id = %s",
                    (tenant_id, kind, period, key_id),
                )
            elif model_id:
                cursor = await db.execute(
                    "SELECT prompt_tokens + completion_tokens FROM model_usage WHERE"
                    " tenant_id = %s AND period_kind = %s AND period = %s AND model_id = %s",
                    (tenant_id, kind, period, model_id),
                )
            else:
                cursor = await db.execute(
                    "SELECT prompt_tokens + completion_tokens FROM usage"
                    " WHERE tenant_id = %s AND period_kind = %s AND period = %s",
                    (tenant_id, kind, period),
                )
            row = await cursor.fetchone()
            return 0 if row is None else int(row[0])

        return await self._run("total_tokens", work)

    # Audit

    async def record_audit(self, record: AuditRecord) -> None:
        """Appends a record to the audit log, on its own (``TenantStore.record_audit``)."""

        async def work(db: Connection) -> None:
            await _insert_audit(db, record, RECORD_FAILED)

        await self._run("record_audit", work)

    async def list_audit(
        self, *, since: float | None = None, tenant_id: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """The audit log, newest first: records at or after ``since``, of one tenant (by id)
        when given, at most ``limit``."""

        async def work(db: Connection) -> list[AuditRecord]:
            clauses: list[str] = []
            params: list[Any] = []
            if since is not None:
                clauses.append("at >= %s")
                params.append(since)
            if tenant_id is not None:
                clauses.append("tenant_id = %s")
                params.append(tenant_id)
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            cursor = await db.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit_log {where}"
                " ORDER BY at DESC, seq DESC LIMIT %s",
                [*params, max(0, limit)],
            )
            return [audit_from_row(row) for row in await cursor.fetchall()]

        return await self._run("list_audit", work)

    # Models

    async def list_aliases(self) -> list[ModelAlias]:
        """Every alias, by name."""

        async def work(db: Connection) -> list[ModelAlias]:
            cursor = await db.execute(
                'SELECT alias, model_id, updated_at FROM model_aliases ORDER BY alias COLLATE "C"'
            )
            return [ModelAlias(*row) for row in await cursor.fetchall()]

        return await self._run("list_aliases", work)

    async def set_alias(
        self, alias: str, model_id: str, *, audit: AuditDraft | None = None
    ) -> tuple[ModelAlias, bool]:
        """Points ``alias`` at ``model_id``: the alias as stored, and whether it is new. Of two
        replicas creating one alias at once, one is told it is new; the other moved it."""
        stored = ModelAlias(alias, model_id, time.time())

        async def work(db: Connection) -> tuple[ModelAlias, bool]:
            async with db.transaction():
                row = await _lock_or_insert(
                    db,
                    "SELECT alias, model_id, updated_at FROM model_aliases WHERE alias = %s",
                    (alias,),
                    "INSERT INTO model_aliases (alias, model_id, updated_at) VALUES (%s, %s, %s)",
                    msgspec.structs.astuple(stored),
                )
                current = None if row is None else ModelAlias(*row)
                if current is not None:
                    await db.execute(
                        "UPDATE model_aliases SET model_id = %s, updated_at = %s WHERE alias = %s",
                        (model_id, stored.updated_at, alias),
                    )
                await _audit(db, audit, current, stored)
            return stored, current is None

        return await self._run("set_alias", work)

    async def delete_alias(self, alias: str, *, audit: AuditDraft | None = None) -> bool:
        """Deletes the alias; False when there was none (and no record is written)."""

        async def work(db: Connection) -> bool:
            async with db.transaction():
                cursor = await db.execute(
                    "DELETE FROM model_aliases WHERE alias = %s"
                    " RETURNING alias, model_id, updated_at",
                    (alias,),
                )
                row = await cursor.fetchone()
                if row is None:
                    return False
                await _audit(db, audit, ModelAlias(*row), None)
            return True

        return await self._run("delete_alias", work)

    async def list_model_settings(self) -> list[ModelSetting]:
        """Every model an admin set something for, by id."""

        async def work(db: Connection) -> list[ModelSetting]:
            cursor = await db.execute(
                'SELECT model_id, cost_factor FROM model_settings ORDER BY model_id COLLATE "C"'
            )
            return [ModelSetting(*row) for row in await cursor.fetchall()]

        return await self._run("list_model_settings", work)

    async def set_cost_factor(
        self, model_id: str, factor: float | None, *, audit: AuditDraft | None = None
    ) -> ModelSetting:
        """Sets the model's cost factor (finite and > 0, else ``ValueError``), or with ``None``
        clears it (the gateway measures it again)."""
        setting = ModelSetting(model_id, checked_cost_factor(factor))

        async def work(db: Connection) -> ModelSetting:
            async with db.transaction():
                row = await _lock_or_insert(
                    db,
                    "SELECT cost_factor FROM model_settings WHERE model_id = %s",
                    (model_id,),
                    "INSERT INTO model_settings (model_id, cost_factor) VALUES (%s, %s)",
                    (setting.model_id, setting.cost_factor),
                )
                if row is not None:
                    await db.execute(
                        "UPDATE model_settings SET cost_factor = %s WHERE model_id = %s",
                        (setting.cost_factor, model_id),
                    )
                before = ModelSetting(model_id, None if row is None else row[0])
                await _audit(db, audit, before, setting)
            return setting

        return await self._run("set_cost_factor", work)


async def _migrate(db: Connection) -> None:
    """Applies the missing migrations, one transaction each, every one under the advisory lock:
    a replica that waited for another's migration finds the version moved on and skips it."""
    where = f"database {db.info.dbname!r} on {db.info.host}:{db.info.port}"  # no password
    while True:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            await db.execute(_VERSION_TABLE)
            cursor = await db.execute("SELECT version FROM schema_version WHERE id = 1")
            row = await cursor.fetchone()
            version = 0 if row is None else int(row[0])
            if version > len(MIGRATIONS):
                raise SchemaTooNew(
                    f"PostgreSQL {where} has schema version {version}, but this fairgate knows "
                    f"versions up to {len(MIGRATIONS)}: upgrade fairgate, or point it at "
                    "another database"
                )
            if version == len(MIGRATIONS):
                return
            await db.execute(MIGRATIONS[version])
            await db.execute(
                "INSERT INTO schema_version (id, version) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                (version + 1,),
            )
        logger.info("migrated %s to schema version %d", where, version + 1)


async def _find_tenant(db: Connection, ref: str, *, lock: RowLock = "") -> Tenant:
    """The tenant with id (or else name) ``ref``, its row locked with ``lock`` until the
    transaction ends. A row deleted by a transaction that committed while this one waited for
    the lock is not found (READ COMMITTED reads its latest version)."""
    # An id match wins over a name match (a name may look like another tenant's id).
    cursor = await db.execute(
        f"SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = %s OR name = %s"
        f" ORDER BY tenant_id = %s DESC LIMIT 1 {lock}",
        (ref, ref, ref),
    )
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"tenant {ref!r} not found")
    return tenant_from_row(row)


async def _find_key(db: Connection, key_id: str, *, lock: RowLock = "") -> ApiKey:
    """The key with this id, its row locked with ``lock`` until the transaction ends."""
    cursor = await db.execute(
        f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = %s {lock}", (key_id,)
    )
    row = await cursor.fetchone()
    if row is None:
        raise NotFound(f"API key {key_id!r} not found")
    return api_key_from_row(row)


async def _lock_or_insert(
    db: Connection,
    select: str,
    key: tuple[Any, ...],
    insert: str,
    values: tuple[Any, ...],
) -> tuple[Any, ...] | None:
    """The row ``select`` finds by ``key``, locked (FOR UPDATE) until the transaction ends; or,
    where there is none, ``None`` once ``insert`` has inserted ``values`` (the caller then has
    nothing to update). Each statement reads the latest committed rows: an insert that meets a
    row inserted meanwhile (committed, or in flight: it waits for that one) changes nothing, and
    the next round locks that row (the call's timeout bounds the rounds)."""
    while True:
        cursor = await db.execute(select + " FOR UPDATE", key)
        row = await cursor.fetchone()
        if row is not None:
            return row
        cursor = await db.execute(insert + " ON CONFLICT DO NOTHING", values)
        if cursor.rowcount > 0:
            return None


async def _audit(
    db: Connection, audit: AuditDraft | None, before: Audited | None, after: Audited | None
) -> None:
    """Writes the change's record, when it is audited, in the change's transaction."""
    if audit is not None:
        await _insert_audit(db, audit.record(before, after), AUDIT_FAILED)


async def _insert_audit(db: Connection, record: AuditRecord, message: str) -> None:
    try:
        await db.execute(_INSERT_AUDIT, audit_values(record))
    except psycopg.OperationalError:
        raise  # the server is gone: StoreUnavailable (``_run``)
    except psycopg.Error as exc:
        logger.warning("tenant store: the audit record of %s failed: %s", record.action, exc)
        raise AuditWriteFailed(message) from exc


@contextlib.contextmanager
def _name_conflict(name: str) -> Iterator[None]:
    """The unique violation of the tenants' names as ``Conflict``: decided by the constraint,
    not by a check before the write, so that two replicas taking one name at once cannot both
    succeed."""
    try:
        yield
    except errors.UniqueViolation as exc:
        if exc.diag.constraint_name == NAME_CONSTRAINT:
            raise Conflict(f"a tenant named {name!r} already exists") from exc
        raise


def _unavailable(
    operation: str, exc: BaseException, timeout_s: float, message: str = CALL_FAILED
) -> StoreUnavailable:
    # The driver's text names the server's address: it goes to the log, not to the tenant.
    if isinstance(exc, TimeoutError):
        logger.warning("tenant store: %s did not finish within %g s", operation, timeout_s)
    else:
        logger.warning("tenant store: %s failed: %s", operation, exc)
    return StoreUnavailable(message)
