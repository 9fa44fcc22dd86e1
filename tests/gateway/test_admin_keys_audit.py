"""Keys' own limits and expiry, and the audit log, through the real gateway: ``create_app`` over
SQLite in a temporary directory, its workers ``ScriptedWorker``s behind the gateway's worker
transport interface, served by uvicorn on loopback in a thread (so that ``fairgate admin`` runs
against it too). One gateway for the module; each test makes its own tenants.

The audit test enumerates the app's mutating routes (every route under ``/admin/`` with a method
other than GET, and the workers' registration routes) and calls each once: one that has no step
in ``STEPS`` fails the test, so a new mutating route must come with its audit."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.routing import Route

from deploy.cli import main as cli_main
from gateway.app import Gateway, GatewayApp, create_app
from gateway.audit import actor_of
from gateway.config import load_config
from tests.gateway.scripted_transport import ScriptedTransport, ScriptedWorker
from transfer.http import http_server, serve_on
from transfer.registration import REGISTER_PATH, UNREGISTER_PATH

ADMIN_TOKEN = "audit-admin-token-" + "a" * 24
REGISTRATION_TOKEN = "audit-registration-token-" + "r" * 20
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
REGISTRATION = {"authorization": f"Bearer {REGISTRATION_TOKEN}"}
MODEL = "scripted-model"
# (A scripted worker's id is made from its URL's length: these differ.)
MAIN_URL = "http://worker-main:8201"
ADDED_URL = "http://worker-added-by-admin:8201"
REGISTERED_URL = "http://worker-registered-itself-x:8201"


@dataclass(frozen=True, slots=True)
class Live:
    base_url: str
    db_path: Path
    app: GatewayApp

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers=ADMIN if headers is None else headers, timeout=30
        )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    db_path = tmp_path_factory.mktemp("store") / "fairgate.db"
    config = load_config(
        environ={},
        overrides={
            "gateway": {
                "admin_token": ADMIN_TOKEN,
                "registration_token": REGISTRATION_TOKEN,
                "colocated_workers": [MAIN_URL],
                "max_loop_lag_s": 10.0,  # a shared machine's lag must not refuse requests
            },
            "store": {"path": str(db_path)},
            "model": {"name": "null"},  # the tokenizer (the default model's)
        },
    )
    transport = ScriptedTransport(
        *(ScriptedWorker(url, MODEL) for url in (MAIN_URL, ADDED_URL, REGISTERED_URL))
    )
    app = create_app(Gateway(config, transport=transport))
    server = http_server(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=serve_on, args=(server, sock), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            assert thread.is_alive(), "the gateway stopped"
            time.sleep(0.01)
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", db_path, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


def _new_tenant(client: httpx.Client, **spec: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    answer = client.post("/admin/v1/tenants", json={"name": name, **spec})
    assert answer.status_code == 201, answer.text
    return name


def _error(answer: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    message: str = error["message"]
    return message


def _audit(client: httpx.Client, **params: str) -> list[dict[str, Any]]:
    answer = client.get("/admin/v1/audit", params={"limit": "1000", **params})
    assert answer.status_code == 200, answer.text
    records: list[dict[str, Any]] = answer.json()["data"]
    return records


# ---- keys: expiry, limits, PATCH ------------------------------------------------------------


def test_an_expired_key_is_401_saying_when_cached_or_not(live: Live) -> None:
    with live.client() as admin:
        tenant = _new_tenant(admin)
        expires_at = time.time() + 1.5
        created = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"expires_at": expires_at})
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        assert key["expires_at"] == expires_at
        secret = created.json()["secret"]
        with live.client({"authorization": f"Bearer {secret}"}) as tenant_client:
            assert tenant_client.get("/v1/models").status_code == 200  # now in the key cache
            time.sleep(max(0.0, expires_at - time.time()) + 0.1)
            answer = tenant_client.get("/v1/models")
            message = _error(answer, 401, "key_expired", None)
            assert answer.json()["error"]["type"] == "authentication_error"
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
            assert message == f"API key {key['prefix']}… expired at {when}"
            generation = tenant_client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
            _error(generation, 401, "key_expired", None)

            # A new expiry in the future brings it back (the patch drops the cached key).
            patched = admin.patch(
                f"/admin/v1/keys/{key['key_id']}", json={"expires_at": time.time() + 3600}
            )
            assert patched.status_code == 200, patched.text
            assert tenant_client.get("/v1/models").status_code == 200
            patched = admin.patch(f"/admin/v1/keys/{key['key_id']}", json={"expires_at": 1.0})
            assert patched.status_code == 200, patched.text
            _error(tenant_client.get("/v1/models"), 401, "key_expired", None)
            cleared = admin.patch(f"/admin/v1/keys/{key['key_id']}", json={"expires_at": None})
            assert cleared.json()["expires_at"] is None
            assert tenant_client.get("/v1/models").status_code == 200


def test_a_key_created_with_a_past_expiry_never_works(live: Live) -> None:
    with live.client() as admin:
        tenant = _new_tenant(admin)
        created = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={"expires_at": 1000.0})
        assert created.status_code == 201, created.text
        headers = {"authorization": f"Bearer {created.json()['secret']}"}
        with live.client(headers) as tenant_client:
            message = _error(tenant_client.get("/v1/models"), 401, "key_expired", None)
            assert message.endswith("expired at 1970-01-01T00:16:40Z")


@pytest.mark.parametrize(
    ("key_quotas", "param"),
    [
        ({"requests_per_minute": 11}, "quotas.requests_per_minute"),
        ({"tokens_per_minute": 1001}, "quotas.tokens_per_minute"),
        ({"max_concurrent_requests": 3}, "quotas.max_concurrent_requests"),
        ({"token_budget": 5001, "budget_period": "day"}, "quotas.token_budget"),
        ({"token_budget": 10, "budget_period": "month"}, "quotas.budget_period"),
    ],
)
def test_a_key_limit_over_its_tenants_is_400_naming_it(
    live: Live, key_quotas: dict[str, Any], param: str
) -> None:
    tenant_quotas = {
        "requests_per_minute": 10,
        "tokens_per_minute": 1000,
        "max_concurrent_requests": 2,
        "token_budget": 5000,
        "budget_period": "day",
    }
    with live.client() as admin:
        tenant = _new_tenant(admin, quotas=tenant_quotas)
        path = f"/admin/v1/tenants/{tenant}/keys"
        _error(admin.post(path, json={"quotas": key_quotas}), 400, "key_quota_over_tenant", param)
        created = admin.post(path, json={"quotas": {"requests_per_minute": 10}})  # equal: fine
        assert created.status_code == 201, created.text
        key_id = created.json()["key"]["key_id"]
        answer = admin.patch(f"/admin/v1/keys/{key_id}", json={"quotas": key_quotas})
        _error(answer, 400, "key_quota_over_tenant", param)
        assert admin.get(f"/admin/v1/keys/{key_id}").json()["quotas"]["requests_per_minute"] == 10


def test_a_keys_limits_need_no_tenant_limit(live: Live) -> None:
    """Where the tenant has no limit, the key's may be anything; where the key has none, the
    tenant's applies."""
    with live.client() as admin:
        tenant = _new_tenant(admin, quotas={"tokens_per_minute": 100})
        body = {"quotas": {"requests_per_minute": 10**6, "token_budget": 9, "budget_period": "day"}}
        created = admin.post(f"/admin/v1/tenants/{tenant}/keys", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["key"]["quotas"]["requests_per_minute"] == 10**6


def test_patch_key_changes_only_what_it_names(live: Live) -> None:
    with live.client() as admin:
        tenant = _new_tenant(admin)
        body = {"name": "ci", "quotas": {"tokens_per_minute": 50}, "expires_at": 4_000_000_000.0}
        key = admin.post(f"/admin/v1/tenants/{tenant}/keys", json=body).json()["key"]
        path = f"/admin/v1/keys/{key['key_id']}"
        renamed = admin.patch(path, json={"name": "ci-2"})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json() == {**key, "name": "ci-2"}
        requoted = admin.patch(path, json={"quotas": {"requests_per_minute": 5}}).json()
        assert requoted["quotas"] == {
            "requests_per_minute": 5,
            "tokens_per_minute": None,
            "max_concurrent_requests": None,
            "token_budget": None,
            "budget_period": "month",
        }
        assert requoted["expires_at"] == 4_000_000_000.0
        assert admin.get(path).json() == requoted
        _error(admin.patch(path, json={"secret": "x"}), 400, "invalid_request", "secret")
        _error(admin.patch("/admin/v1/keys/key_nope", json={}), 404, "not_found", None)


# ---- the audit log --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One call of a mutating route: what it sends, the status it gets, the record it leaves."""

    method: str
    route: str  # the route's path template, as the app routes it (without ``:path``)
    path: str  # the path called; {tenant}, {key_id} filled from ``Made``
    action: str
    body: Any = None
    statuses: tuple[int, ...] = (200,)
    registration: bool = False  # with the registration token, not the admin token


TENANT = "audited-tenant"
ALIAS = "audited/alias"
STEPS = [
    Step("POST", "/admin/v1/tenants", "/admin/v1/tenants", "tenant.create",
         {"name": TENANT, "quotas": {"tokens_per_minute": 1000}}, (201,)),
    Step("PATCH", "/admin/v1/tenants/{tenant}", f"/admin/v1/tenants/{TENANT}", "tenant.update",
         {"weight": 2.0}),
    Step("POST", "/admin/v1/tenants/{tenant}/keys", f"/admin/v1/tenants/{TENANT}/keys",
         "key.create", {"name": "ci", "quotas": {"tokens_per_minute": 500}}, (201,)),
    Step("PATCH", "/admin/v1/keys/{key_id}", "/admin/v1/keys/{key_id}", "key.update",
         {"quotas": {"tokens_per_minute": 400}, "expires_at": 4_000_000_000.0}),
    Step("POST", "/admin/v1/keys/{key_id}/revoke", "/admin/v1/keys/{key_id}/revoke",
         "key.revoke"),
    Step("POST", "/admin/v1/workers", "/admin/v1/workers", "worker.add",
         {"url": ADDED_URL, "role": "colocated"}, (201,)),
    Step("POST", "/admin/v1/workers/{worker}/drain",
         f"/admin/v1/workers/{quote(ADDED_URL, safe='')}/drain", "worker.drain", None, (200, 202)),
    Step("POST", "/admin/v1/workers/{worker}/undrain",
         f"/admin/v1/workers/{quote(ADDED_URL, safe='')}/undrain", "worker.undrain"),
    Step("DELETE", "/admin/v1/workers/{worker}",
         f"/admin/v1/workers/{quote(ADDED_URL, safe='')}", "worker.remove", None, (204,)),
    Step("PATCH", "/admin/v1/models/{model}", f"/admin/v1/models/{MODEL}", "model.update",
         {"cost_factor": 2.0}),
    Step("PUT", "/admin/v1/aliases/{alias}", f"/admin/v1/aliases/{quote(ALIAS, safe='')}",
         "alias.set", {"model": MODEL}, (201,)),
    Step("DELETE", "/admin/v1/aliases/{alias}", f"/admin/v1/aliases/{quote(ALIAS, safe='')}",
         "alias.delete", None, (204,)),
    Step("POST", REGISTER_PATH, REGISTER_PATH, "worker.register",
         {"url": REGISTERED_URL, "role": "colocated", "heartbeat_s": 30.0}, (201,), True),
    Step("POST", UNREGISTER_PATH, UNREGISTER_PATH, "worker.unregister",
         {"url": REGISTERED_URL}, (204,), True),
    Step("DELETE", "/admin/v1/tenants/{tenant}", f"/admin/v1/tenants/{TENANT}", "tenant.delete",
         None, (204,)),
]  # fmt: skip


def _mutating_routes(app: GatewayApp) -> set[tuple[str, str]]:
    """(method, path template) of every route that changes something an admin audits."""
    assert app.serving is not None
    found = set()
    for route in app.serving.routes:
        if not isinstance(route, Route) or route.methods is None:
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {worker:path} -> {worker}
        if not (path.startswith("/admin/") or path in (REGISTER_PATH, UNREGISTER_PATH)):
            continue
        found |= {(method, path) for method in route.methods - {"GET", "HEAD"}}
    return found


def test_every_mutating_admin_route_writes_one_record_and_no_secret(
    live: Live, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mutating = _mutating_routes(live.app)
    assert len(mutating) >= 15  # the enumeration found the routes
    stepped = {(step.method, step.route) for step in STEPS}
    assert mutating - stepped == set(), "a mutating route with no audit step: add one to STEPS"
    assert stepped - mutating == set(), "a step for a route that is gone"

    admin_actor = "admin-token:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()[:8]
    registration_actor = actor_of("registration-token", REGISTRATION_TOKEN)
    assert registration_actor.startswith("registration-token:") and len(registration_actor) == 27
    secrets: list[str] = [ADMIN_TOKEN, REGISTRATION_TOKEN]
    with live.client() as admin, live.client(REGISTRATION) as worker:
        before_all = _audit(admin)
        key_id = ""
        tenant_id = ""
        for step in STEPS:
            client = worker if step.registration else admin
            path = step.path.replace("{key_id}", key_id)
            answer = client.request(step.method, path, json=step.body)
            assert answer.status_code in step.statuses, (step, answer.text)
            if step.action == "tenant.create":
                tenant_id = answer.json()["tenant_id"]
            if step.action == "key.create":
                key_id = answer.json()["key"]["key_id"]
                secret = answer.json()["secret"]
                secrets += [secret, secret[11:], hashlib.sha256(secret.encode()).hexdigest()]
            records = _audit(admin)
            assert len(records) == len(before_all) + STEPS.index(step) + 1, step
            newest = records[0]
            assert newest["action"] == step.action
            assert newest["actor"] == (registration_actor if step.registration else admin_actor)
            if step.action.startswith(("tenant.", "key.")):
                assert newest["tenant_id"] == tenant_id
                assert newest["target"] == (tenant_id if "tenant." in step.action else key_id)
            if step.action.startswith("worker."):
                assert newest["target"] in (ADDED_URL, REGISTERED_URL)

        # A renewal (the heartbeat) changes nothing: no record.
        for _ in range(2):
            body = {"url": REGISTERED_URL, "role": "colocated", "heartbeat_s": 30.0}
            assert worker.post(REGISTER_PATH, json=body).status_code in (200, 201)
        assert _audit(admin)[0]["action"] == "worker.register"
        assert worker.post(UNREGISTER_PATH, json={"url": REGISTERED_URL}).status_code == 204
        ours = _audit(admin)[: len(STEPS) + 2]
    by_action = {record["action"]: record for record in reversed(ours)}  # the first of each
    update = by_action["tenant.update"]
    assert (update["before"]["weight"], update["after"]["weight"]) == (1.0, 2.0)
    created_key = by_action["key.create"]
    assert created_key["before"] is None
    assert set(created_key["after"]) == {
        "key_id",
        "prefix",
        "name",
        "quotas",
        "expires_at",
        "revoked_at",
    }
    assert by_action["key.update"]["after"]["quotas"]["tokens_per_minute"] == 400
    assert by_action["key.revoke"]["before"]["revoked_at"] is None
    assert by_action["key.revoke"]["after"]["revoked_at"] is not None
    assert by_action["model.update"]["after"] == {"model": MODEL, "cost_factor": 2.0}
    assert by_action["alias.delete"]["before"]["model_id"] == MODEL
    assert by_action["tenant.delete"]["after"] is None

    # No secret anywhere: the API's records, the rows on disk, the CLI's table and its JSON.
    with live.client() as admin:
        listed = json.dumps(_audit(admin))
    with sqlite3.connect(live.db_path) as db:
        rows = repr(db.execute("SELECT * FROM audit_log").fetchall())
    db.close()
    monkeypatch.setenv("FAIRGATE_URL", live.base_url)
    monkeypatch.setenv("FAIRGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    capsys.readouterr()
    assert cli_main(["admin", "audit", "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert cli_main(["admin", "audit", "--since=-1h"]) == 0
    assert capsys.readouterr().out == table
    assert cli_main(["admin", "audit", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []
    assert cli_main(["admin", "--json", "audit", "--tenant", tenant_id]) == 0
    as_json = capsys.readouterr().out
    for text in (listed, rows, table, as_json):
        for secret in secrets:
            assert secret not in text
    assert table.splitlines()[0].split() == [
        "TIME",
        "ACTOR",
        "ACTION",
        "TARGET",
        "TENANT_ID",
        "CHANGE",
    ]
    assert "weight: 1 → 2" in table and admin_actor in table and registration_actor in table
    tenant_records = json.loads(as_json)["data"]
    assert [r["action"] for r in tenant_records][:5] == [
        "tenant.delete",
        "key.revoke",
        "key.update",
        "key.create",
        "tenant.update",
    ]  # the deleted tenant's records, by its id


def test_a_failed_admin_call_writes_no_record(live: Live) -> None:
    wrong_registration = {"authorization": "Bearer " + "w" * 40}
    with live.client() as admin:
        tenant = _new_tenant(admin, quotas={"tokens_per_minute": 100})
        key = admin.post(f"/admin/v1/tenants/{tenant}/keys", json={}).json()["key"]
        count = len(_audit(admin))
        failing: list[tuple[Callable[[], httpx.Response], int]] = [
            (lambda: admin.post("/admin/v1/tenants", json={"name": tenant}), 409),
            (lambda: admin.patch(f"/admin/v1/tenants/{tenant}", json={"weight": -1}), 400),
            (lambda: admin.delete("/admin/v1/tenants/nobody"), 404),
            (
                lambda: admin.post(
                    f"/admin/v1/tenants/{tenant}/keys",
                    json={"quotas": {"tokens_per_minute": 101}},
                ),
                400,
            ),
            (
                lambda: admin.patch(
                    f"/admin/v1/keys/{key['key_id']}", json={"quotas": {"tokens_per_minute": 101}}
                ),
                400,
            ),
            (lambda: admin.post("/admin/v1/keys/key_nope/revoke"), 404),
            (lambda: admin.post("/admin/v1/workers/nowhere/drain"), 404),
            (lambda: admin.post("/admin/v1/workers", json={"url": "ftp://x", "role": "x"}), 400),
            (lambda: admin.patch("/admin/v1/models/no-such-model", json={}), 404),
            (lambda: admin.put("/admin/v1/aliases/a1", json={"model": "no-such-model"}), 400),
            (lambda: admin.delete("/admin/v1/aliases/no-such-alias"), 404),
            (
                lambda: httpx.post(
                    live.base_url + REGISTER_PATH,
                    json={"url": REGISTERED_URL, "role": "colocated"},
                    headers=wrong_registration,
                ),
                401,
            ),
        ]
        for call, status in failing:
            answer = call()
            assert answer.status_code == status, answer.text
        assert len(_audit(admin)) == count


def test_a_change_whose_audit_write_fails_is_not_made(live: Live) -> None:
    """The reviewer's reproducer, through the whole gateway: an audit write fails (as a full
    disk, a locked database or a lost connection would make it fail) while the tenant's own
    write would not. The admin is told it failed, and it did: the weight is as it was, and the
    log has no record of a change that was not made (``test_audit_atomic.py`` has every route,
    on both backends)."""
    with live.client() as admin:
        tenant = _new_tenant(admin)
        tenant_id = admin.get(f"/admin/v1/tenants/{tenant}").json()["tenant_id"]
        db = sqlite3.connect(live.db_path)
        db.execute(
            "CREATE TRIGGER audit_fails BEFORE INSERT ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'audit write failed'); END"
        )
        db.commit()
        try:
            answer = admin.patch(f"/admin/v1/tenants/{tenant_id}", json={"weight": 5.0})
        finally:
            db.execute("DROP TRIGGER audit_fails")
            db.commit()
            db.close()
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "audit_write_failed"
        assert admin.get(f"/admin/v1/tenants/{tenant_id}").json()["weight"] == 1.0
        assert [r["action"] for r in _audit(admin, tenant=tenant_id)] == ["tenant.create"]

        answer = admin.patch(f"/admin/v1/tenants/{tenant_id}", json={"weight": 5.0})
        assert answer.status_code == 200 and answer.json()["weight"] == 5.0
        actions = [r["action"] for r in _audit(admin, tenant=tenant_id)]
        assert actions == ["tenant.update", "tenant.create"]


def test_the_audit_route_checks_its_parameters(live: Live) -> None:
    with live.client() as admin:
        for since in ("yesterday", "2026-01-31T12:00:00Z", "nan", "1_000", "-1", "1e400"):
            answer = admin.get("/admin/v1/audit", params={"since": since})
            _error(answer, 400, "invalid_request", "since")
        _error(admin.get("/admin/v1/audit?limit=0"), 400, "invalid_request", "limit")
        _error(admin.get("/admin/v1/audit?limit=x"), 400, "invalid_request", "limit")
        assert admin.get("/admin/v1/audit?since=32503680000").json()["data"] == []  # 3000
        tenant = _new_tenant(admin)
        by_name = admin.get("/admin/v1/audit", params={"tenant": tenant}).json()["data"]
        assert [r["action"] for r in by_name] == ["tenant.create"]
        assert len(admin.get("/admin/v1/audit?limit=1").json()["data"]) == 1
    with live.client({}) as anonymous:
        assert anonymous.get("/admin/v1/audit").status_code == 401


# ---- the CLI --------------------------------------------------------------------------------


def test_cli_keys_create_and_update_with_limits_and_expiry(
    live: Live, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIRGATE_URL", live.base_url)
    monkeypatch.setenv("FAIRGATE_ADMIN_TOKEN", ADMIN_TOKEN)
    with live.client() as admin:
        tenant = _new_tenant(admin, quotas={"tokens_per_minute": 1000})

    def cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main(["admin", *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = cli(
        "keys", "create", tenant, "--tpm", "500", "--rpm", "3", "--expires", "+30d"
    )
    assert code == 0, err
    assert "tokens_per_minute=500" in out and "requests_per_minute=3" in out
    code, out, _ = cli("--json", "keys", "list", "--tenant", tenant)
    [key] = json.loads(out)["data"]
    assert abs(key["expires_at"] - (time.time() + 30 * 86400)) < 60
    assert key["quotas"]["tokens_per_minute"] == 500

    code, out, err = cli("keys", "update", key["key_id"], "--tpm", "400", "--unlimited", "rpm")
    assert code == 0, err
    assert "tokens_per_minute=400" in out and "requests_per_minute" not in out
    code, out, err = cli("keys", "update", key["key_id"], "--no-expiry", "--name", "ci")
    assert code == 0, err
    assert out.splitlines()[1].split()[3] == "ci" and "never" in out
    code, out, err = cli("keys", "update", key["key_id"], "--expires", "2999-01-01T00:00:00Z")
    assert code == 0 and "2999-01-01T00:00:00Z" in out, err

    code, _, err = cli("keys", "update", key["key_id"], "--tpm", "1001")
    assert code == 1 and "HTTP 400" in err and "tokens_per_minute" in err
    code, _, err = cli("keys", "update", key["key_id"], "--no-expiry", "--expires", "+1d")
    assert code == 1 and "one or the other" in err
    with pytest.raises(SystemExit):
        cli("keys", "create", tenant, "--expires", "next tuesday")
