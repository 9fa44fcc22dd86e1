"""Which tenant store a gateway opens: ``open_store`` reads the ``[store]`` section (``url`` empty:
``SQLiteStore`` at ``path``, the embedded default; ``postgresql://…``: ``PostgresStore``, which
several replicas share). ``GatewayStore`` is what the gateway needs of either: the
``TenantStore`` interface and the budget lookup its quotas read. Torch-free.
"""

from __future__ import annotations

from typing import Protocol

import psycopg

from gateway.config import ConfigError, StoreSection
from gateway.store import SQLiteStore
from gateway.store_postgres import PostgresStore
from gateway.tenants import BudgetPeriod, TenantStore

__all__ = ["POSTGRES_SCHEMES", "GatewayStore", "open_store"]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # the URI forms libpq accepts


class GatewayStore(TenantStore, Protocol):
    """A ``TenantStore`` that also answers a tenant's tokens in one budget period
    (``gateway.quotas.BudgetUsage``)."""

    async def total_tokens(
        self,
        tenant_id: str,
        kind: BudgetPeriod,
        period: str,
        *,
        model_id: str = "",
        key_id: str = "",
    ) -> int: ...


async def open_store(config: StoreSection) -> GatewayStore:
    """The store the section names, opened and migrated. ``ConfigError`` for a ``url`` that is
    not a PostgreSQL URL (the message never repeats the URL: it may hold a password)."""
    url = config.url.strip()
    if not url:
        return await SQLiteStore.open(config.path)
    if not url.startswith(POSTGRES_SCHEMES):
        scheme = url.split("://", 1)[0] + "://" if "://" in url else "no scheme"
        raise ConfigError(
            f"store.url: expected a postgresql:// URL (or empty for SQLite at store.path), got "
            f"{scheme}"
        )
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # libpq's message quotes the part it could not parse, which may be the password.
        raise ConfigError("store.url: not a valid PostgreSQL URL") from None
    return await PostgresStore.open(url)
