"""An admin change and its audit record are kept together or not at all, on both backends (an
SQLite file and a PostgreSQL server of the session's own, with ``test_store.py``'s fixtures).

A trigger on ``audit_log`` makes every audit insert fail, as a full disk, a lock held too long or
a lost connection would, while the change's own writes would succeed. Then every change that
lives in the store (tenants, keys, a model's cost factor, aliases) is refused: the store raises,
the route answers an error, nothing is changed, nothing is sent to the other replicas
(``admin_changed``), and the log has no record. A change of the worker registry, which no
database transaction covers, stands and is answered as made; its record is retried and, failing
that, an ERROR says so (``gateway.audit``). Without the trigger each record's ``before`` is what
the store read under the change's lock.

The routes run in process over real parts, as in ``test_admin_models.py``: the store, a worker
registry polling ``ScriptedWorker``s, the catalog and the cost book, called through
``httpx.ASGITransport``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import AdminParts, admin_endpoints, registration_routes, routing_path
from gateway.admin_keys import key_admin_endpoints
from gateway.admin_models import ModelAdminParts, model_admin_endpoints, model_routing_path
from gateway.audit import AuditDraft, AuditLog, AuditRecord, actor_of, key_view
from gateway.auth import Authenticator
from gateway.config import SchedulerSection, SloClass, load_config
from gateway.gatekeeper import error_response
from gateway.model_catalog import ModelCatalog
from gateway.model_costs import CostBook
from gateway.openapi_document import routes_of
from gateway.policies import make_per_model_policy
from gateway.replica_sync import AdminChange
from gateway.store_common import AuditWriteFailed
from gateway.stores import GatewayStore
from gateway.tenants import KeyPatch, KeySpec, ModelSetting, TenantPatch, TenantSpec
from gateway.usage import UsageRecorder
from gateway.workers import WorkerRegistry
from tests.gateway.scripted_transport import ScriptedTransport, ScriptedWorker
from tests.gateway.test_store import Backend
from tests.gateway.test_store import backend as backend
from tests.gateway.test_store import db_path as db_path
from tests.gateway.test_store import store as store
from tests.postgres import postgres_server as postgres_server
from tests.postgres import postgres_url as postgres_url
from transfer.errors import FairgateError
from transfer.registration import REGISTER_PATH

ADMIN_TOKEN = "atomic-admin-token-" + "a" * 20
REGISTRATION_TOKEN = "atomic-registration-token-" + "r" * 20
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ADMIN_ACTOR = actor_of("admin-token", ADMIN_TOKEN)
MODEL = "tiny-model"
WORKER_URL = "http://worker-a:8201"
ADDED_URL = "http://worker-added:8201"
REGISTERED_URL = "http://worker-registered:8201"
FAILURE = "audit write failed"


def fail_audit_writes(backend: Backend) -> None:
    """From now on every insert into ``audit_log`` fails (on every connection)."""
    if backend.name == "sqlite":
        backend.query(
            "CREATE TRIGGER audit_fails BEFORE INSERT ON audit_log"
            f" BEGIN SELECT RAISE(ABORT, '{FAILURE}'); END"
        )
        return
    backend.query(
        "CREATE FUNCTION audit_fails() RETURNS trigger LANGUAGE plpgsql"
        f" AS $$ BEGIN RAISE EXCEPTION '{FAILURE}'; END $$"
    )
    backend.query(
        "CREATE TRIGGER audit_fails BEFORE INSERT ON audit_log"
        " FOR EACH ROW EXECUTE FUNCTION audit_fails()"
    )


def heal_audit_writes(backend: Backend) -> None:
    if backend.name == "sqlite":
        backend.query("DROP TRIGGER audit_fails")
    else:
        backend.query("DROP TRIGGER audit_fails ON audit_log")


# ---- the store -------------------------------------------------------------------------------


async def test_a_store_change_whose_record_fails_is_not_made(
    store: GatewayStore, backend: Backend
) -> None:
    tenant = await store.create_tenant(TenantSpec(name="acme"))
    key = (await store.create_key("acme", KeySpec(name="ci"))).key
    await store.set_alias("chat", MODEL)
    await store.set_cost_factor(MODEL, 2.0)
    fail_audit_writes(backend)

    def draft(action: Any) -> AuditDraft:
        return AuditDraft(ADMIN_ACTOR, action)

    changes = [
        store.create_tenant(TenantSpec(name="beta"), audit=draft("tenant.create")),
        store.update_tenant("acme", TenantPatch(weight=5.0), audit=draft("tenant.update")),
        store.delete_tenant("acme", audit=draft("tenant.delete")),
        store.create_key("acme", KeySpec(name="new"), audit=draft("key.create")),
        store.update_key(key.key_id, KeyPatch(name="renamed"), audit=draft("key.update")),
        store.revoke_key(key.key_id, audit=draft("key.revoke")),
        store.set_alias("chat", "other-model", audit=draft("alias.set")),
        store.set_alias("fresh", MODEL, audit=draft("alias.set")),
        store.delete_alias("chat", audit=draft("alias.delete")),
        store.set_cost_factor(MODEL, 3.0, audit=draft("model.update")),
        store.set_cost_factor("new-model", 3.0, audit=draft("model.update")),
    ]
    for change in changes:
        with pytest.raises(AuditWriteFailed) as failed:
            await change
        assert FAILURE in str(failed.value.__cause__)

    assert await store.list_tenants() == [tenant]
    assert await store.list_keys() == [key]
    assert [(a.alias, a.model_id) for a in await store.list_aliases()] == [("chat", MODEL)]
    assert await store.list_model_settings() == [ModelSetting(MODEL, 2.0)]
    assert await store.list_audit() == []

    # The same changes, unaudited, do not write to the log at all.
    assert (await store.update_tenant("acme", TenantPatch(weight=5.0))).weight == 5.0
    heal_audit_writes(backend)
    assert await store.list_audit() == []


async def test_each_record_is_read_and_written_with_its_change(store: GatewayStore) -> None:
    """``before`` is what the store read under the change's lock (here: what the previous
    change, unaudited and made behind the admin's back, left), ``after`` what it wrote."""

    def draft(action: Any) -> AuditDraft:
        return AuditDraft(ADMIN_ACTOR, action)

    created = await store.create_tenant(TenantSpec(name="acme"), audit=draft("tenant.create"))
    behind = await store.update_tenant("acme", TenantPatch(weight=2.0))  # not audited
    updated = await store.update_tenant(
        "acme", TenantPatch(weight=3.0), audit=draft("tenant.update")
    )
    key = (await store.create_key("acme", KeySpec(name="ci"), audit=draft("key.create"))).key
    renamed = await store.update_key(key.key_id, KeyPatch(name="ci-2"), audit=draft("key.update"))
    revoked = await store.revoke_key(key.key_id, audit=draft("key.revoke"))
    again = await store.revoke_key(key.key_id, audit=draft("key.revoke"))  # no-op: recorded
    first, is_new = await store.set_alias("chat", MODEL, audit=draft("alias.set"))
    assert is_new
    moved, is_new = await store.set_alias("chat", "other", audit=draft("alias.set"))
    assert not is_new
    assert await store.delete_alias("chat", audit=draft("alias.delete"))
    assert not await store.delete_alias("chat", audit=draft("alias.delete"))  # nothing: none
    await store.set_cost_factor(MODEL, 2.0, audit=draft("model.update"))
    await store.set_cost_factor(MODEL, None, audit=draft("model.update"))
    deleted = await store.delete_tenant("acme", audit=draft("tenant.delete"))
    assert deleted == updated

    records = await store.list_audit()
    assert {r.actor for r in records} == {ADMIN_ACTOR}
    tid = created.tenant_id
    view = msgspec.to_builtins
    assert [(r.action, r.target, r.tenant_id, r.before, r.after) for r in reversed(records)] == [
        ("tenant.create", tid, tid, None, view(created)),
        ("tenant.update", tid, tid, view(behind), view(updated)),
        ("key.create", key.key_id, tid, None, key_view(key)),
        ("key.update", key.key_id, tid, key_view(key), key_view(renamed)),
        ("key.revoke", key.key_id, tid, key_view(renamed), key_view(revoked)),
        ("key.revoke", key.key_id, tid, key_view(revoked), key_view(again)),
        ("alias.set", "chat", "", None, view(first)),
        ("alias.set", "chat", "", view(first), view(moved)),
        ("alias.delete", "chat", "", view(moved), None),
        ("model.update", MODEL, "", {"model": MODEL, "cost_factor": None},
         {"model": MODEL, "cost_factor": 2.0}),
        ("model.update", MODEL, "", {"model": MODEL, "cost_factor": 2.0},
         {"model": MODEL, "cost_factor": None}),
        ("tenant.delete", tid, tid, view(updated), None),
    ]  # fmt: skip
    assert behind.weight == 2.0 and updated.weight == 3.0
    assert again.revoked_at == revoked.revoked_at is not None


# ---- the routes ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Served:
    client: httpx.AsyncClient
    store: GatewayStore
    registry: WorkerRegistry
    catalog: ModelCatalog
    costs: CostBook
    changes: list[AdminChange]  # what ``admin_changed`` got


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FairgateError)
    return error_response(exc)


@contextlib.asynccontextmanager
async def admin_app(store: GatewayStore) -> AsyncIterator[Served]:
    """Every mutating admin route (tenants, keys, workers, models, aliases, registration) over
    ``store`` and real parts, routed as the gateway routes them."""
    workers = [ScriptedWorker(url, MODEL) for url in (WORKER_URL, ADDED_URL, REGISTERED_URL)]
    registry = WorkerRegistry([], [], [WORKER_URL], transport=ScriptedTransport(*workers))
    try:
        await registry.poll_once()
        changes: list[AdminChange] = []

        async def admin_changed(change: AdminChange) -> None:
            changes.append(change)

        auth = Authenticator(store, ADMIN_TOKEN)
        config = load_config(environ={}, overrides={"gateway": {"admin_token": ADMIN_TOKEN}})
        parts = AdminParts(config, auth, store, UsageRecorder(store), registry, admin_changed)
        catalog = ModelCatalog(registry.model_ids)
        costs = CostBook(MODEL)
        policy = make_per_model_policy(
            "vtc", SchedulerSection(), [SloClass("standard", rank=1, ttft_target_s=1e9)]
        )
        model_parts = ModelAdminParts(
            auth, store, registry, catalog, costs, policy.backlogs, admin_changed
        )
        endpoints = [
            *admin_endpoints(parts),
            *key_admin_endpoints(parts),
            *model_admin_endpoints(model_parts),
        ]
        routed = [
            dataclasses.replace(e, path=routing_path(model_routing_path(e.path))) for e in endpoints
        ]
        app = Starlette(
            routes=[
                *routes_of(routed),
                *registration_routes(REGISTRATION_TOKEN, registry, store),
            ],
            exception_handlers={FairgateError: _on_error},
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway.test", headers=ADMIN
        ) as client:
            yield Served(client, store, registry, catalog, costs, changes)
    finally:
        await registry.stop()


async def test_a_route_whose_record_fails_answers_an_error_and_changes_nothing(
    store: GatewayStore, backend: Backend
) -> None:
    """The reviewer's reproducer, on every route whose change is in the store: before the fix,
    ``PATCH weight=5`` answered 500 with the weight 5.0 applied, sent to the scheduler, and no
    record."""
    async with admin_app(store) as served:
        client = served.client
        tenant = (await client.post("/admin/v1/tenants", json={"name": "acme"})).json()
        assert tenant["weight"] == 1.0
        path = "/admin/v1/tenants/acme"
        key = (await client.post(path + "/keys", json={"name": "ci"})).json()["key"]
        alias_path = "/admin/v1/aliases/" + quote("chat", safe="")
        assert (await client.put(alias_path, json={"model": MODEL})).status_code == 201
        model_path = "/admin/v1/models/" + quote(MODEL, safe="")
        assert (await client.patch(model_path, json={"cost_factor": 2.0})).status_code == 200
        records = await store.list_audit()
        assert len(records) == 4
        served.changes.clear()
        fail_audit_writes(backend)

        calls = [
            ("PATCH", path, {"weight": 5.0}),
            ("POST", "/admin/v1/tenants", {"name": "beta"}),
            ("DELETE", path, None),
            ("POST", path + "/keys", {"name": "new"}),
            ("PATCH", f"/admin/v1/keys/{key['key_id']}", {"name": "renamed"}),
            ("POST", f"/admin/v1/keys/{key['key_id']}/revoke", None),
            ("PUT", alias_path, {"model": "tiny-model"}),
            ("PUT", "/admin/v1/aliases/fresh", {"model": MODEL}),
            ("DELETE", alias_path, None),
            ("PATCH", model_path, {"cost_factor": 3.0}),
            ("PATCH", model_path, {}),  # a no-op is recorded too: its record fails as well
        ]
        for method, called, body in calls:
            answer = await client.request(method, called, json=body)
            assert answer.status_code == 503, (method, called, answer.text)
            assert answer.json()["error"]["code"] == "audit_write_failed"
            message = answer.json()["error"]["message"]
            assert ("not made" in message) == (body != {}), message  # a no-op: nothing to make

        assert [(t.name, t.weight) for t in await store.list_tenants()] == [("acme", 1.0)]
        [stored_key] = await store.list_keys()
        assert (stored_key.name, stored_key.revoked_at) == ("ci", None)
        assert [(a.alias, a.model_id) for a in await store.list_aliases()] == [("chat", MODEL)]
        assert await store.list_model_settings() == [ModelSetting(MODEL, 2.0)]
        assert served.changes == []  # nothing applied here, nothing sent to the other replicas
        assert served.catalog.aliases() == {"chat": MODEL}
        assert served.costs.cost(MODEL).factor == 2.0
        assert await store.list_audit() == records

        heal_audit_writes(backend)
        answer = await client.patch(path, json={"weight": 5.0})
        assert answer.status_code == 200 and answer.json()["weight"] == 5.0
        assert served.changes == [AdminChange("tenant", tenant["tenant_id"], weight=5.0)]
        newest = (await store.list_audit())[0]
        assert newest.action == "tenant.update"
        assert newest.before is not None and newest.after is not None
        assert (newest.before["weight"], newest.after["weight"]) == (1.0, 5.0)


async def test_a_registry_change_whose_record_fails_stands_and_says_so(
    store: GatewayStore, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async with admin_app(store) as served:
        fail_audit_writes(backend)
        caplog.set_level(logging.WARNING, logger="gateway.audit")
        added = await served.client.post(
            "/admin/v1/workers", json={"url": ADDED_URL, "role": "colocated"}
        )
        assert added.status_code == 201, added.text
        registered = await served.client.post(
            REGISTER_PATH,
            json={"url": REGISTERED_URL, "role": "colocated", "heartbeat_s": 30.0},
            headers={"authorization": f"Bearer {REGISTRATION_TOKEN}"},
        )
        assert registered.status_code == 201, registered.text
        assert {h.url for h in served.registry.handles} >= {ADDED_URL, REGISTERED_URL}
        assert await store.list_audit() == []

        unaudited = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.getMessage().split()[:3] for r in unaudited] == [
            ["unaudited", "admin", "change"]
        ] * 2
        fields = [r.__dict__["fields"] for r in unaudited]
        assert [(f["action"], f["target"]) for f in fields] == [
            ("worker.add", ADDED_URL),
            ("worker.register", REGISTERED_URL),
        ]
        assert fields[0]["actor"] == ADMIN_ACTOR
        assert fields[0]["after"]["url"] == ADDED_URL
        assert fields[0]["error"].startswith("AuditWriteFailed: ")
        assert "not made" not in fields[0]["error"]  # it was made
        assert FAILURE in caplog.text  # the driver's error, in the store's warning
        tries = [r for r in caplog.records if r.name.startswith("gateway.store")]
        retries = [
            r for r in caplog.records if r.name == "gateway.audit" and r.levelname == "WARNING"
        ]
        assert (len(tries), len(retries)) == (2 * 3, 2 * 2)  # each record tried three times
        logged = caplog.text + repr(fields)
        for secret in (ADMIN_TOKEN, REGISTRATION_TOKEN):
            assert secret not in logged

        heal_audit_writes(backend)
        drained = await served.client.post(f"/admin/v1/workers/{quote(ADDED_URL, safe='')}/drain")
        assert drained.status_code in (200, 202)
        assert [r.action for r in await store.list_audit()] == ["worker.drain"]


async def test_a_registry_record_is_retried_until_it_is_written(
    store: GatewayStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write = store.record_audit
    failures = [sqlite3.OperationalError("database is locked")] * 2

    async def flaky(record: AuditRecord) -> None:
        if failures:
            raise failures.pop()
        await write(record)

    monkeypatch.setattr(store, "record_audit", flaky)
    log = AuditLog(store, retry_delays_s=(0.0, 0.0))
    record = await log.record(ADMIN_ACTOR, "worker.remove", WORKER_URL, before={"url": "x"})
    assert record is not None and await store.list_audit() == [record]
    assert [r.levelname for r in caplog.records if r.name == "gateway.audit"] == ["WARNING"] * 2
