"""``/metrics`` on every process, read back through a real Prometheus server (Debian's
``prometheus``, fetched by ``deploy/prometheus.sh`` and started on loopback) scraping a real
stack (null engine): per-tenant series from the gateway, the workers' KV and transfer series."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack
from tests.observability.prometheus_server import PrometheusServer, Result, require_prometheus


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(tmp_path_factory.mktemp("metrics"))
    try:
        yield started
    finally:
        started.stop()


def _address(url: str) -> str:
    return urlsplit(url).netloc


async def _tenant(client: httpx.AsyncClient, stack: Stack, weight: float) -> tuple[str, str]:
    """A new tenant: (name, key)."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    name = f"m-{uuid.uuid4().hex[:8]}"
    created = await client.post(
        "/admin/v1/tenants", json={"name": name, "weight": weight}, headers=admin
    )
    assert created.status_code in (200, 201), created.text
    key = await client.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=admin)
    assert key.status_code in (200, 201), key.text
    return name, key.json()["secret"]


# Several KV blocks long, so that a tenant's later requests find its first blocks cached.
PROMPT = "count to ten, " * 16


async def _complete(
    client: httpx.AsyncClient, key: str, model: str, *, slo_class: str, max_tokens: int
) -> httpx.Response:
    return await client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "fairgate_class": slo_class,
        },
        headers={"authorization": f"Bearer {key}"},
    )


def _value(results: list[Result]) -> float:
    [result] = results
    return float(result["value"][1])


def test_per_tenant_series_reach_prometheus(stack: Stack, tmp_path: Path) -> None:
    async def drive() -> tuple[str, str, int]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as client:
            model = (
                await client.get(
                    "/v1/models", headers={"authorization": f"Bearer {stack.demo_key}"}
                )
            ).json()["data"][0]["id"]
            alpha, alpha_key = await _tenant(client, stack, 1.0)
            beta, beta_key = await _tenant(client, stack, 2.0)
            completion_tokens = 0
            for _ in range(3):
                response = await _complete(
                    client, alpha_key, model, slo_class="interactive", max_tokens=5
                )
                assert response.status_code == 200, response.text
                completion_tokens += response.json()["usage"]["completion_tokens"]
            answers = await asyncio.gather(
                *(
                    _complete(client, beta_key, model, slo_class="batch", max_tokens=7)
                    for _ in range(2)
                )
            )
            assert all(a.status_code == 200 for a in answers)
            refused = await client.post(
                "/v1/completions",
                json={"model": "no-such-model", "prompt": "x", "max_tokens": 1},
                headers={"authorization": f"Bearer {alpha_key}"},
            )
            assert refused.status_code == 404
            unauthenticated = await client.post(
                "/v1/completions", json={"model": model, "prompt": "x"}
            )
            assert unauthenticated.status_code == 401
            # /metrics names tenants: the admin token only.
            assert (await client.get("/metrics")).status_code == 401
            tenant_view = await client.get(
                "/metrics", headers={"authorization": f"Bearer {alpha_key}"}
            )
            assert tenant_view.status_code == 403
            return alpha, beta, completion_tokens

    alpha, beta, alpha_completion_tokens = asyncio.run(drive())
    gateway = _address(stack.base_url)
    prefill, decode = (_address(w.http_url) for w in stack.workers)
    with PrometheusServer(
        require_prometheus(),
        {"gateway": [gateway], "prefill": [prefill], "decode": [decode]},
        tmp_path / "prometheus",
        bearer_tokens={"gateway": stack.admin_token},
    ) as prometheus:
        ok = prometheus.wait_for(
            f'fairgate_requests_total{{job="gateway",tenant="{alpha}",outcome="ok"}}'
        )
        assert _value(ok) == 3
        assert ok[0]["metric"]["slo_class"] == "interactive"
        tokens = prometheus.query(f'fairgate_completion_tokens_total{{tenant="{alpha}"}}')
        assert _value(tokens) == alpha_completion_tokens
        beta_ok = prometheus.query(f'fairgate_requests_total{{tenant="{beta}",outcome="ok"}}')
        assert _value(beta_ok) == 2
        assert beta_ok[0]["metric"]["slo_class"] == "batch"
        ttft = prometheus.query(f'fairgate_ttft_seconds_count{{tenant="{beta}"}}')
        assert _value(ttft) == 2
        refused = prometheus.query(
            f'fairgate_rejections_total{{tenant="{alpha}",reason="model_not_found"}}'
        )
        assert _value(refused) == 1
        unauthenticated = prometheus.query(
            'fairgate_rejections_total{tenant="",reason="invalid_api_key"}'
        )
        assert _value(unauthenticated) >= 1
        counters = prometheus.query(f'fairgate_fair_counter{{tenant=~"{alpha}|{beta}"}}')
        assert {r["metric"]["tenant"] for r in counters} == {alpha, beta}
        assert all(float(r["value"][1]) > 0 for r in counters)
        attainment = prometheus.query('fairgate_slo_attainment{slo_class="interactive"}')
        assert 0.0 <= _value(attainment) <= 1.0
        # The workers: KV blocks on the decode side, KV shipped by the prefill side.
        blocks = prometheus.query('fairgate_worker_kv_blocks_total{job="decode"}')
        assert _value(blocks) > 0
        shipped = prometheus.query('fairgate_kv_transfer_bytes_total{job="prefill"}')
        assert _value(shipped) > 0
        landed = prometheus.query('fairgate_kv_transfers_total{job="decode",outcome="ok"}')
        assert _value(landed) >= 5
        admitted = prometheus.query('fairgate_worker_admitted_tokens_total{job="prefill"}')
        assert _value(admitted) > 0
        # alpha's second and third requests repeat its first one's prompt.
        hit_tokens = prometheus.query(
            'fairgate_worker_prefix_cache_hit_tokens_total{job="prefill"}'
        )
        assert _value(hit_tokens) > 0


def test_the_gateway_exposition_parses_and_bounds_its_labels(stack: Stack) -> None:
    """Every gateway series is labelled by tenant, class, model, outcome or reason, or (the
    per-worker series) worker, role and state only: never a request id; a model label is a
    served model's id, never a client's text; a worker label is one the admin API lists."""
    response = httpx.get(
        stack.base_url + "/metrics", headers={"authorization": f"Bearer {stack.admin_token}"}
    )
    response.raise_for_status()
    allowed = {"tenant", "slo_class", "model", "outcome", "reason", "met", "le"}
    allowed |= {"worker", "role", "state"}
    workers = httpx.get(
        stack.base_url + "/admin/v1/workers",
        headers={"authorization": f"Bearer {stack.admin_token}"},
    ).json()["data"]
    known_workers = {w["worker_id"] or w["url"] for w in workers}
    served = {
        m["id"]
        for m in httpx.get(
            stack.base_url + "/v1/models", headers={"authorization": f"Bearer {stack.demo_key}"}
        ).json()["data"]
    }
    names = set()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            names.add(sample.name)
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)
            assert sample.labels.get("model", "") in served | {""}, sample.labels
            assert sample.labels.get("worker", "") in known_workers | {""}, sample.labels
    assert {"fairgate_requests_total", "fairgate_queue_depth"} <= names
