"""``LoadGuard``: the event loop's lag says when the gateway is over capacity, and then the
tenants holding their weighted share of its requests are refused, not the others; and the
gatekeeper refuses before it reads a body (a real gateway over a raw socket)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from deploy.stack import Stack
from gateway.app import Gateway, create_app
from gateway.config import load_config
from gateway.errors import retry_after_header
from gateway.overload import LoadGuard, Overloaded
from tests.gateway.conftest import answer_without_body


async def _until(condition: object, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)


async def test_the_loop_lagging_for_a_while_is_overload_and_a_short_stall_is_not() -> None:
    # A limit well above what a busy test machine's loop hiccups by.
    guard = LoadGuard(max_loop_lag_s=0.2)
    await guard.start()
    try:
        await asyncio.sleep(0.05)
        assert not guard.is_overloaded
        time.sleep(0.01)  # a stall under the limit
        await asyncio.sleep(0.02)
        assert not guard.is_overloaded
        # The loop held for longer than the limit (and the window): the next sample says so.
        time.sleep(0.3)
        await _until(lambda: guard.is_overloaded)
        # Once a sample is on time again, it is over.
        await _until(lambda: not guard.is_overloaded)
    finally:
        await guard.stop()


def _overloaded(guard: LoadGuard) -> None:
    guard._late_since = time.monotonic() - 1.0  # as the sampler leaves it under a long lag


def test_a_tenant_over_its_weighted_share_is_refused_only_while_overloaded() -> None:
    guard = LoadGuard(max_loop_lag_s=0.05)
    for _ in range(6):
        guard.enter("flood", 1.0)
    guard.enter("calm", 1.0)
    guard.enter("heavy", 2.0)
    # Not overloaded: nobody is refused, whatever they hold.
    guard.enter("flood", 1.0)
    guard.leave("flood")
    _overloaded(guard)
    # 8 requests in, weights 1 + 1 + 2: flood's share is 2, it holds 6.
    with pytest.raises(Overloaded) as raised:
        guard.enter("flood", 1.0)
    assert (raised.value.status, raised.value.code) == (503, "overloaded")
    assert retry_after_header(raised.value) == {"retry-after": "1"}
    guard.enter("calm", 1.0)  # holds 1 of a share of 2
    guard.enter("heavy", 2.0)  # holds 1 of a share of 4.5 (9 in, weight 2 of 4)
    guard.enter("newcomer", 1.0)  # holds nothing
    # A tenant alone holds all of the gateway's requests: its share, so it is refused too.
    alone = LoadGuard(max_loop_lag_s=0.05)
    alone.enter("only", 1.0)
    _overloaded(alone)
    with pytest.raises(Overloaded):
        alone.enter("only", 1.0)


def test_leaving_forgets_a_tenant_with_nothing_in_the_gateway() -> None:
    guard = LoadGuard(max_loop_lag_s=0.05)
    guard.enter("a", 3.0)
    guard.enter("a", 3.0)
    guard.leave("a")
    guard.leave("a")
    guard.enter("b", 1.0)
    _overloaded(guard)
    # "a" is gone: "b" holds the one request in, which is all of its share.
    with pytest.raises(Overloaded):
        guard.enter("b", 1.0)


def test_the_gatekeeper_refuses_before_reading_the_body(stack: Stack) -> None:
    """A request announcing a megabyte and sending none of it is answered at once: its key is
    checked before its body is read (so is everything else the gatekeeper refuses)."""
    answer = answer_without_body(stack, "/v1/chat/completions", "fg-not-a-key")
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b'"code":"invalid_api_key"' in answer


def test_an_overloaded_gateway_refuses_a_tenant_at_its_share_before_reading_the_body(
    tmp_path: Path,
) -> None:
    """A real gateway app (no workers needed: nothing gets past the gatekeeper) whose loop lag
    limit every sample exceeds: it is overloaded from its first 50 ms on, and a tenant's request
    is refused with 503 overloaded and Retry-After, counted in the metrics, and nothing is left
    counted in the gateway."""
    config = load_config(
        environ={},
        overrides={
            "gateway": {"admin_token": "a" * 32, "max_loop_lag_s": 1e-9},
            "store": {"path": str(tmp_path / "fairgate.db")},
            "model": {"name": "null"},
        },
    )
    gateway = Gateway(config)
    admin = {"authorization": "Bearer " + "a" * 32}
    with TestClient(create_app(gateway)) as client:
        assert client.post("/admin/v1/tenants", json={"name": "t"}, headers=admin).is_success
        key = client.post("/admin/v1/tenants/t/keys", json={"name": "k"}, headers=admin)
        tenant = {"authorization": f"Bearer {key.json()['secret']}"}
        deadline = time.monotonic() + 5.0
        while not gateway.load_guard.is_overloaded:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answer = client.post("/v1/chat/completions", content=b"not even JSON", headers=tenant)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "overloaded"
        assert answer.headers["retry-after"] == "1"
        assert gateway.load_guard.num_requests == 0
        metrics = client.get("/metrics", headers=admin).text
        assert 'reason="overloaded"' in metrics
