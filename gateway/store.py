"""``SQLiteStore``: tenants, API keys, the usage ledger (per tenant, per model and per key), the
models' aliases and settings, and the audit log of admin changes in one SQLite file
(``TenantStore``).

Threading: SQLite allows one writer at a time, and the stdlib ``sqlite3`` module blocks. So the
store owns ONE connection, opened, used and closed by ONE dedicated thread (a single-worker
``ThreadPoolExecutor``); every coroutine hands its work to that thread with
``loop.run_in_executor`` and awaits it. The event loop never waits on disk or on a lock, and the
writes are serialized by the thread's queue instead of contending for SQLite's write lock (no
``SQLITE_BUSY`` between our own calls). Each unit of work that writes is one transaction, and
an admin change's audit record (``audit=``, ``gateway.audit``) is written in it.

Schema: ``MIGRATIONS[i]`` moves the schema from version ``i`` to ``i + 1``; the version lives in
``PRAGMA user_version``. ``open`` applies the missing ones, each in its own transaction, and
refuses (``SchemaTooNew``) a file written by a newer fairgate. Migrations are only appended.

Keys: the secret is shown once (``CreatedKey``) and stored only as its SHA-256. What this store
shares with ``PostgresStore`` (ids, keys, row conversion, usage sums) is in
``gateway.store_common``. Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

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

__all__ = ["BUSY_TIMEOUT_MS", "MIGRATIONS", "SQLiteStore", "SchemaTooNew"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5_000  # another process (e.g. a backup) holding the lock: wait this long

MIGRATIONS: list[str] = [
    # 0 -> 1: tenants, their keys, their usage per day and per month.
    """
    CREATE TABLE tenants (
        tenant_id       TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        weight          REAL NOT NULL,
        default_class   TEXT NOT NULL,
        allowed_classes TEXT NOT NULL,  -- JSON list of class names
        quotas          TEXT NOT NULL,  -- JSON of gateway.tenants.Quotas
        over_quota      TEXT NOT NULL CHECK (over_quota IN ('reject', 'demote')),
        created_at      REAL NOT NULL
    );
    CREATE TABLE api_keys (
        key_id     TEXT PRIMARY KEY,
        tenant_id  TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        key_hash   TEXT NOT NULL UNIQUE,  -- SHA-256 hex of the secret; the secret is not kept
        prefix     TEXT NOT NULL,
        name       TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX api_keys_prefix ON api_keys (prefix);
    CREATE INDEX api_keys_tenant ON api_keys (tenant_id);
    CREATE TABLE usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        period_kind       TEXT NOT NULL CHECK (period_kind IN ('day', 'month')),
        period            TEXT NOT NULL,  -- YYYY-MM-DD or YYYY-MM (UTC)
        requests          INTEGER NOT NULL DEFAULT 0,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        cached_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
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
    ALTER TABLE usage ADD COLUMN units REAL NOT NULL DEFAULT 0;
    CREATE TABLE model_aliases (
        alias      TEXT PRIMARY KEY,
        model_id   TEXT NOT NULL,  -- a model id, which need not have a worker yet
        updated_at REAL NOT NULL
    );
    CREATE TABLE model_settings (
        model_id    TEXT PRIMARY KEY,
        cost_factor REAL  -- NULL: measured
    );
    CREATE TABLE model_usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        period_kind       TEXT NOT NULL CHECK (period_kind IN ('day', 'month')),
        period            TEXT NOT NULL,  -- YYYY-MM-DD or YYYY-MM (UTC)
        model_id          TEXT NOT NULL,
        requests          INTEGER NOT NULL DEFAULT 0,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        cached_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        units             REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, period_kind, period, model_id)
    );
    """,
    # 2 -> 3: keys' own limits and expiry; usage per key; the audit log of admin changes (kept
    # when its tenant is deleted: no reference to tenants).
    """
    ALTER TABLE api_keys ADD COLUMN quotas TEXT NOT NULL DEFAULT '{}';  -- JSON of Quotas
    ALTER TABLE api_keys ADD COLUMN expires_at REAL;  -- NULL: never
    CREATE TABLE key_usage (
        tenant_id         TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        period_kind       TEXT NOT NULL CHECK (period_kind IN ('day', 'month')),
        period            TEXT NOT NULL,  -- YYYY-MM-DD or YYYY-MM (UTC)
        key_id            TEXT NOT NULL REFERENCES api_keys (key_id) ON DELETE CASCADE,
        requests          INTEGER NOT NULL DEFAULT 0,
        prompt_tokens     INTEGER NOT NULL DEFAULT 0,
        cached_tokens     INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        units             REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, period_kind, period)
    );
    CREATE INDEX key_usage_tenant ON key_usage (tenant_id);
    CREATE TABLE audit_log (
        audit_id  TEXT PRIMARY KEY,
        at        REAL NOT NULL,
        actor     TEXT NOT NULL,  -- e.g. admin-token:3f9a1c2b, never the credential
        action    TEXT NOT NULL,
        target    TEXT NOT NULL,
        tenant_id TEXT NOT NULL,  -- '' for none
        before    TEXT,           -- JSON object; NULL: it did not exist
        after     TEXT            -- JSON object; NULL: it is gone
    );
    CREATE INDEX audit_log_at ON audit_log (at);
    CREATE INDEX audit_log_tenant ON audit_log (tenant_id, at);
    """,
]

# Adds a batch's sums to the ledger rows, (tenant, kind, period[, model]) then the five sums.
_ADD_SUMS = (
    " DO UPDATE SET requests = requests + excluded.requests,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " cached_tokens = cached_tokens + excluded.cached_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " units = units + excluded.units"
)
_ADD_USAGE = (
    f"INSERT INTO usage (tenant_id, period_kind, {USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    f" ON CONFLICT (tenant_id, period_kind, period){_ADD_SUMS}"
)
_ADD_MODEL_USAGE = (
    f"INSERT INTO model_usage ({MODEL_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    f" ON CONFLICT (tenant_id, period_kind, period, model_id){_ADD_SUMS}"
)
_ADD_KEY_USAGE = (
    "INSERT INTO key_usage (tenant_id, period_kind, period, key_id, requests, prompt_tokens,"
    " cached_tokens, completion_tokens, units) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    f" ON CONFLICT (key_id, period_kind, period){_ADD_SUMS}"
)
_KEY_MARKS = ", ".join("?" * len(KEY_COLUMNS.split(", ")))
_INSERT_AUDIT = f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


class SQLiteStore:
    """``TenantStore`` on one SQLite file. Build it with ``await SQLiteStore.open(path)``; every
    method is safe to call from any task on the loop that opened it; ``close`` ends it."""

    def __init__(self, executor: ThreadPoolExecutor, connection: sqlite3.Connection) -> None:
        self._executor = executor
        self._connection = connection  # touched only on the executor's thread
        self._closed = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SQLiteStore:
        """Opens (creating it and its directory if needed) and migrates the database at ``path``."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fairgate-store")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(executor, _connect, Path(path))
        except BaseException:
            executor.shutdown(wait=True)
            raise
        return cls(executor, connection)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connection.close)
        self._executor.shutdown(wait=True)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the tenant store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, work, self._connection)

    # Tenants

    async def create_tenant(self, spec: TenantSpec, *, audit: AuditDraft | None = None) -> Tenant:
        tenant = new_tenant(spec)

        def work(db: sqlite3.Connection) -> Tenant:
            with _transaction(db):
                _check_name_free(db, tenant.name, tenant.tenant_id)
                db.execute(
                    f"INSERT INTO tenants ({TENANT_COLUMNS}) VALUES"
                    " (:tenant_id, :name, :weight, :default_class, :allowed_classes, :quotas,"
                    " :over_quota, :created_at, :allowed_models, :model_quotas)",
                    tenant_values(tenant),
                )
                _audit(db, audit, None, tenant)
            return tenant

        return await self._run(work)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        """The tenant with this id or, failing that, this name."""
        return await self._run(lambda db: _find_tenant(db, tenant_id))

    async def list_tenants(self) -> list[Tenant]:
        def work(db: sqlite3.Connection) -> list[Tenant]:
            rows = db.execute(f"SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at, rowid")
            return [tenant_from_row(row) for row in rows]

        return await self._run(work)

    async def update_tenant(
        self, tenant_id: str, patch: TenantPatch, *, audit: AuditDraft | None = None
    ) -> Tenant:
        """Applies ``patch`` to the tenant with this id or name; unset fields stay."""

        def work(db: sqlite3.Connection) -> Tenant:
            with _transaction(db):
                current = _find_tenant(db, tenant_id)
                updated = patched_tenant(current, patch)
                if updated.name != current.name:
                    _check_name_free(db, updated.name, current.tenant_id)
                db.execute(
                    "UPDATE tenants SET name = :name, weight = :weight,"
                    " default_class = :default_class, allowed_classes = :allowed_classes,"
                    " quotas = :quotas, over_quota = :over_quota,"
                    " allowed_models = :allowed_models, model_quotas = :model_quotas"
                    " WHERE tenant_id = :tenant_id",
                    tenant_values(updated),
                )
                _audit(db, audit, current, updated)
            return updated

        return await self._run(work)

    async def delete_tenant(self, tenant_id: str, *, audit: AuditDraft | None = None) -> Tenant:
        """Deletes the tenant with this id or name, its keys and its usage (by cascade); the
        tenant as it was."""

        def work(db: sqlite3.Connection) -> Tenant:
            with _transaction(db):
                tenant = _find_tenant(db, tenant_id)
                db.execute("DELETE FROM tenants WHERE tenant_id = ?", (tenant.tenant_id,))
                _audit(db, audit, tenant, None)
            return tenant

        return await self._run(work)

    # Keys

    async def create_key(
        self, tenant_id: str, spec: KeySpec, *, audit: AuditDraft | None = None
    ) -> CreatedKey:
        """A new key for the tenant with this id or name; the secret is returned only here."""
        secret = new_secret()
        key_hash = hash_secret(secret)

        def work(db: sqlite3.Connection) -> CreatedKey:
            with _transaction(db):
                key = new_api_key(_find_tenant(db, tenant_id).tenant_id, secret, spec)
                db.execute(
                    f"INSERT INTO api_keys (key_hash, {KEY_COLUMNS}) VALUES (?, {_KEY_MARKS})",
                    (key_hash, *key_values(key)),
                )
                _audit(db, audit, None, key)
            return CreatedKey(key=key, secret=secret)

        return await self._run(work)

    async def list_keys(
        self, *, tenant_id: str | None = None, prefix: str | None = None
    ) -> list[ApiKey]:
        """Keys, oldest first: of one tenant (by id or name), whose display prefix starts with
        ``prefix``, or both."""

        def work(db: sqlite3.Connection) -> list[ApiKey]:
            clauses: list[str] = []
            params: list[Any] = []
            if tenant_id is not None:
                clauses.append("tenant_id = ?")
                params.append(_find_tenant(db, tenant_id).tenant_id)
            if prefix is not None:
                # substr, not LIKE: '_' and '%' occur in url-safe secrets' prefixes.
                clauses.append("substr(prefix, 1, ?) = ?")
                params += [len(prefix), prefix]
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys {where} ORDER BY created_at, rowid", params
            )
            return [api_key_from_row(row) for row in rows]

        return await self._run(work)

    async def get_key(self, key_id: str) -> ApiKey:
        return await self._run(lambda db: _find_key(db, key_id))

    async def update_key(
        self, key_id: str, patch: KeyPatch, *, audit: AuditDraft | None = None
    ) -> ApiKey:
        """Applies ``patch`` to the key; unset fields stay. A revoked key stays revoked."""

        def work(db: sqlite3.Connection) -> ApiKey:
            with _transaction(db):
                current = _find_key(db, key_id)
                updated = patched_key(current, patch)
                db.execute(
                    "UPDATE api_keys SET name = ?, quotas = ?, expires_at = ? WHERE key_id = ?",
                    (
                        updated.name,
                        msgspec.json.encode(updated.quotas).decode(),
                        updated.expires_at,
                        key_id,
                    ),
                )
                _audit(db, audit, current, updated)
            return updated

        return await self._run(work)

    async def revoke_key(self, key_id: str, *, audit: AuditDraft | None = None) -> ApiKey:
        """Revokes the key; revoking it again keeps the first ``revoked_at``."""

        def work(db: sqlite3.Connection) -> ApiKey:
            with _transaction(db):
                current = _find_key(db, key_id)
                db.execute(
                    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, ?) WHERE key_id = ?",
                    (time.time(), key_id),
                )
                revoked = _find_key(db, key_id)
                _audit(db, audit, current, revoked)
            return revoked

        return await self._run(work)

    async def find_key(self, secret: str) -> tuple[ApiKey, Tenant] | None:
        """The key whose secret this is (revoked keys included) and its tenant, or None."""
        digest = hash_secret(secret)

        def work(db: sqlite3.Connection) -> tuple[ApiKey, Tenant] | None:
            row = db.execute(
                f"SELECT {KEY_COLUMNS}, key_hash FROM api_keys WHERE key_hash = ?", (digest,)
            ).fetchone()
            if row is None or not hashes_match(row[-1], digest):
                return None
            key = api_key_from_row(row[:-1])
            return key, _find_tenant(db, key.tenant_id)

        return await self._run(work)

    # Usage

    async def record_usage(self, deltas: list[UsageDelta]) -> None:
        """Adds each delta to its tenant's day and month rows and, when it names a model or a
        key, to the tenant's rows of that model and the key's rows, all in one transaction.
        Deltas of a tenant deleted meanwhile are skipped: its ledger went with it, so they have
        nowhere to go (and failing the whole batch would lose the other tenants' usage); so is
        the key part of a delta whose key is not the tenant's."""

        def work(db: sqlite3.Connection) -> None:
            totals = usage_totals(deltas)
            model_totals = model_usage_totals(deltas)
            key_totals = key_usage_totals(deltas)
            with _transaction(db):
                tenant_ids = {tenant_id for tenant_id, _, _ in totals}
                marks = ", ".join("?" * len(tenant_ids))
                known = {
                    row[0]
                    for row in db.execute(
                        f"SELECT tenant_id FROM tenants WHERE tenant_id IN ({marks})",
                        list(tenant_ids),
                    )
                }
                db.executemany(
                    _ADD_USAGE,
                    [(*key, *sums) for key, sums in totals.items() if key[0] in known],
                )
                db.executemany(
                    _ADD_MODEL_USAGE,
                    [(*key, *sums) for key, sums in model_totals.items() if key[0] in known],
                )
                key_ids = {key_id for _, _, _, key_id in key_totals}
                marks = ", ".join("?" * len(key_ids))
                known_keys = set(
                    db.execute(
                        f"SELECT tenant_id, key_id FROM api_keys WHERE key_id IN ({marks})",
                        list(key_ids),
                    ).fetchall()
                )
                db.executemany(
                    _ADD_KEY_USAGE,
                    [
                        (*key, *sums)
                        for key, sums in key_totals.items()
                        if (key[0], key[3]) in known_keys
                    ],
                )

        if deltas:
            await self._run(work)

    async def usage(
        self, tenant_id: str, kind: BudgetPeriod, *, period: str | None = None
    ) -> list[Usage]:
        """The tenant's (by id or name) usage per ``kind``, newest first; with ``period``, exactly
        that period's row (zeros when nothing was recorded)."""

        def work(db: sqlite3.Connection) -> list[Usage]:
            found = _find_tenant(db, tenant_id).tenant_id
            query = f"SELECT {USAGE_COLUMNS} FROM usage WHERE tenant_id = ? AND period_kind = ?"
            params: list[Any] = [found, kind]
            if period is not None:
                query += " AND period = ?"
                params.append(period)
            rows = db.execute(query + " ORDER BY period DESC", params).fetchall()
            if period is not None and not rows:
                rows = [(period, 0, 0, 0, 0, 0.0)]
            return [Usage(found, *row) for row in rows]

        return await self._run(work)

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

        def work(db: sqlite3.Connection) -> list[ModelUsage]:
            found = _find_tenant(db, tenant_id).tenant_id
            query = (
                f"SELECT {MODEL_USAGE_COLUMNS} FROM model_usage"
                " WHERE tenant_id = ? AND period_kind = ?"
            )
            params: list[Any] = [found, kind]
            if period is not None:
                query += " AND period = ?"
                params.append(period)
            if model_id is not None:
                query += " AND model_id = ?"
                params.append(model_id)
            rows = db.execute(query + " ORDER BY period DESC, model_id", params)
            return [model_usage_from_row(row) for row in rows]

        return await self._run(work)

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

        def work(db: sqlite3.Connection) -> int:
            if key_id:
                row = db.execute(
                    "SELECT prompt_tokens + completion_tokens FROM key_usage"
                    " WHERE tenant_id = ? AND period_kind = ? AND period = ? AND key_id = ?",
                    (tenant_id, kind, period, key_id),
                ).fetchone()
            elif model_id:
                row = db.execute(
                    "SELECT prompt_tokens + completion_tokens FROM model_usage"
                    " WHERE tenant_id = ? AND period_kind = ? AND period = ? AND model_id = ?",
                    (tenant_id, kind, period, model_id),
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT prompt_tokens + completion_tokens FROM usage"
                    " WHERE tenant_id = ? AND period_kind = ? AND period = ?",
                    (tenant_id, kind, period),
                ).fetchone()
            return 0 if row is None else int(row[0])

        return await self._run(work)

    # Audit

    async def record_audit(self, record: AuditRecord) -> None:
        """Appends a record to the audit log, on its own (``TenantStore.record_audit``)."""

        def work(db: sqlite3.Connection) -> None:
            with _transaction(db):
                _insert_audit(db, record, RECORD_FAILED)

        await self._run(work)

    async def list_audit(
        self, *, since: float | None = None, tenant_id: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """The audit log, newest first: records at or after ``since``, of one tenant (by id)
        when given, at most ``limit``."""

        def work(db: sqlite3.Connection) -> list[AuditRecord]:
            clauses: list[str] = []
            params: list[Any] = []
            if since is not None:
                clauses.append("at >= ?")
                params.append(since)
            if tenant_id is not None:
                clauses.append("tenant_id = ?")
                params.append(tenant_id)
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            rows = db.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit_log {where}"
                " ORDER BY at DESC, rowid DESC LIMIT ?",
                [*params, max(0, limit)],
            )
            return [audit_from_row(row) for row in rows]

        return await self._run(work)

    # Models

    async def list_aliases(self) -> list[ModelAlias]:
        """Every alias, by name."""

        def work(db: sqlite3.Connection) -> list[ModelAlias]:
            rows = db.execute(
                "SELECT alias, model_id, updated_at FROM model_aliases ORDER BY alias"
            )
            return [ModelAlias(*row) for row in rows]

        return await self._run(work)

    async def set_alias(
        self, alias: str, model_id: str, *, audit: AuditDraft | None = None
    ) -> tuple[ModelAlias, bool]:
        """Points ``alias`` at ``model_id``: the alias as stored, and whether it is new."""
        stored = ModelAlias(alias, model_id, time.time())

        def work(db: sqlite3.Connection) -> tuple[ModelAlias, bool]:
            with _transaction(db):
                current = _find_alias(db, alias)
                db.execute(
                    "INSERT INTO model_aliases (alias, model_id, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (alias) DO UPDATE SET model_id = excluded.model_id,"
                    " updated_at = excluded.updated_at",
                    msgspec.structs.astuple(stored),
                )
                _audit(db, audit, current, stored)
            return stored, current is None

        return await self._run(work)

    async def delete_alias(self, alias: str, *, audit: AuditDraft | None = None) -> bool:
        """Deletes the alias; False when there was none (and no record is written)."""

        def work(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                current = _find_alias(db, alias)
                if current is None:
                    return False
                db.execute("DELETE FROM model_aliases WHERE alias = ?", (alias,))
                _audit(db, audit, current, None)
            return True

        return await self._run(work)

    async def list_model_settings(self) -> list[ModelSetting]:
        """Every model an admin set something for, by id."""

        def work(db: sqlite3.Connection) -> list[ModelSetting]:
            rows = db.execute("SELECT model_id, cost_factor FROM model_settings ORDER BY model_id")
            return [ModelSetting(*row) for row in rows]

        return await self._run(work)

    async def set_cost_factor(
        self, model_id: str, factor: float | None, *, audit: AuditDraft | None = None
    ) -> ModelSetting:
        """Sets the model's cost factor (finite and > 0, else ``ValueError``), or with ``None``
        clears it (the gateway measures it again)."""
        setting = ModelSetting(model_id, checked_cost_factor(factor))

        def work(db: sqlite3.Connection) -> ModelSetting:
            with _transaction(db):
                row = db.execute(
                    "SELECT cost_factor FROM model_settings WHERE model_id = ?", (model_id,)
                ).fetchone()
                db.execute(
                    "INSERT INTO model_settings (model_id, cost_factor) VALUES (?, ?)"
                    " ON CONFLICT (model_id) DO UPDATE SET cost_factor = excluded.cost_factor",
                    (setting.model_id, setting.cost_factor),
                )
                _audit(db, audit, ModelSetting(model_id, None if row is None else row[0]), setting)
            return setting

        return await self._run(work)


def _connect(path: Path) -> sqlite3.Connection:
    """Runs on the store's thread: opens, configures and migrates the database. A new database
    is created readable by its owner only (it holds key hashes and usage); SQLite gives its WAL
    and shared-memory files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # isolation_level=None: no implicit transactions; ``_transaction`` says where they are.
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise SchemaTooNew(
            f"{path} has schema version {version}, but this fairgate knows versions up to "
            f"{len(MIGRATIONS)}: upgrade fairgate, or point it at another database"
        )
    for index in range(version, len(MIGRATIONS)):
        # executescript commits any open transaction first, so the script opens its own; the
        # version is bumped inside it, so a failed migration leaves the old version behind.
        try:
            db.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[index]}; PRAGMA user_version = {index + 1}; COMMIT;"
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        logger.info("migrated %s to schema version %d", path, index + 1)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a read-then-write cannot be raced.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _find_tenant(db: sqlite3.Connection, ref: str) -> Tenant:
    # An id match wins over a name match (a name may look like another tenant's id).
    row = db.execute(
        f"SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant_id = ? OR name = ?"
        " ORDER BY tenant_id = ? DESC LIMIT 1",
        (ref, ref, ref),
    ).fetchone()
    if row is None:
        raise NotFound(f"tenant {ref!r} not found")
    return tenant_from_row(row)


def _find_key(db: sqlite3.Connection, key_id: str) -> ApiKey:
    row = db.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
    if row is None:
        raise NotFound(f"API key {key_id!r} not found")
    return api_key_from_row(row)


def _find_alias(db: sqlite3.Connection, alias: str) -> ModelAlias | None:
    row = db.execute(
        "SELECT alias, model_id, updated_at FROM model_aliases WHERE alias = ?", (alias,)
    ).fetchone()
    return None if row is None else ModelAlias(*row)


def _audit(
    db: sqlite3.Connection,
    audit: AuditDraft | None,
    before: Audited | None,
    after: Audited | None,
) -> None:
    """Writes the change's record, when it is audited, in the change's transaction."""
    if audit is not None:
        _insert_audit(db, audit.record(before, after), AUDIT_FAILED)


def _insert_audit(db: sqlite3.Connection, record: AuditRecord, message: str) -> None:
    try:
        db.execute(_INSERT_AUDIT, audit_values(record))
    except sqlite3.Error as exc:
        logger.warning("tenant store: the audit record of %s failed: %s", record.action, exc)
        raise AuditWriteFailed(message) from exc


def _check_name_free(db: sqlite3.Connection, name: str, tenant_id: str) -> None:
    row = db.execute(
        "SELECT 1 FROM tenants WHERE name = ? AND tenant_id != ?", (name, tenant_id)
    ).fetchone()
    if row is not None:
        raise Conflict(f"a tenant named {name!r} already exists")
