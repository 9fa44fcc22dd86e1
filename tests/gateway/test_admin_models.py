"""The admin API of models and aliases (``gateway.admin_models``) and ``fairgate admin models`` /
``aliases`` / the tenants' model flags (``deploy.admin_cli``).

The routes run in process over real parts: an SQLite store in a temporary directory, a worker
registry polling ``ScriptedWorker``s (colocated workers of two models, one of them with a
slashed id) through the gateway's worker transport interface, the catalog, the cost book and a
real per-model policy; called through ``httpx.ASGITransport``. The CLI runs in process against
the same routes (and the tenants' admin routes) served by uvicorn on loopback, in a thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from gateway.admin import AdminParts, admin_endpoints, routing_path
from gateway.admin_models import (
    MODEL_ADMIN_OTHER_SUCCESSES,
    ModelAdminParts,
    model_admin_endpoints,
    model_routing_path,
)
from gateway.auth import Authenticator
from gateway.config import SchedulerSection, SloClass, load_config
from gateway.errors import ModelNotFound
from gateway.gatekeeper import error_response
from gateway.model_catalog import ModelCatalog
from gateway.model_costs import CostBook, ModelSpeed
from gateway.openapi_document import openapi_document, routes_of
from gateway.policies import make_per_model_policy
from gateway.policies.per_model import PerModelPolicy
from gateway.replica_sync import AdminChange
from gateway.scheduler import QueuedRequest
from gateway.store import SQLiteStore
from gateway.tenants import KeySpec, TenantSpec
from gateway.usage import UsageRecorder
from gateway.workers import WorkerRegistry
from tests.gateway.scripted_transport import ScriptedTransport, ScriptedWorker
from transfer.errors import FairgateError
from transfer.http import http_server, serve_on

ADMIN_TOKEN = "m" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL_A = "tiny-model"  # the cost book's reference
MODEL_B = "org/model-b"
# (A scripted worker's id is made from its URL's length: these differ.)
URL_A = "http://worker-a:8201"
URL_B = "http://worker-bb:8201"
ONE_CLASS = [SloClass("standard", rank=1, ttft_target_s=1e9)]


@dataclasses.dataclass(slots=True)
class Served:
    """The routes' app and the parts behind it; ``changes``: what ``admin_changed`` got."""

    app: Starlette
    parts: ModelAdminParts
    policy: PerModelPolicy
    changes: list[AdminChange]
    tenant_key: str  # a tenant's key: refused on admin routes

    @property
    def registry(self) -> WorkerRegistry:
        return self.parts.registry


async def _on_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FairgateError)
    return error_response(exc)


@contextlib.asynccontextmanager
async def model_admin_app(
    db_path: Path, more_workers: Sequence[ScriptedWorker] = ()
) -> AsyncIterator[Served]:
    """The model routes and the tenants' admin routes, routed as the gateway routes them, over
    real parts whose registry has polled its workers once, in order (no background polls: the
    tests change worker states themselves)."""
    store = await SQLiteStore.open(db_path)
    workers = [
        ScriptedWorker(URL_A, MODEL_A, max_model_len=2048),
        ScriptedWorker(URL_B, MODEL_B, max_model_len=4096),
        *more_workers,
    ]
    transport = ScriptedTransport(*workers)
    registry = WorkerRegistry([], [], [w.url for w in workers], transport=transport)
    try:
        await registry.poll_once()
        tenant = await store.create_tenant(TenantSpec(name="acme"))
        created = await store.create_key(tenant.tenant_id, KeySpec())
        changes: list[AdminChange] = []

        async def admin_changed(change: AdminChange) -> None:
            changes.append(change)

        auth = Authenticator(store, ADMIN_TOKEN)
        policy = make_per_model_policy("vtc", SchedulerSection(), ONE_CLASS)
        parts = ModelAdminParts(
            auth=auth,
            store=store,
            registry=registry,
            catalog=ModelCatalog(registry.model_ids),
            costs=CostBook(MODEL_A),
            backlogs=policy.backlogs,
            admin_changed=admin_changed,
        )
        config = load_config(environ={}, overrides={"gateway": {"admin_token": ADMIN_TOKEN}})
        tenant_parts = AdminParts(
            config, auth, store, UsageRecorder(store), registry, admin_changed
        )
        endpoints = [*admin_endpoints(tenant_parts), *model_admin_endpoints(parts)]
        routed = [
            dataclasses.replace(e, path=routing_path(model_routing_path(e.path))) for e in endpoints
        ]
        app = Starlette(routes=routes_of(routed), exception_handlers={FairgateError: _on_error})
        yield Served(app, parts, policy, changes, created.secret)
    finally:
        await registry.stop()
        await store.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with model_admin_app(tmp_path / "fairgate.db") as served:
        yield served


@pytest.fixture
async def client(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=served.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        yield client


def assert_error(answer: httpx.Response, status: int, code: str, param: str | None) -> str:
    """OpenAI's error body with this status, code and param; its message."""
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    message: str = error["message"]
    return message


def _model_path(model: str) -> str:
    return "/admin/v1/models/" + quote(model, safe="")


def _alias_path(alias: str) -> str:
    return "/admin/v1/aliases/" + quote(alias, safe="")


# ---- GET /admin/v1/models -------------------------------------------------------------------


async def test_models_lists_each_model_with_aliases_workers_queue_and_cost(
    served: Served, client: httpx.AsyncClient
) -> None:
    store = served.parts.store
    await store.set_alias("chat", MODEL_B)
    await store.set_alias("assistant", MODEL_B)
    await store.set_alias("future", "model-c")  # no worker announced it (yet)
    served.policy.enqueue(
        QueuedRequest("r1", "tn_1", "standard", 1.0, 0.0, 120, 16, model=MODEL_A), now=0.0
    )
    answer = await client.get("/admin/v1/models", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    by_model = {status["model"]: status for status in body["data"]}
    assert list(by_model) == ["model-c", MODEL_B, MODEL_A]  # by id
    [wait] = [b.est_wait_s for b in served.policy.backlogs() if b.model == MODEL_A]
    assert wait is not None
    assert by_model[MODEL_A] == {
        "model": MODEL_A,
        "aliases": [],
        "max_model_len": 2048,
        "workers": [{"role": "colocated", "state": "ready", "num_workers": 1}],
        "is_ready": True,
        "num_queued": 1,
        "num_queued_tokens": 120,
        "est_wait_s": wait,
        "cost_factor": 1.0,
        "cost_source": "unmeasured",
        "seconds_per_token": None,
    }
    b = by_model[MODEL_B]
    assert (b["aliases"], b["max_model_len"], b["is_ready"]) == (["assistant", "chat"], 4096, True)
    assert (b["num_queued"], b["num_queued_tokens"], b["est_wait_s"]) == (0, 0, None)
    assert by_model["model-c"] == {
        "model": "model-c",
        "aliases": ["future"],
        "max_model_len": None,
        "workers": [],
        "is_ready": False,
        "num_queued": 0,
        "num_queued_tokens": 0,
        "est_wait_s": None,
        "cost_factor": 1.0,
        "cost_source": "unmeasured",
        "seconds_per_token": None,
    }


async def test_a_model_without_ready_workers_shows_its_announced_context_and_their_states(
    served: Served, client: httpx.AsyncClient
) -> None:
    [handle] = [h for h in served.registry.handles if h.url == URL_B]
    served.registry.drain(handle)
    answer = await client.get("/admin/v1/models", headers=ADMIN)
    [b] = [status for status in answer.json()["data"] if status["model"] == MODEL_B]
    assert b["workers"] == [{"role": "colocated", "state": "draining", "num_workers": 1}]
    assert (b["is_ready"], b["max_model_len"]) == (False, 4096)  # what it announced


async def test_the_context_length_is_the_ready_workers_least_else_the_first_announced(
    tmp_path: Path,
) -> None:
    small = ScriptedWorker("http://worker-a-small:8201", MODEL_A, max_model_len=1024)
    async with model_admin_app(tmp_path / "fairgate.db", [small]) as served:
        transport = httpx.ASGITransport(app=served.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:

            async def model_a() -> dict[str, Any]:
                answer = await client.get("/admin/v1/models", headers=ADMIN)
                statuses: list[dict[str, Any]] = answer.json()["data"]
                [status] = [m for m in statuses if m["model"] == MODEL_A]
                return status

            status = await model_a()
            assert status["max_model_len"] == 1024  # what every ready worker takes
            assert status["workers"] == [{"role": "colocated", "state": "ready", "num_workers": 2}]
            for handle in served.registry.handles:
                if handle.info is not None and handle.info.model_id == MODEL_A:
                    served.registry.drain(handle)
            status = await model_a()
            assert status["max_model_len"] == 2048  # its first worker's (URL_A, polled first)
            assert status["workers"] == [
                {"role": "colocated", "state": "draining", "num_workers": 2}
            ]


# ---- PATCH /admin/v1/models/{model} ---------------------------------------------------------


async def test_a_cost_factor_set_is_the_admins_and_null_measures_it_again(
    served: Served, client: httpx.AsyncClient
) -> None:
    costs = served.parts.costs
    # Measured: a token of B takes twice the worker time of one of A (the reference).
    costs.measure(MODEL_A, [ModelSpeed(prefill_tok_s=1000.0, decode_base_s=0.016)])
    costs.measure(MODEL_B, [ModelSpeed(prefill_tok_s=500.0, decode_base_s=0.032)])
    assert costs.cost(MODEL_B).source == "measured" and costs.factor(MODEL_B) == 2.0

    answer = await client.patch(_model_path(MODEL_B), json={"cost_factor": 0.5}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    status = answer.json()
    assert (status["model"], status["cost_factor"], status["cost_source"]) == (
        MODEL_B,
        0.5,
        "admin",
    )
    assert status["seconds_per_token"] == costs.cost(MODEL_B).seconds_per_token
    assert costs.cost(MODEL_B).source == "admin" and costs.factor(MODEL_B) == 0.5
    settings = await served.parts.store.list_model_settings()
    assert [(s.model_id, s.cost_factor) for s in settings] == [(MODEL_B, 0.5)]
    assert served.changes == [AdminChange("models")]

    answer = await client.patch(_model_path(MODEL_B), json={"cost_factor": None}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["cost_factor"], answer.json()["cost_source"]) == (2.0, "measured")
    assert costs.cost(MODEL_B).source == "measured"
    settings = await served.parts.store.list_model_settings()
    assert [(s.model_id, s.cost_factor) for s in settings] == [(MODEL_B, None)]
    assert served.changes == [AdminChange("models")] * 2


async def test_a_model_id_with_a_slash_is_found_encoded_or_not(
    served: Served, client: httpx.AsyncClient
) -> None:
    for path in (_model_path(MODEL_B), "/admin/v1/models/" + MODEL_B):
        answer = await client.patch(path, json={"cost_factor": 3}, headers=ADMIN)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == MODEL_B
    assert served.parts.costs.cost(MODEL_B).factor == 3.0


async def test_an_empty_patch_changes_nothing(served: Served, client: httpx.AsyncClient) -> None:
    answer = await client.patch(_model_path(MODEL_A), json={}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    assert answer.json()["cost_source"] == "unmeasured"
    assert served.changes == [] and await served.parts.store.list_model_settings() == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"cost_factor": 0.001}, "cost_factor"),
        ({"cost_factor": 101}, "cost_factor"),
        ({"cost_factor": "2"}, "cost_factor"),
        ({"factor": 2}, "factor"),
    ],
)
async def test_a_cost_factor_out_of_bounds_is_refused_naming_it(
    served: Served, client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    answer = await client.patch(_model_path(MODEL_A), json=body, headers=ADMIN)
    assert_error(answer, 400, "invalid_request", param)
    assert served.changes == [] and await served.parts.store.list_model_settings() == []
    assert served.parts.costs.cost(MODEL_A).source == "unmeasured"


@pytest.mark.parametrize("model", ["no-such-model", "model-c"])
async def test_a_model_no_worker_announced_is_404(
    served: Served, client: httpx.AsyncClient, model: str
) -> None:
    await served.parts.store.set_alias("future", "model-c")  # listed, but has no pool
    answer = await client.patch(_model_path(model), json={"cost_factor": 2}, headers=ADMIN)
    message = assert_error(answer, 404, "not_found", None)
    assert MODEL_A in message and MODEL_B in message  # the known ones
    assert served.changes == [] and await served.parts.store.list_model_settings() == []


# ---- /admin/v1/aliases ----------------------------------------------------------------------


async def test_an_alias_is_created_moved_and_deleted_and_resolves_at_once(
    served: Served, client: httpx.AsyncClient
) -> None:
    catalog = served.parts.catalog
    created = await client.put(_alias_path("chat"), json={"model": MODEL_A}, headers=ADMIN)
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["alias"], body["model_id"]) == ("chat", MODEL_A)
    assert abs(body["updated_at"] - time.time()) < 60
    assert catalog.resolve("chat", []).model_id == MODEL_A

    moved = await client.put(_alias_path("chat"), json={"model": MODEL_B}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    assert moved.json()["model_id"] == MODEL_B
    assert catalog.resolve("chat", []).model_id == MODEL_B  # the next request goes there

    listed = await client.get("/admin/v1/aliases", headers=ADMIN)
    assert listed.status_code == 200
    assert listed.json()["object"] == "list"
    assert [(a["alias"], a["model_id"]) for a in listed.json()["data"]] == [("chat", MODEL_B)]
    models = (await client.get("/admin/v1/models", headers=ADMIN)).json()["data"]
    assert {m["model"]: m["aliases"] for m in models} == {MODEL_A: [], MODEL_B: ["chat"]}

    deleted = await client.delete(_alias_path("chat"), headers=ADMIN)
    assert deleted.status_code == 204 and deleted.content == b""
    with pytest.raises(ModelNotFound):
        catalog.resolve("chat", [])
    assert (await client.get("/admin/v1/aliases", headers=ADMIN)).json()["data"] == []
    again = await client.delete(_alias_path("chat"), headers=ADMIN)
    assert_error(again, 404, "not_found", None)
    assert served.changes == [AdminChange("models")] * 3


async def test_an_alias_may_hold_slashes_and_any_printable_character(
    served: Served, client: httpx.AsyncClient
) -> None:
    for alias in ("team/chat", "chat small ✓", ".hidden"):
        answer = await client.put(_alias_path(alias), json={"model": MODEL_B}, headers=ADMIN)
        assert answer.status_code == 201, answer.text
        assert answer.json()["alias"] == alias
        assert served.parts.catalog.resolve(alias, []).model_id == MODEL_B
    deleted = await client.delete(_alias_path("team/chat"), headers=ADMIN)
    assert deleted.status_code == 204
    assert set(served.parts.catalog.aliases()) == {"chat small ✓", ".hidden"}


async def test_an_alias_that_is_a_model_id_is_a_conflict(
    served: Served, client: httpx.AsyncClient
) -> None:
    answer = await client.put(_alias_path(MODEL_A), json={"model": MODEL_B}, headers=ADMIN)
    assert_error(answer, 409, "conflict", None)
    assert await served.parts.store.list_aliases() == [] and served.changes == []


async def test_an_alias_of_a_model_no_worker_announced_is_refused_naming_the_known_ones(
    served: Served, client: httpx.AsyncClient
) -> None:
    await client.put(_alias_path("chat"), json={"model": MODEL_A}, headers=ADMIN)
    for target in ("gpt-4", "chat"):  # an alias is no model's id either
        answer = await client.put(_alias_path("other"), json={"model": target}, headers=ADMIN)
        message = assert_error(answer, 400, "invalid_request", "model")
        assert MODEL_A in message and MODEL_B in message
    assert [a.alias for a in await served.parts.store.list_aliases()] == ["chat"]
    assert served.changes == [AdminChange("models")]  # the first PUT's only


@pytest.mark.parametrize(
    ("alias", "body", "param"),
    [
        ("ok", {"model": ""}, "model"),
        ("ok", {"model": "a\nb"}, "model"),
        ("ok", {"model": MODEL_A, "extra": 1}, "extra"),
        ("ok", {}, "model"),
        ("a\x01b", {"model": MODEL_A}, "alias"),  # a control character
        ("\n\x8dab/c", {"model": MODEL_A}, "alias"),  # a newline: the router must pass it on
        ("..", {"model": MODEL_A}, "alias"),  # only dots: a URL would lose it
        ("x" * 257, {"model": MODEL_A}, "alias"),
    ],
)
async def test_an_invalid_alias_or_body_is_refused_naming_it(
    served: Served, client: httpx.AsyncClient, alias: str, body: dict[str, Any], param: str
) -> None:
    # Sent as the server decodes it: ".." raw would be resolved away by the client.
    path = "/admin/v1/aliases/" + quote(alias, safe="").replace(".", "%2E")
    answer = await client.put(path, json=body, headers=ADMIN)
    assert_error(answer, 400, "invalid_request", param)
    assert await served.parts.store.list_aliases() == [] and served.changes == []


# ---- the admin token ------------------------------------------------------------------------

_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/admin/v1/models", None),
    ("PATCH", _model_path(MODEL_A), {"cost_factor": 2}),
    ("GET", "/admin/v1/aliases", None),
    ("PUT", _alias_path("chat"), {"model": MODEL_A}),
    ("DELETE", _alias_path("chat"), None),
]


@pytest.mark.parametrize(("method", "path", "body"), _ROUTES)
async def test_every_route_needs_the_admin_token(
    served: Served,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    await served.parts.store.set_alias("chat", MODEL_B)  # what DELETE would delete
    for headers, status, code in [
        ({}, 401, "invalid_api_key"),
        ({"authorization": "Bearer not-the-token"}, 401, "invalid_api_key"),
        ({"authorization": f"Bearer {served.tenant_key}"}, 403, "permission_denied"),
    ]:
        answer = await client.request(method, path, json=body, headers=headers)
        assert_error(answer, status, code, None)
    assert [(a.alias, a.model_id) for a in await served.parts.store.list_aliases()] == [
        ("chat", MODEL_B)
    ]
    assert await served.parts.store.list_model_settings() == [] and served.changes == []


# ---- the document ---------------------------------------------------------------------------


async def test_the_document_describes_each_route_its_bodies_and_other_successes(
    served: Served,
) -> None:
    document = openapi_document(model_admin_endpoints(served.parts), version="test")
    paths = document["paths"]
    assert {path: sorted(ops) for path, ops in paths.items()} == {
        "/admin/v1/models": ["get"],
        "/admin/v1/models/{model}": ["patch"],
        "/admin/v1/aliases": ["get"],
        "/admin/v1/aliases/{alias}": ["delete", "put"],
    }
    for path, operations in paths.items():
        for operation in operations.values():
            assert operation["security"] == [{"adminToken": []}], path
            assert {"401", "403"} <= set(operation["responses"]), path
    put = paths["/admin/v1/aliases/{alias}"]["put"]
    assert set(put["responses"]) == {"201", "400", "401", "403", "409"}
    [alias_param] = put["parameters"]
    assert alias_param["schema"]["pattern"].endswith("$")  # ECMA's, not Python's \Z
    schemas = document["components"]["schemas"]
    cost = schemas["ModelPatch"]["properties"]["cost_factor"]["anyOf"]
    assert {"type": "number", "minimum": 0.01, "maximum": 100.0} in cost
    assert schemas["AliasTarget"]["required"] == ["model"]
    for method, path in MODEL_ADMIN_OTHER_SUCCESSES:  # it names operations of the document
        assert method in paths[path]


# ---- fairgate admin models / aliases / tenants' model flags ---------------------------------


class _LifespanApp:
    """``model_admin_app`` as an ASGI app whose lifespan builds it (on the server's loop)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.served: Served | None = None
        self._lifespan = Router(lifespan=lambda app: self.lifespan())

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with model_admin_app(self.db_path) as served:
            self.served = served
            yield

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        assert self.served is not None
        await self.served.app(scope, receive, send)


@pytest.fixture
def cli_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """The routes served by uvicorn on loopback, in a thread; the CLI's environment names
    them."""
    app = _LifespanApp(tmp_path / "fairgate.db")
    server = http_server(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=serve_on, args=(server, sock), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            assert thread.is_alive(), "the test server stopped"
            time.sleep(0.01)
        assert app.served is not None
        monkeypatch.setenv("FAIRGATE_URL", f"http://127.0.0.1:{sock.getsockname()[1]}")
        monkeypatch.setenv("FAIRGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        yield app.served
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from deploy.cli import main

    capsys.readouterr()
    code = main(["admin", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    return out


def _table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """A table's header, and its rows by their first cell (no cell here holds a space)."""
    header, *rows = out.splitlines()
    return header.split(), {row.split()[0]: row.split() for row in rows}


def test_the_models_table_shows_aliases_context_workers_queue_and_cost(
    cli_served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    _ok(capsys, "aliases", "set", "chat", MODEL_B)
    header, rows = _table(_ok(capsys, "models"))
    assert header == [
        "MODEL",
        "ALIASES",
        "CTX",
        "WORKERS",
        "QUEUED",
        "QUEUED_TOKENS",
        "EST_WAIT",
        "FACTOR",
        "SOURCE",
    ]
    assert rows[MODEL_A] == [
        MODEL_A,
        "-",
        "2048",
        "colocated=1/1",
        "0",
        "0",
        "-",
        "1",
        "unmeasured",
    ]
    assert rows[MODEL_B][:4] == [MODEL_B, "chat", "4096", "colocated=1/1"]
    [handle] = [h for h in cli_served.registry.handles if h.url == URL_B]
    cli_served.registry.drain(handle)  # (read by the server's loop at the next request)
    assert _table(_ok(capsys, "models"))[1][MODEL_B][3] == "colocated=0/1"
    listed = json.loads(_ok(capsys, "--json", "models"))
    assert [m["model"] for m in listed["data"]] == [MODEL_B, MODEL_A]


def test_set_cost_sets_a_factor_and_measured_clears_it(
    cli_served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    _, rows = _table(_ok(capsys, "models", "set-cost", MODEL_B, "0.5"))
    assert rows[MODEL_B][-2:] == ["0.5", "admin"]
    assert cli_served.parts.costs.cost(MODEL_B).factor == 0.5
    status = json.loads(_ok(capsys, "--json", "models", "set-cost", MODEL_B, "measured"))
    assert (status["cost_factor"], status["cost_source"]) == (1.0, "unmeasured")
    assert cli_served.parts.costs.cost(MODEL_B).source == "unmeasured"
    assert cli_served.changes == [AdminChange("models")] * 2
    code, _, err = _cli(capsys, "models", "set-cost", "no-such-model", "2")
    assert code == 1 and "HTTP 404" in err
    code, _, err = _cli(capsys, "models", "set-cost", MODEL_B, "500")
    assert code == 1 and "HTTP 400" in err and "cost_factor" in err
    with pytest.raises(SystemExit) as exited:
        _cli(capsys, "models", "set-cost", MODEL_B, "cheap")
    assert exited.value.code == 2
    assert "'cheap' is not a number or 'measured'" in capsys.readouterr().err


def test_aliases_set_list_move_and_delete(
    cli_served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = _table(_ok(capsys, "aliases", "set", "team/chat", MODEL_A))
    assert header == ["ALIAS", "MODEL_ID", "UPDATED_AT"]
    assert rows["team/chat"][:2] == ["team/chat", MODEL_A]
    assert rows["team/chat"][2].endswith("Z")  # a UTC time, not seconds since 1970
    _ok(capsys, "aliases", "set", "team/chat", MODEL_B)
    assert cli_served.parts.catalog.resolve("team/chat", []).model_id == MODEL_B
    assert _table(_ok(capsys, "aliases"))[1]["team/chat"][1] == MODEL_B
    assert _ok(capsys, "aliases", "delete", "team/chat").strip() == "deleted alias team/chat"
    assert json.loads(_ok(capsys, "--json", "aliases", "list")) == {"data": [], "object": "list"}
    code, _, err = _cli(capsys, "aliases", "set", MODEL_A, MODEL_B)
    assert code == 1 and "HTTP 409" in err
    code, _, err = _cli(capsys, "aliases", "set", "x", "gpt-4")
    assert code == 1 and "HTTP 400" in err and MODEL_A in err
    code, _, err = _cli(capsys, "aliases", "delete", "team/chat")
    assert code == 1 and "HTTP 404" in err


def test_tenants_take_allowed_models_and_per_model_quotas(
    cli_served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    created = json.loads(
        _ok(
            capsys,
            "--json",
            "tenants",
            "create",
            "beta",
            "--models",
            f"chat,{MODEL_A}",
            "--model-quota",
            f"{MODEL_A}:tokens_per_minute=1000",
            "--model-quota",
            f"{MODEL_A}:rpm=5",
            "--model-quota",
            "llama3:8b:budget=100",  # a model id with a colon
        )
    )
    assert created["allowed_models"] == ["chat", MODEL_A]
    quotas = created["model_quotas"]
    assert set(quotas) == {MODEL_A, "llama3:8b"}
    limits = ("tokens_per_minute", "requests_per_minute", "token_budget")
    assert [quotas[MODEL_A][f] for f in limits] == [1000, 5, None]
    assert quotas["llama3:8b"]["token_budget"] == 100

    # Merged: one limit changed, one removed; a model left with none goes.
    updated = json.loads(
        _ok(
            capsys,
            "--json",
            "tenants",
            "update",
            "beta",
            "--model-quota",
            f"{MODEL_A}:requests_per_minute=7",
            "--model-quota",
            f"{MODEL_A}:tpm=none",
            "--model-quota",
            "llama3:8b:token_budget=none",
        )
    )
    assert updated["allowed_models"] == ["chat", MODEL_A]  # not given: kept
    assert list(updated["model_quotas"]) == [MODEL_A]
    assert [updated["model_quotas"][MODEL_A][f] for f in limits] == [None, 7, None]
    header, rows = _table(_ok(capsys, "tenants", "show", "beta"))
    assert header[-2:] == ["MODELS", "MODEL_QUOTAS"]
    assert rows[updated["tenant_id"]][-2:] == [
        f"chat,{MODEL_A}",
        f"{MODEL_A}:requests_per_minute=7,budget_period=month",
    ]
    for every in ("all", ""):
        cleared = json.loads(_ok(capsys, "--json", "tenants", "update", "beta", "--models", every))
        assert cleared["allowed_models"] == []
    assert _table(_ok(capsys, "tenants", "show", "beta"))[1][updated["tenant_id"]][-2] == "all"


@pytest.mark.parametrize(
    "quota", ["tiny-model=5", "tiny-model:speed=5", ":rpm=5", "m:rpm=lots", "m:budget_period=year"]
)
def test_a_malformed_model_quota_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], quota: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        _cli(capsys, "tenants", "create", "x", "--model-quota", quota)
    assert exited.value.code == 2
    assert "--model-quota" in capsys.readouterr().err


def test_the_workers_table_names_each_workers_model(
    cli_served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = _table(_ok(capsys, "workers"))
    assert header[:6] == ["URL", "ROLE", "STATE", "SOURCE", "MODEL_ID", "WORKER_ID"]
    assert rows[URL_B][:5] == [URL_B, "colocated", "ready", "config", MODEL_B]


def test_the_model_commands_say_what_they_do(capsys: pytest.CaptureFixture[str]) -> None:
    from deploy.cli import main

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--help"])
        assert exited.value.code == 0
        return capsys.readouterr().out

    assert "aliases" in help_of("admin") and "models" in help_of("admin")
    listing = help_of("admin", "models")
    for word in ("set-cost", "aliases", "CTX", "ready/total", "estimated wait", "measured"):
        assert word in listing
    set_cost = help_of("admin", "models", "set-cost")
    assert "FACTOR|measured" in set_cost and "0.01 to 100" in set_cost
    aliases = help_of("admin", "aliases")
    for word in ("set", "delete", "moves"):
        assert word in aliases
    for action in ("create", "update"):
        flags = help_of("admin", "tenants", action)
        for word in ("--models", "'all'", "--model-quota", "MODEL:FIELD=N", "tokens_per_minute"):
            assert word in flags
