"""The tenant stores and several models, on both backends (an SQLite file and a PostgreSQL server
of the session's own, as in ``test_store.py``, whose fixtures these tests share): a tenant's
allowed models and quotas per model, usage in cost units and per model, aliases, cost factors, a
database of schema version 1 migrated to 2, and, for PostgreSQL, replicas doing these at once."""

from __future__ import annotations

import asyncio
import math

import msgspec
import pytest

from gateway.errors import NotFound
from gateway.store import SQLiteStore
from gateway.store_common import DISPLAY_PREFIX_LEN, hash_secret, new_secret
from gateway.store_postgres import PostgresStore
from gateway.stores import GatewayStore
from gateway.tenants import (
    ApiKey,
    BudgetPeriod,
    KeySpec,
    ModelSetting,
    ModelUsage,
    Quotas,
    Tenant,
    TenantPatch,
    TenantSpec,
    Usage,
    UsageDelta,
)
from tests.gateway.test_store import FEB_1, JAN_15, JAN_16, NEW_TABLES, Backend
from tests.gateway.test_store import backend as backend
from tests.gateway.test_store import db_path as db_path
from tests.gateway.test_store import store as store
from tests.postgres import postgres_server as postgres_server
from tests.postgres import postgres_url as postgres_url


async def test_allowed_models_and_model_quotas_round_trip(backend: Backend) -> None:
    small = Quotas(requests_per_minute=5)
    big = Quotas(token_budget=1000, budget_period="day")
    first = await backend.open()
    try:
        acme = await first.create_tenant(
            TenantSpec(
                name="acme",
                allowed_models=["llama-8b", "fast", "llama-8b"],  # kept once, in order
                model_quotas={"llama-8b": small},
            )
        )
        assert (acme.allowed_models, acme.model_quotas) == (
            ["llama-8b", "fast"],
            {"llama-8b": small},
        )
        plain = await first.create_tenant(TenantSpec(name="plain"))
        assert (plain.allowed_models, plain.model_quotas) == ([], {})
        assert await first.get_tenant("acme") == acme

        # Each field replaces the whole set; one left out stays as it is.
        moved = await first.update_tenant(
            "acme", TenantPatch(allowed_models=["qwen-7b", "qwen-7b", "fast"])
        )
        assert (moved.allowed_models, moved.model_quotas) == (
            ["qwen-7b", "fast"],
            {"llama-8b": small},
        )
        requoted = await first.update_tenant(
            acme.tenant_id, TenantPatch(model_quotas={"qwen-7b": big, "fast": small})
        )
        assert (requoted.allowed_models, requoted.model_quotas) == (
            ["qwen-7b", "fast"],
            {"qwen-7b": big, "fast": small},
        )
        created = await first.create_key("acme", KeySpec())
    finally:
        await first.close()

    second = await backend.open()
    try:
        assert await second.list_tenants() == [requoted, plain]
        assert await second.find_key(created.secret) == (created.key, requoted)
    finally:
        await second.close()


async def test_record_usage_sums_units_and_per_model_rows(store: GatewayStore) -> None:
    tid = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    # Units in binary fractions, so that their sums are exact in any order.
    await store.record_usage(
        [
            UsageDelta(tid, JAN_15, prompt_tokens=10, cached_tokens=4, completion_tokens=20,
                       model_id="llama", units=7.5),
            UsageDelta(tid, JAN_15 + 60, prompt_tokens=1, completion_tokens=2, model_id="llama",
                       units=0.75),
            UsageDelta(tid, JAN_16, requests=2, prompt_tokens=100, completion_tokens=200,
                       model_id="qwen", units=150.0),
            # No model named: the tenant's rows only.
            UsageDelta(tid, JAN_16, prompt_tokens=1000, completion_tokens=1000, units=2.0),
        ]
    )  # fmt: skip
    await store.record_usage(
        [UsageDelta(tid, FEB_1, prompt_tokens=7, completion_tokens=8, model_id="llama", units=3.0)]
    )

    assert await store.usage("acme", "day") == [
        Usage(tid, "2025-02-01", 1, 7, 0, 8, 3.0),
        Usage(tid, "2025-01-16", 3, 1100, 0, 1200, 152.0),
        Usage(tid, "2025-01-15", 2, 11, 4, 22, 8.25),
    ]
    assert await store.usage(tid, "month") == [
        Usage(tid, "2025-02", 1, 7, 0, 8, 3.0),
        Usage(tid, "2025-01", 5, 1111, 4, 1222, 160.25),
    ]
    assert await store.usage("acme", "month", period="2024-12") == [
        Usage(tid, "2024-12", 0, 0, 0, 0, 0.0)
    ]

    jan_llama = ModelUsage(tid, "month", "2025-01", "llama", 2, 11, 4, 22, 8.25)
    jan_qwen = ModelUsage(tid, "month", "2025-01", "qwen", 2, 100, 0, 200, 150.0)
    feb_llama = ModelUsage(tid, "month", "2025-02", "llama", 1, 7, 0, 8, 3.0)
    assert await store.model_usage("acme", "month") == [feb_llama, jan_llama, jan_qwen]
    assert await store.model_usage(tid, "month", period="2025-01") == [jan_llama, jan_qwen]
    assert await store.model_usage(tid, "month", model_id="llama") == [feb_llama, jan_llama]
    assert await store.model_usage(tid, "month", period="2025-01", model_id="qwen") == [jan_qwen]
    assert await store.model_usage(tid, "month", period="2024-12") == []
    assert await store.model_usage(tid, "month", model_id="") == []  # no "no model" rows
    assert await store.model_usage(tid, "day") == [
        ModelUsage(tid, "day", "2025-02-01", "llama", 1, 7, 0, 8, 3.0),
        ModelUsage(tid, "day", "2025-01-16", "qwen", 2, 100, 0, 200, 150.0),
        ModelUsage(tid, "day", "2025-01-15", "llama", 2, 11, 4, 22, 8.25),
    ]
    with pytest.raises(NotFound, match="nobody"):
        await store.model_usage("nobody", "day")

    assert await store.total_tokens(tid, "month", "2025-01") == 2333
    # Both stores answer a model's tokens (gateway.quotas.ModelBudgetUsage); GatewayStore's
    # own signature does not say so.
    assert isinstance(store, SQLiteStore | PostgresStore)
    assert await store.total_tokens(tid, "month", "2025-01", model_id="llama") == 33
    assert await store.total_tokens(tid, "day", "2025-01-16", model_id="qwen") == 300
    assert await store.total_tokens(tid, "day", "2025-01-16", model_id="llama") == 0
    assert await store.total_tokens(tid, "day", "2025-01-17", model_id="qwen") == 0


async def test_units_that_are_not_finite_count_as_none(store: GatewayStore) -> None:
    """A NaN would poison the rows for good (and SQLite refuses it, failing every retry)."""
    tid = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    await store.record_usage(
        [
            UsageDelta(tid, JAN_15, prompt_tokens=1, model_id="llama", units=math.nan),
            UsageDelta(tid, JAN_15, prompt_tokens=1, model_id="llama", units=math.inf),
            UsageDelta(tid, JAN_15, prompt_tokens=1, model_id="llama", units=1.5),
        ]
    )
    assert await store.usage(tid, "day") == [Usage(tid, "2025-01-15", 3, 3, 0, 0, 1.5)]
    [row] = await store.model_usage(tid, "day")
    assert (row.requests, row.units) == (3, 1.5)


async def test_concurrent_record_usage_sums_model_rows_exactly(store: GatewayStore) -> None:
    tid = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    models = ("llama", "qwen")
    batches = [
        [
            UsageDelta(tid, JAN_15 + i, prompt_tokens=i, completion_tokens=1, model_id=model,
                       units=0.25)
            for model in (models if i % 2 else models[::-1])
            for _ in range(3)
        ]
        for i in range(50)
    ]  # fmt: skip
    await asyncio.gather(*(store.record_usage(batch) for batch in batches))
    prompt = 3 * sum(range(50))
    periods: list[tuple[BudgetPeriod, str]] = [("day", "2025-01-15"), ("month", "2025-01")]
    for kind, period in periods:
        assert await store.usage(tid, kind) == [Usage(tid, period, 300, 2 * prompt, 0, 300, 75.0)]
        assert await store.model_usage(tid, kind) == [
            ModelUsage(tid, kind, period, model, 150, prompt, 0, 150, 37.5) for model in models
        ]


async def test_deleting_a_tenant_deletes_its_model_usage(
    store: GatewayStore, backend: Backend
) -> None:
    acme = (await store.create_tenant(TenantSpec(name="acme"))).tenant_id
    beta = (await store.create_tenant(TenantSpec(name="beta"))).tenant_id
    await store.record_usage(
        [
            UsageDelta(acme, JAN_15, prompt_tokens=5, model_id="llama", units=5.0),
            UsageDelta(beta, JAN_15, prompt_tokens=6, model_id="llama", units=6.0),
        ]
    )
    await store.delete_tenant("acme")
    count = "SELECT count(*) FROM model_usage WHERE tenant_id = ?"
    assert (backend.query(count, (acme,)), backend.query(count, (beta,))) == ([(0,)], [(2,)])
    assert isinstance(store, SQLiteStore | PostgresStore)
    assert await store.total_tokens(acme, "day", "2025-01-15", model_id="llama") == 0

    # A deleted tenant's late usage is skipped, per model too; the rest of the batch counts.
    await store.record_usage(
        [
            UsageDelta(acme, JAN_15, prompt_tokens=1, model_id="llama"),
            UsageDelta(beta, JAN_15, prompt_tokens=4, model_id="llama", units=4.0),
        ]
    )
    assert backend.query(count, (acme,)) == [(0,)]
    assert await store.model_usage("beta", "day") == [
        ModelUsage(beta, "day", "2025-01-15", "llama", 2, 10, 0, 0, 10.0)
    ]


async def test_aliases_set_move_list_delete(backend: Backend) -> None:
    first = await backend.open()
    try:
        assert await first.list_aliases() == []
        fast, created = await first.set_alias("fast", "llama-8b")
        assert created and (fast.alias, fast.model_id) == ("fast", "llama-8b")
        smart, created = await first.set_alias("smart", "qwen-72b")
        assert created
        # "Z" sorts before "f" by character, whatever the database's collation says.
        upper, created = await first.set_alias("Zeta", "qwen-72b")
        assert created
        assert await first.list_aliases() == [upper, fast, smart]

        moved, created = await first.set_alias("fast", "qwen-7b")
        assert not created
        assert (moved.alias, moved.model_id) == ("fast", "qwen-7b")
        assert moved.updated_at >= fast.updated_at
        assert await first.list_aliases() == [upper, moved, smart]

        assert await first.delete_alias("smart") is True
        assert await first.delete_alias("smart") is False
        assert await first.delete_alias("never") is False
        assert await first.list_aliases() == [upper, moved]
        again, created = await first.set_alias("smart", "llama-8b")  # new once more
        assert created
    finally:
        await first.close()

    second = await backend.open()
    try:
        assert await second.list_aliases() == [upper, moved, again]
    finally:
        await second.close()


async def test_cost_factors_set_reset_and_refused(backend: Backend) -> None:
    first = await backend.open()
    try:
        assert await first.list_model_settings() == []
        assert await first.set_cost_factor("qwen", 2.5) == ModelSetting("qwen", 2.5)
        assert await first.set_cost_factor("llama", 0.125) == ModelSetting("llama", 0.125)
        assert await first.set_cost_factor("qwen", 4.0) == ModelSetting("qwen", 4.0)
        assert await first.set_cost_factor("mixtral", None) == ModelSetting("mixtral", None)
        assert await first.set_cost_factor("llama", None) == ModelSetting("llama", None)
        for bad in (math.nan, math.inf, -math.inf, 0.0, -1.0):
            with pytest.raises(ValueError, match="finite and > 0"):
                await first.set_cost_factor("qwen", bad)
    finally:
        await first.close()

    second = await backend.open()
    try:
        # None reads back as None (measured), and the refused values changed nothing.
        assert await second.list_model_settings() == [
            ModelSetting("llama", None),
            ModelSetting("mixtral", None),
            ModelSetting("qwen", 4.0),
        ]
    finally:
        await second.close()


async def test_a_version_1_database_migrates_keeping_its_data(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database an older fairgate wrote (schema version 1: made by the store with only the
    first migration, its rows written in version 1's columns) gets migration 2 at the next
    start; its tenants, keys and usage read as before, with no models' limits and no units,
    and the new ledger adds to the old rows."""
    known = list(backend.module.MIGRATIONS)
    monkeypatch.setattr(backend.module, "MIGRATIONS", known[:1])
    await (await backend.open()).close()
    monkeypatch.setattr(backend.module, "MIGRATIONS", known)
    assert backend.schema_version() == 1
    assert not any(backend.has_table(table) for table in NEW_TABLES)
    quotas = Quotas(token_budget=9)
    old = Tenant("tn_0123456789abcdef", "acme", 2.0, "interactive", ["interactive"], quotas,
                 "demote", JAN_15)  # fmt: skip
    backend.query(
        "INSERT INTO tenants (tenant_id, name, weight, default_class, allowed_classes, quotas,"
        " over_quota, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (old.tenant_id, old.name, old.weight, old.default_class, '["interactive"]',
         msgspec.json.encode(quotas).decode(), old.over_quota, old.created_at),
    )  # fmt: skip
    secret = new_secret()
    key = ApiKey("key_0123456789abcdef", old.tenant_id, secret[:DISPLAY_PREFIX_LEN], "ci", JAN_15)
    backend.query(
        "INSERT INTO api_keys (key_id, tenant_id, key_hash, prefix, name, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (key.key_id, key.tenant_id, hash_secret(secret), key.prefix, key.name, key.created_at),
    )
    backend.query(
        "INSERT INTO usage (tenant_id, period_kind, period, requests, prompt_tokens,"
        " cached_tokens, completion_tokens) VALUES (?, 'month', '2025-01', 4, 40, 3, 50)",
        (old.tenant_id,),
    )

    store = await backend.open()
    try:
        assert backend.schema_version() == len(known)
        assert all(backend.has_table(table) for table in NEW_TABLES)
        assert await store.list_tenants() == [old]  # allowed_models [], model_quotas {}
        assert await store.find_key(secret) == (key, old)
        assert await store.usage("acme", "month") == [Usage(old.tenant_id, "2025-01", 4, 40, 3, 50)]
        assert await store.model_usage("acme", "month") == []

        await store.record_usage(
            [UsageDelta(old.tenant_id, JAN_16, prompt_tokens=5, model_id="llama", units=2.5)]
        )
        assert await store.usage("acme", "month") == [
            Usage(old.tenant_id, "2025-01", 5, 45, 3, 50, 2.5)
        ]
        assert await store.model_usage("acme", "month") == [
            ModelUsage(old.tenant_id, "month", "2025-01", "llama", 1, 5, 0, 0, 2.5)
        ]
        patched = await store.update_tenant("acme", TenantPatch(allowed_models=["llama"]))
        assert patched == msgspec.structs.replace(old, allowed_models=["llama"])
    finally:
        await store.close()


# PostgreSQL: several replicas on one database


async def test_postgres_model_usage_from_two_replicas_sums_exactly(postgres_url: str) -> None:
    """Two stores add to the same model rows at once, their batches naming the models in
    opposite orders: every token and unit counts once, and no batch deadlocks another."""
    first, second = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        tid = (await first.create_tenant(TenantSpec(name="acme"))).tenant_id

        def batch(i: int, models: tuple[str, str]) -> list[UsageDelta]:
            return [
                UsageDelta(tid, JAN_15 + i, prompt_tokens=i, completion_tokens=1, model_id=model,
                           units=0.5)
                for model in models
                for _ in range(2)
            ]  # fmt: skip

        writes = [
            store.record_usage(batch(i, models))
            for i in range(40)
            for store, models in ((first, ("llama", "qwen")), (second, ("qwen", "llama")))
        ]
        await asyncio.gather(*writes)
        prompt = 2 * 2 * sum(range(40))  # two stores, two deltas per model per batch
        assert await second.model_usage(tid, "month") == [
            ModelUsage(tid, "month", "2025-01", model, 160, prompt, 0, 160, 80.0)
            for model in ("llama", "qwen")
        ]
        assert await first.usage(tid, "day") == [
            Usage(tid, "2025-01-15", 320, 2 * prompt, 0, 320, 160.0)
        ]
    finally:
        await first.close()
        await second.close()


async def test_postgres_one_alias_set_by_two_replicas_at_once_is_created_once(
    postgres_url: str,
) -> None:
    """Two admins on two replicas set the same new alias at once: one of them created it, the
    other then moved it (and what it set is what stays)."""
    first, second = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url)
    try:
        for round_ in range(20):
            alias = f"a{round_}"
            outcomes = await asyncio.gather(
                first.set_alias(alias, "llama"), second.set_alias(alias, "qwen")
            )
            assert sorted(created for _, created in outcomes) == [False, True], outcomes
            # The one that moved it wrote after the one that created it.
            [moved] = [stored for stored, created in outcomes if not created]
            assert [a for a in await first.list_aliases() if a.alias == alias] == [moved]
    finally:
        await first.close()
        await second.close()
