"""The dashboard's login, session and figures in process: the real gateway app (``create_app``)
over SQLite, its worker a ``ScriptedWorker``, called through ``httpx.ASGITransport``; the event
stream driven as an ASGI server drives it. The browser's view is in
``test_dashboard_browser.py``.

- The admin token goes in a POSTed form, never in a URL, and never into the cookie: the cookie
  is ``expiry.nonce.mac``; a wrong token gets the form again with 401; a forged, expired or
  other-token cookie gets nothing; logout drops the cookie.
- Every route with figures wants the session; the figures are /metrics's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway, create_app
from gateway.config import load_config
from gateway.dashboard import EVENT_INTERVAL_S, SESSION_COOKIE, SessionSigner
from gateway.dashboard_snapshot import Throughput
from tests.gateway.scripted_transport import Answer, ScriptedTransport, ScriptedWorker

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_TOKEN = "dashboard-admin-token-" + "z" * 16
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
WORKER_URL = "http://scripted-worker:8201"
# A model id (a label value the page shows) that would be markup if the page did not escape it.
MODEL = 'scripted</script><img src=x onerror="alert(1)">&'
FORM = {"content-type": "application/x-www-form-urlencoded"}


class Served:
    def __init__(self, app: Any, gateway: Gateway, worker: ScriptedWorker) -> None:
        self.app = app
        self.gateway = gateway
        self.worker = worker

    def client(self, base_url: str = "http://gateway.test") -> httpx.AsyncClient:
        """A client of its own (its own cookie jar)."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=base_url)

    @contextlib.asynccontextmanager
    async def logged_in(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client of its own, with a session."""
        async with self.client() as client:
            answer = await client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
            assert answer.status_code == 303, answer.text
            yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    config = load_config(
        environ={},
        overrides={
            "gateway": {
                "admin_token": ADMIN_TOKEN,
                "colocated_workers": [WORKER_URL],
                "max_loop_lag_s": 10.0,
            },
            "store": {"path": str(tmp_path_factory.mktemp("store") / "fairgate.db")},
            "model": {"name": "null"},
        },
    )
    worker = ScriptedWorker(WORKER_URL, MODEL)
    gateway = Gateway(config, transport=ScriptedTransport(worker))
    app = create_app(gateway)
    async with app.lifespan():
        # The registry's first poll makes the worker known (and ready).
        async with asyncio.timeout(10):
            while not gateway.registry.can_serve():
                await asyncio.sleep(0.02)
        yield Served(app, gateway, worker)


def _set_cookie(answer: httpx.Response) -> str:
    [header] = answer.headers.get_list("set-cookie")
    return header


def _cookie_attributes(header: str) -> dict[str, str]:
    parts = [p.strip() for p in header.split(";")]
    return {p.split("=", 1)[0].lower(): [*p.split("=", 1), ""][1] for p in parts[1:]}


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# ---- login ----------------------------------------------------------------------------------


async def test_without_a_session_the_dashboard_is_a_login_form_that_posts_the_token(
    served: Served,
) -> None:
    async with served.client() as client:
        answer = await client.get("/dashboard")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    page = answer.text
    assert 'data-view="login"' in page
    assert re.search(r'<form method="post" action="/dashboard/login"', page)
    assert re.search(r'<input id="token" name="token" type="password"', page)
    assert 'data-view="dashboard"' not in page
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert answer.headers["cache-control"] == "no-store"


async def test_a_wrong_token_gets_the_form_again_with_401_and_no_cookie(served: Served) -> None:
    async with served.client() as client:
        for body in (
            {"token": ADMIN_TOKEN + "x"},
            {"token": ""},
            {"token": ADMIN_TOKEN[:-1]},
            {"other": ADMIN_TOKEN},
        ):
            answer = await client.post("/dashboard/login", data=body)
            assert answer.status_code == 401, body
            assert 'data-view="login"' in answer.text
            assert "not the admin token" in answer.text
            assert "set-cookie" not in answer.headers
        # the token as JSON, or twice, is no form the login reads
        answer = await client.post("/dashboard/login", json={"token": ADMIN_TOKEN})
        assert answer.status_code == 401
        answer = await client.post(
            "/dashboard/login", content=f"token={ADMIN_TOKEN}&token={ADMIN_TOKEN}", headers=FORM
        )
        assert answer.status_code == 401
        # a token in the URL is never read
        answer = await client.post(f"/dashboard/login?token={ADMIN_TOKEN}", headers=FORM)
        assert answer.status_code == 401
        answer = await client.get(f"/dashboard?token={ADMIN_TOKEN}")
        assert 'data-view="login"' in answer.text
        assert not client.cookies


async def test_the_admin_token_gets_a_session_cookie_that_does_not_hold_it(
    served: Served,
) -> None:
    async with served.client() as client:
        answer = await client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/dashboard"  # no token in the URL it sends to
        header = _set_cookie(answer)
        name, _, value = header.split(";")[0].partition("=")
        assert name == SESSION_COOKIE
        assert ADMIN_TOKEN not in header and ADMIN_TOKEN.encode().hex() not in header
        expiry, nonce, mac = value.split(".")
        assert int(expiry) > time.time() + 3600 and len(nonce) == 32 and len(mac) == 64
        attributes = _cookie_attributes(header)
        assert attributes["path"] == "/dashboard"
        assert attributes["samesite"].lower() == "strict"
        assert "httponly" in attributes
        assert "secure" not in attributes  # this request came over plain http
        page = await client.get("/dashboard")
        assert page.status_code == 200
        assert 'data-view="dashboard"' in page.text
        assert ADMIN_TOKEN not in page.text
    # A second login is a different session (a fresh nonce).
    async with served.client() as client:
        again = await client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert _set_cookie(again).split(";")[0] != header.split(";")[0]


async def test_over_https_the_cookie_is_secure(served: Served) -> None:
    async with served.client("https://gateway.test") as client:
        answer = await client.post("/dashboard/login", data={"token": ADMIN_TOKEN})
        assert answer.status_code == 303
        assert "secure" in _cookie_attributes(_set_cookie(answer))


async def test_logout_drops_the_cookie(served: Served) -> None:
    async with served.logged_in() as client:
        assert (await client.get("/dashboard/snapshot.json")).status_code == 200
        answer = await client.post("/dashboard/logout")
        assert answer.status_code == 303
        attributes = _cookie_attributes(_set_cookie(answer))
        assert attributes["max-age"] == "0" and attributes["path"] == "/dashboard"
        assert not client.cookies
        assert (await client.get("/dashboard/snapshot.json")).status_code == 401
        assert 'data-view="login"' in (await client.get("/dashboard")).text


# ---- sessions -------------------------------------------------------------------------------


def _forged_cookies() -> dict[str, str]:
    good = SessionSigner(ADMIN_TOKEN).issue()
    expiry, nonce, mac = good.split(".")
    flipped = ("0" if mac[0] != "0" else "1") + mac[1:]
    return {
        "no cookie": "",
        "mac changed": f"{expiry}.{nonce}.{flipped}",
        "expiry moved": f"{int(expiry) + 3600}.{nonce}.{mac}",
        "nonce changed": f"{expiry}.{uuid.uuid4().hex}.{mac}",
        "another token's": SessionSigner("another-admin-token-0123456789").issue(),
        "expired": SessionSigner(ADMIN_TOKEN, clock=lambda: time.time() - 9 * 3600).issue(),
        "the token itself": ADMIN_TOKEN,
        "garbage": "....",
    }


@pytest.mark.parametrize("path", ["/dashboard/snapshot.json", "/dashboard/events"])
async def test_the_figures_need_a_valid_session(served: Served, path: str) -> None:
    for why, cookie in _forged_cookies().items():
        async with served.client() as client:
            if cookie:
                client.cookies.set(SESSION_COOKIE, cookie, domain="gateway.test")
            answer = await client.get(path, headers=ADMIN)  # the admin bearer token is no session
            assert answer.status_code == 401, why
            assert answer.json()["error"]["code"] == "no_session"
            page = await client.get("/dashboard")
            assert 'data-view="login"' in page.text, why


async def test_a_session_lasts_until_its_expiry_and_no_longer() -> None:
    now = [1_000_000.0]
    signer = SessionSigner(ADMIN_TOKEN, ttl_s=60, clock=lambda: now[0])
    value = signer.issue()
    assert signer.expiry(value) == 1_000_060.0
    now[0] += 59
    assert signer.is_valid(value)
    now[0] += 1
    assert not signer.is_valid(value)
    assert signer.is_admin_token(ADMIN_TOKEN)
    assert not signer.is_admin_token(ADMIN_TOKEN + " ")
    assert not signer.is_admin_token("")


# ---- figures --------------------------------------------------------------------------------


async def _a_served_request(served: Served, client: httpx.AsyncClient) -> str:
    """A new tenant with one request served: its name."""
    name = f"d-{uuid.uuid4().hex[:8]}"
    created = await client.post("/admin/v1/tenants", json={"name": name}, headers=ADMIN)
    assert created.status_code == 201, created.text
    key = await client.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=ADMIN)
    served.worker.answers.append(Answer((10, 11, 12, 13), "stop", num_cached_tokens=0))
    answer = await client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "one two three", "max_tokens": 8},
        headers={"authorization": f"Bearer {key.json()['secret']}"},
    )
    assert answer.status_code == 200, answer.text
    return name


async def test_the_snapshot_is_what_metrics_reports(served: Served) -> None:
    async with served.logged_in() as client:
        tenant = await _a_served_request(served, client)
        snapshot = (await client.get("/dashboard/snapshot.json")).json()
        metrics = _metrics((await client.get("/metrics", headers=ADMIN)).text)

    def sample(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    def tenant_sum(name: str) -> float:
        return sum(
            value
            for (n, labels), value in metrics.items()
            if n == name and (("tenant", tenant) in labels)
        )

    [row] = [t for t in snapshot["tenants"] if t["name"] == tenant]
    assert row["requests_ok"] == tenant_sum("fairgate_requests_total") == 1
    assert row["completion_tokens"] == tenant_sum("fairgate_completion_tokens_total") == 4
    assert row["fair_counter"] == sample("fairgate_fair_counter", tenant=tenant)
    assert row["queue_depth"] == sample("fairgate_queue_depth", tenant=tenant) == 0
    assert row["rejections"] == tenant_sum("fairgate_rejections_total") == 0
    assert row["service_units"] == sample("fairgate_tenant_service_units_total", tenant=tenant)
    assert row["service_units"] > 0
    assert row["weight"] == sample("fairgate_tenant_weight", tenant=tenant) == 1.0
    overall = snapshot["overall"]
    assert overall["completion_tokens"] == sum(
        v for (n, _), v in metrics.items() if n == "fairgate_completion_tokens_total"
    )
    [worker] = snapshot["workers"]
    assert (worker["role"], worker["model"], worker["state"]) == ("colocated", MODEL, "ready")
    labels = {"worker": worker["worker"], "role": "colocated", "model": MODEL}
    assert sample("fairgate_backend_worker_state", **labels, state="ready") == 1.0
    assert worker["kv_blocks_total"] == sample("fairgate_backend_kv_blocks_total", **labels)
    assert worker["batch"] == sample("fairgate_backend_batch_size", **labels)


async def test_label_values_cannot_break_out_of_the_page(served: Served) -> None:
    async with served.logged_in() as client:
        page = (await client.get("/dashboard")).text
    # The worker's model id is in the embedded snapshot, escaped: one </script> on the page,
    # the block's own; and the JSON reads back to the same id.
    assert page.count("</script>") == 2  # the script tag's and the JSON block's
    assert "<img" not in page
    block = page.split('<script type="application/json" id="initial-snapshot">')[1]
    snapshot = json.loads(block.split("</script>")[0])
    assert snapshot["workers"][0]["model"] == MODEL


# ---- the event stream -----------------------------------------------------------------------


async def test_events_send_a_snapshot_about_every_second_and_end_when_the_client_leaves(
    served: Served,
) -> None:
    cookie = SessionSigner(ADMIN_TOKEN).issue()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/dashboard/events",
        "raw_path": b"/dashboard/events",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gateway.test"), (b"cookie", f"{SESSION_COOKIE}={cookie}".encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("gateway.test", 80),
    }
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    leave = asyncio.Event()
    requested = [False]

    async def receive() -> dict[str, Any]:
        if not requested[0]:
            requested[0] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    task = asyncio.create_task(served.app(scope, receive, send))
    try:
        start = await asyncio.wait_for(sent.get(), 5)
        assert start["status"] == 200
        assert dict(start["headers"])[b"content-type"].startswith(b"text/event-stream")
        events: list[tuple[float, dict[str, Any]]] = []
        loop = asyncio.get_running_loop()
        while len(events) < 3:
            message = await asyncio.wait_for(sent.get(), 5 * EVENT_INTERVAL_S)
            body: bytes = message["body"]
            if body.startswith(b"data: "):
                events.append((loop.time(), json.loads(body.removeprefix(b"data: "))))
        seqs = [snapshot["seq"] for _, snapshot in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(events)]
        assert all(0.5 * EVENT_INTERVAL_S <= gap <= 3 * EVENT_INTERVAL_S for gap in gaps), gaps
        leave.set()
        await asyncio.wait_for(task, 5 * EVENT_INTERVAL_S)  # the stream ends
    finally:
        task.cancel()


async def test_throughput_is_the_token_counters_change_over_the_window() -> None:
    throughput = Throughput(window_s=10.0)
    assert throughput.observe(100.0, 0, 0) is None
    assert throughput.observe(101.0, 50, 200) == (50.0, 200.0)
    assert throughput.observe(105.0, 250, 200) == (50.0, 40.0)
    # the base: the last observation at or before the window's start (101 s)
    assert throughput.observe(111.0, 950, 200) == (90.0, 0.0)
