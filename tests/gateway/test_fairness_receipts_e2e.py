"""Fairness receipts and the fairness and per-worker metrics on the real stack: worker and gateway
processes on loopback, the null engine made slow enough at decoding (and its batch small
enough) that two tenants, of weights 1 and 2, each keeping more requests in flight than the
workers take, stay backlogged in the gateway's queue throughout; VTC orders them.

The receipt over the load's last seconds must then show each tenant entitled to exactly its
weight's share (1/3 and 2/3: both backlogged in every sample), received close to it, and the
largest service gap within VTC's bound. ``/metrics`` says the same weights and shares, counts
each prefill on the prefill worker, and none of its label values comes from a client's text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.fairness_bench import fairness_gateway_args
from bench.tenant_load import StackAccess, TenantLoad, run_closed_loop
from deploy.stack import Stack
from gateway.config import DEFAULT_SLO_CLASSES
from tests.gateway.conftest import start_test_stack

LOAD_S = 10.0
PROBE_AT_S = 9.0  # the receipts and the scrape, 9 s into the load: over its last 5 s
WINDOW = "5s"
CONCURRENCY = 16  # per tenant: 32 in flight against a decode batch of 8
MAX_TOKENS = 16
HOSTILE = "zq-hostile-label"  # in a request's model and class: in no label value

NEW_FAMILIES = (
    "fairgate_tenant_service_units",
    "fairgate_tenant_weight",
    "fairgate_tenant_backlogged",
    "fairgate_tenant_entitled_share",
    "fairgate_tenant_service_share",
    "fairgate_tenant_entitled_share_window",
    "fairgate_tenant_queue_depth",
    "fairgate_backend_worker_state",
    "fairgate_backend_batch_size",
    "fairgate_backend_kv_blocks_used",
    "fairgate_backend_kv_blocks_total",
    "fairgate_backend_prompt_tokens",
    "fairgate_backend_cached_tokens",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("receipts")
    started = start_test_stack(
        state_dir,
        # A decode step of 20 ms and 8 sequences: about 25 requests a second, a load the
        # shared machine's cores carry, with a queue in the gateway.
        worker_args=["--log-level", "warning", "--max-num-seqs", "8"],
        gateway_args=fairness_gateway_args(state_dir, "vtc"),  # no queue-wait refusals
        env={"FAIRGATE_NULL_DECODE_STEP_S": "0.02"},
    )
    try:
        yield started
    finally:
        started.stop()


def admin(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.base_url,
        headers={"authorization": f"Bearer {stack.admin_token}"},
        timeout=10.0,
    )


@pytest.fixture(scope="module")
def measured(stack: Stack) -> dict[str, Any]:
    """The two tenants' receipts and a scrape, taken while both are backlogged."""
    found: dict[str, Any] = {}

    async def probe(now: Callable[[], float]) -> None:
        await asyncio.sleep(PROBE_AT_S - now())
        async with admin(stack) as client:
            for name in ("rcpt-w1", "rcpt-w2"):
                answer = await client.get(
                    f"/admin/v1/tenants/{name}/fairness", params={"window": WINDOW}
                )
                assert answer.status_code == 200, answer.text
                found[name] = answer.json()
            found["metrics"] = (await client.get("/metrics")).text

    loads = [TenantLoad("rcpt-w1", 1.0, CONCURRENCY), TenantLoad("rcpt-w2", 2.0, CONCURRENCY)]
    access = StackAccess(stack.base_url, stack.admin_token)
    run = asyncio.run(run_closed_loop(access, loads, LOAD_S, max_tokens=MAX_TOKENS, during=probe))
    assert "metrics" in found, "the probe did not run"
    found["completed"] = len(run.completions)
    found["refused"] = run.refused
    return found


def test_the_receipts_show_the_weights_shares_and_a_gap_within_the_bound(
    measured: dict[str, Any],
) -> None:
    w1, w2 = measured["rcpt-w1"], measured["rcpt-w2"]
    print({"w1": w1, "w2": w2, "completed": measured["completed"]})
    assert measured["refused"] == {"rcpt-w1": 0, "rcpt-w2": 0}
    for receipt, weight, entitled in ((w1, 1.0, 1 / 3), (w2, 2.0, 2 / 3)):
        assert receipt["weight"] == weight
        assert 3.5 <= receipt["seconds"] <= 5.0  # samples about a second apart
        assert receipt["end"] - receipt["start"] == pytest.approx(receipt["seconds"], abs=0.1)
        # Backlogged throughout, with the other one: exactly the weight's share.
        assert receipt["backlogged_s"] == pytest.approx(receipt["seconds"])
        assert receipt["entitled_share"] == pytest.approx(entitled)
        assert receipt["received_share"] == pytest.approx(entitled, abs=0.08)
        assert receipt["service_units"] > 0
        assert receipt["policy"] == "vtc"
        assert receipt["bound_formula"].startswith("VTC: 2·U")
        assert "all prompt tokens" in receipt["measure"]  # VTC's charge, which its bound is in
    gap = w1["max_gap"]
    assert gap["tenant"] == "rcpt-w2"
    assert w2["max_gap"]["tenant"] == "rcpt-w1"
    assert w2["max_gap"]["units"] == pytest.approx(gap["units"])
    assert 0 < gap["units"] <= w1["bound"]
    assert w1["within_bound"] is True and w2["within_bound"] is True
    # 2U, U = w_in·L_input + w_out·M at least the longest prompt: a bound, not a placeholder.
    assert w1["bound"] >= 2 * 1000


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_the_metrics_agree_with_the_receipts(measured: dict[str, Any], stack: Stack) -> None:
    found = families(measured["metrics"])

    def by_tenant(name: str) -> dict[str, float]:
        return {labels["tenant"]: value for labels, value in found[name]}

    assert by_tenant("fairgate_tenant_weight") == {"rcpt-w1": 1.0, "rcpt-w2": 2.0}
    assert by_tenant("fairgate_tenant_backlogged") == {"rcpt-w1": 1.0, "rcpt-w2": 1.0}
    assert by_tenant("fairgate_tenant_entitled_share") == pytest.approx(
        {"rcpt-w1": 1 / 3, "rcpt-w2": 2 / 3}
    )
    # Both backlogged over the whole window: the window's entitled share is the weight's.
    assert by_tenant("fairgate_tenant_entitled_share_window") == pytest.approx(
        {"rcpt-w1": 1 / 3, "rcpt-w2": 2 / 3}, abs=0.02
    )
    shares = by_tenant("fairgate_tenant_service_share")
    assert shares["rcpt-w1"] == pytest.approx(1 / 3, abs=0.08)
    assert shares["rcpt-w1"] + shares["rcpt-w2"] == pytest.approx(1.0)
    served = by_tenant("fairgate_tenant_service_units")
    assert served["rcpt-w1"] >= measured["rcpt-w1"]["service_units"] > 0
    queued = {
        (labels["tenant"], labels["slo_class"])
        for labels, _ in found["fairgate_tenant_queue_depth"]
    }
    assert ("rcpt-w1", "standard") in queued
    states = {
        (labels["role"], labels["state"]) for labels, _ in found["fairgate_backend_worker_state"]
    }
    assert states == {("prefill", "ready"), ("decode", "ready")}
    prompt = {labels["role"]: v for labels, v in found["fairgate_backend_prompt_tokens"]}
    cached = {labels["role"]: v for labels, v in found["fairgate_backend_cached_tokens"]}
    assert set(prompt) == {"prefill"}  # a disaggregated stack: prefills on the prefill worker
    assert 0 <= cached["prefill"] <= prompt["prefill"]
    assert prompt["prefill"] > 10 * measured["completed"]  # every request's prompt, and more
    batch = {labels["role"]: v for labels, v in found["fairgate_backend_batch_size"]}
    assert 0 <= batch["decode"] <= 8
    total = {labels["role"]: v for labels, v in found["fairgate_backend_kv_blocks_total"]}
    used = {labels["role"]: v for labels, v in found["fairgate_backend_kv_blocks_used"]}
    assert 0 <= used["decode"] <= total["decode"]


async def test_no_label_value_comes_from_a_clients_text(
    measured: dict[str, Any], stack: Stack
) -> None:
    async with admin(stack) as client:
        tenant = await client.post("/admin/v1/tenants", json={"name": "rcpt-hostile"})
        assert tenant.status_code == 201, tenant.text
        key = await client.post("/admin/v1/tenants/rcpt-hostile/keys", json={})
        secret = key.json()["secret"]
        models = await client.get("/admin/v1/models")
        model = models.json()["data"][0]["model"]
        as_tenant = {"authorization": f"Bearer {secret}"}
        for body, headers in (
            ({"model": HOSTILE, "prompt": HOSTILE, "max_tokens": 2}, {}),
            ({"model": model, "prompt": HOSTILE, "max_tokens": 2}, {"x-fairgate-class": HOSTILE}),
            ({"model": model, "prompt": HOSTILE, "max_tokens": 2, "user": HOSTILE}, {}),
        ):
            await client.post("/v1/completions", json=body, headers=as_tenant | headers)
        text = (await client.get("/metrics")).text
        workers = (await client.get("/admin/v1/workers")).json()["data"]
    allowed = (
        {"rcpt-w1", "rcpt-w2", "rcpt-hostile", model, "", "prefill", "decode"}
        | {c.name for c in DEFAULT_SLO_CLASSES}
        | {w["worker_id"] for w in workers}
        | {w["url"] for w in workers}
        | {"unknown", "ready", "draining", "drained", "not_ready", "ejected", "dead"}
    )
    found = families(text)
    for name in NEW_FAMILIES:
        for labels, _ in found[name]:
            assert set(labels.values()) <= allowed, (name, labels)
    assert HOSTILE not in text


async def test_the_window_is_checked_and_the_route_is_documented(stack: Stack) -> None:
    async with admin(stack) as client:
        for window in ("2h", "3601s", "0s", "5", "5 m", "1d", "-5m"):
            answer = await client.get(
                "/admin/v1/tenants/rcpt-w1/fairness", params={"window": window}
            )
            assert answer.status_code == 400, (window, answer.text)
            assert answer.json()["error"]["param"] == "window"
        for window in ("60m", "1h", "3600s"):
            answer = await client.get(
                "/admin/v1/tenants/rcpt-w1/fairness", params={"window": window}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["window_s"] == 3600.0
        default = await client.get("/admin/v1/tenants/rcpt-w1/fairness")
        assert default.json()["window_s"] == 300.0
        assert (await client.get("/admin/v1/tenants/nobody/fairness")).status_code == 404
        document = (await client.get("/openapi.json")).json()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10.0) as anonymous:
        answer = await anonymous.get("/admin/v1/tenants/rcpt-w1/fairness")
        assert answer.status_code == 401
    route = document["paths"]["/admin/v1/tenants/{tenant}/fairness"]["get"]
    assert [p["name"] for p in route["parameters"]] == ["tenant", "window"]
    assert "FairnessReceipt" in document["components"]["schemas"]


async def test_a_renamed_tenants_series_follow_it_and_a_deleted_ones_go(
    measured: dict[str, Any], stack: Stack
) -> None:
    """Through the admin API: a rename moves the tenant's series to its new name (the
    gateway reads it from the store); a deleted tenant's go, and a new tenant of its name has
    one series per name."""

    async def serve_one(client: httpx.AsyncClient, tenant: str) -> None:
        key = await client.post(f"/admin/v1/tenants/{tenant}/keys", json={})
        assert key.status_code == 201, key.text
        model = (await client.get("/admin/v1/models")).json()["data"][0]["model"]
        answer = await client.post(
            "/v1/completions",
            json={"model": model, "prompt": "hello", "max_tokens": 2},
            headers={"authorization": f"Bearer {key.json()['secret']}"},
        )
        assert answer.status_code == 200, answer.text

    async def service_lines(client: httpx.AsyncClient) -> list[str]:
        text = (await client.get("/metrics")).text
        return [
            line.rsplit(" ", 1)[0]
            for line in text.splitlines()
            if line.startswith("fairgate_tenant_service_units_total{")
        ]

    async with admin(stack) as client:
        created = await client.post("/admin/v1/tenants", json={"name": "rcpt-old"})
        assert created.status_code == 201, created.text
        await serve_one(client, "rcpt-old")
        assert 'fairgate_tenant_service_units_total{tenant="rcpt-old"}' in await service_lines(
            client
        )
        renamed = await client.patch("/admin/v1/tenants/rcpt-old", json={"name": "rcpt-new"})
        assert renamed.status_code == 200, renamed.text
        for _ in range(50):  # the name is read from the store in a task: at once, nearly
            lines = await service_lines(client)
            if 'fairgate_tenant_service_units_total{tenant="rcpt-new"}' in lines:
                break
            await asyncio.sleep(0.1)
        assert 'fairgate_tenant_service_units_total{tenant="rcpt-new"}' in lines
        assert 'fairgate_tenant_service_units_total{tenant="rcpt-old"}' not in lines
        deleted = await client.delete("/admin/v1/tenants/rcpt-new")
        assert deleted.status_code in (200, 204), deleted.text
        again = await client.post("/admin/v1/tenants", json={"name": "rcpt-new"})
        assert again.status_code == 201, again.text
        await serve_one(client, "rcpt-new")
        lines = await service_lines(client)
    assert lines.count('fairgate_tenant_service_units_total{tenant="rcpt-new"}') == 1, lines
    assert len(lines) == len(set(lines)), lines
