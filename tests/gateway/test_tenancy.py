"""Tenants, keys, quotas and usage end to end: the admin CLI against a real stack, each quota kind
enforced (with ``Retry-After``), ``demote`` serving instead of rejecting, admin changes applied at
once, and the admin API closed to tenant keys."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from deploy.stack import Stack
from gateway.app import Gateway, create_app
from gateway.config import load_config
from tests.gateway.conftest import run_admin_cli

NewTenant = Callable[..., tuple[dict[str, Any], str]]


def _client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def _ask(stack: Stack, key: str, max_tokens: int = 4, **kwargs: Any) -> Any:
    """One chat request; a stream is read to its end here."""
    with _client(stack, key) as client:
        answer = client.chat.completions.create(
            model="null",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=max_tokens,
            **kwargs,
        )
        return list(answer) if kwargs.get("stream") else answer


def test_admin_cli_tenant_lifecycle_with_tables(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def cli(*argv: str) -> str:
        code, out, err = run_admin_cli(stack, capsys, monkeypatch, *argv)
        assert code == 0, err
        return out

    out = cli(
        "tenants", "create", "acme", "--weight", "2", "--rpm", "100", "--over-quota", "demote"
    )
    assert out.splitlines()[0].split() == [
        "TENANT_ID",
        "NAME",
        "WEIGHT",
        "DEFAULT_CLASS",
        "OVER_QUOTA",
        "QUOTAS",
        "MODELS",
        "MODEL_QUOTAS",
    ]
    assert "acme" in out and "demote" in out and "requests_per_minute=100" in out
    out = cli("keys", "create", "acme", "--name", "ci")
    secret = out.split("store it now): ")[1].strip()
    assert secret.startswith("fg-") and len(secret) > 40
    assert secret[:11] in cli("keys", "list", "--prefix", secret[:11])
    out = cli("tenants", "update", "acme", "--tpm", "5000", "--weight", "3")
    assert "requests_per_minute=100" in out and "tokens_per_minute=5000" in out
    assert "acme" in cli("tenants", "list")
    _ask(stack, secret)
    out = cli("usage", "acme", "--period", "day")
    assert out.splitlines()[0].split()[:2] == ["PERIOD", "REQUESTS"]
    assert "ready" in cli("workers")
    assert "deleted tenant acme" in cli("tenants", "delete", "acme")
    code, _, err = run_admin_cli(stack, capsys, monkeypatch, "tenants", "show", "acme")
    assert code == 1 and "HTTP 404" in err
    with pytest.raises(openai.AuthenticationError):
        _ask(stack, secret)  # its keys went with it


def test_admin_cli_reports_conflicts_and_bad_classes(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_admin_cli(stack, capsys, monkeypatch, "tenants", "create", "dup")[0] == 0
    code, _, err = run_admin_cli(stack, capsys, monkeypatch, "tenants", "create", "dup")
    assert code == 1 and "HTTP 409" in err
    code, _, err = run_admin_cli(
        stack, capsys, monkeypatch, "tenants", "create", "x1", "--allowed-classes", "gold"
    )
    assert code == 1 and "gold" in err and "HTTP 400" in err


def test_admin_api_needs_the_admin_token(stack: Stack) -> None:
    url = stack.base_url + "/admin/v1/tenants"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    response = httpx.get(url, headers={"authorization": f"Bearer {stack.demo_key}"})
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_requests_per_minute(stack: Stack, new_tenant: NewTenant) -> None:
    _, key = new_tenant("--rpm", "2")
    _ask(stack, key)
    _ask(stack, key)
    with pytest.raises(openai.RateLimitError) as caught:
        _ask(stack, key)
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60


def test_tokens_per_minute_reserves_max_tokens(stack: Stack, new_tenant: NewTenant) -> None:
    _, key = new_tenant("--tpm", "200")
    _ask(stack, key, max_tokens=100)  # reserves prompt + 100, settles at prompt + 100
    with pytest.raises(openai.RateLimitError) as caught:
        _ask(stack, key, max_tokens=100)
    assert caught.value.code == "rate_limit_exceeded"
    assert "retry-after" in caught.value.response.headers


def test_concurrent_requests(stack: Stack, new_tenant: NewTenant) -> None:
    _, key = new_tenant("--concurrency", "1")
    started = threading.Event()
    done = threading.Event()

    def hold_one_open() -> None:
        with _client(stack, key) as client:
            stream = client.chat.completions.create(
                model="null",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=400,
                stream=True,
            )
            for _ in stream:
                started.set()
        done.set()

    holder = threading.Thread(target=hold_one_open)
    holder.start()
    try:
        assert started.wait(30)
        with pytest.raises(openai.RateLimitError) as caught:
            _ask(stack, key)
        assert "retry-after" in caught.value.response.headers
    finally:
        holder.join(60)
    assert done.is_set()
    _ask(stack, key)  # the slot is free again


def test_token_budget(stack: Stack, admin: Any, new_tenant: NewTenant) -> None:
    tenant, key = new_tenant("--budget", "60", "--budget-period", "day")
    first = _ask(stack, key, max_tokens=8)
    used = first.usage.total_tokens
    assert used < 60
    with pytest.raises(openai.RateLimitError) as caught:
        _ask(stack, key, max_tokens=60)
    assert caught.value.code == "insufficient_quota"
    assert int(caught.value.response.headers["retry-after"]) <= 86400
    [row] = admin("usage", tenant["name"], "--period", "day")["data"]
    assert row["requests"] == 1
    assert row["prompt_tokens"] + row["completion_tokens"] == used


def test_demote_serves_instead_of_429(stack: Stack, new_tenant: NewTenant) -> None:
    _, key = new_tenant("--rpm", "1", "--over-quota", "demote")
    for _ in range(3):
        assert _ask(stack, key).choices[0].finish_reason == "length"


def test_quota_change_applies_at_once(stack: Stack, admin: Any, new_tenant: NewTenant) -> None:
    tenant, key = new_tenant("--rpm", "1")
    _ask(stack, key)
    with pytest.raises(openai.RateLimitError):
        _ask(stack, key)
    admin("tenants", "update", tenant["name"], "--unlimited", "rpm")
    _ask(stack, key)


def test_openapi_describes_both_apis(stack: Stack) -> None:
    document = httpx.get(stack.base_url + "/openapi.json").json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/admin/v1/tenants",
        "/admin/v1/tenants/{tenant}/keys",
        "/admin/v1/keys/{key_id}/revoke",
        "/admin/v1/tenants/{tenant}/usage",
        "/admin/v1/workers",
    ):
        assert path in paths, path
    chat = paths["/v1/chat/completions"]["post"]
    schema_ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert {"model", "messages", "max_tokens", "stream", "stop", "seed"} <= set(
        schema["properties"]
    )
    assert "429" in chat["responses"] and "text/event-stream" in chat["responses"]["200"]["content"]
    assert paths["/admin/v1/tenants"]["post"]["security"] == [{"adminToken": []}]


# ---- the admin API takes what its document says ----------------------------------------------


def _admin_client(stack: Stack) -> httpx.Client:
    headers = {"authorization": f"Bearer {stack.admin_token}"}
    return httpx.Client(base_url=stack.base_url, headers=headers, timeout=30)


def test_the_default_class_is_always_allowed(stack: Stack) -> None:
    # JSON Schema cannot say "one of the other field's items": the default is added instead.
    with _admin_client(stack) as client:
        body = {"name": "classy", "default_class": "batch", "allowed_classes": ["interactive"] * 2}
        created = client.post("/admin/v1/tenants", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["allowed_classes"] == ["interactive", "batch"]
        patched = client.patch("/admin/v1/tenants/classy", json={"allowed_classes": ["standard"]})
        assert patched.json()["allowed_classes"] == ["standard", "batch"]
        patched = client.patch("/admin/v1/tenants/classy", json={"default_class": "interactive"})
        assert patched.json()["default_class"] == "interactive"
        assert patched.json()["allowed_classes"] == ["standard", "batch", "interactive"]


def test_integer_fields_take_integral_numbers(stack: Stack) -> None:
    # JSON Schema reads 5.0 as an integer, so the document takes it: so does the gateway.
    quotas = {"requests_per_minute": 5.0, "token_budget": 1e6}
    with _admin_client(stack) as client:
        created = client.post("/admin/v1/tenants", json={"name": "floaty", "quotas": quotas})
        assert created.status_code == 201, created.text
        assert '"requests_per_minute":5,' in created.text
        assert created.json()["quotas"]["token_budget"] == 1_000_000
        for refused in (5.5, 0, 2**63):
            answer = client.patch(
                "/admin/v1/tenants/floaty", json={"quotas": {"requests_per_minute": refused}}
            )
            assert answer.status_code == 400, refused
            assert answer.json()["error"]["param"] == "quotas"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": "fine", "colour": "red"}, "colour"),
        ({"name": "line\n"}, "name"),  # Python's $ matches before a final newline; \Z does not
        ({"name": ".."}, "name"),  # a path segment that clients resolve away
        ({"name": "-flag"}, "name"),
        ({"name": "light", "weight": 1e-9}, "weight"),  # 1 / weight overflows the counters
        ({"name": "gilded", "allowed_classes": ["gold"]}, "allowed_classes"),
        ({"name": "gilded", "default_class": "gold"}, "default_class"),
        ({"name": "quoted", "quotas": {"tokens_per_minute": "many"}}, "quotas"),
    ],
)
def test_admin_refusals_name_their_field(stack: Stack, body: dict[str, Any], param: str) -> None:
    with _admin_client(stack) as client:
        answer = client.post("/admin/v1/tenants", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "not valid JSON" not in error["message"]


@pytest.mark.parametrize(("at", "status"), [("2025-01", 200), ("2025-13-45", 200), ("soon", 400)])
def test_usage_period_names_are_checked(stack: Stack, at: str, status: int) -> None:
    with _admin_client(stack) as client:
        answer = client.get("/admin/v1/tenants/demo/usage", params={"period": "day", "at": at})
    assert answer.status_code == status, answer.text
    if status == 200:  # a period with nothing recorded, of either kind: one row of zeros
        [row] = answer.json()["data"]
        assert (row["period"], row["requests"]) == (at, 0)
    else:
        assert answer.json()["error"]["param"] == "at"


def test_a_path_or_method_with_no_route_gets_a_json_error(tmp_path: Path) -> None:
    """Starlette's own 404 and 405 are plain text; the gateway answers every request with
    OpenAI's error body (the schema fuzz found a worker path with a newline in it)."""
    config = load_config(
        environ={},
        overrides={
            "gateway": {"admin_token": "a" * 32},
            "store": {"path": str(tmp_path / "fairgate.db")},
            "model": {"name": "null"},
        },
    )
    admin = {"authorization": "Bearer " + "a" * 32}
    with TestClient(create_app(Gateway(config))) as client:
        for method, path, status in (
            ("GET", "/no/such/route", 404),
            ("POST", "/admin/v1/workers/a%0Ab/undrain", 404),
            ("DELETE", "/v1/chat/completions", 405),
        ):
            answer = client.request(method, path, headers=admin)
            assert answer.status_code == status, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert answer.json()["error"]["type"] in ("not_found_error", "invalid_request_error")
            if status == 405:
                assert "POST" in answer.headers["allow"]
