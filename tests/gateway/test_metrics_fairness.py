"""``gateway.metrics``' fairness and per-worker series: service units, weights, backlog, shares,
queue by class; each worker's state, batch, KV blocks and prefix-cache counts, for the workers
the registry knows only."""

from __future__ import annotations

import pytest

from gateway.config import DEFAULT_SLO_CLASSES
from gateway.metrics import GatewayMetrics, WorkerSnapshot, worker_labels
from gateway.scheduler import TenantState
from gateway.workers import WorkerRegistry
from tests.gateway.test_dispatch import make_ready
from tests.gateway.test_metrics import Clock, samples


def test_service_units_weights_backlog_and_entitled_shares() -> None:
    states = [TenantState("t1", 2, 0.0), TenantState("t2", 5, 0.0), TenantState("t3", 0, 0.0)]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: states, clock=Clock())
    for tenant_id, name, weight in (
        ("t1", "acme", 1.0),
        ("t2", "globex", 2.0),
        ("t3", "idle", 4.0),
    ):
        metrics.tenant_seen(tenant_id, name)
        metrics.tenant_weight(tenant_id, weight)
    # w_in 1, w_out 2: (100 + 2·10) × 1.5 / 2 = 90 service units
    metrics.served("t2", 2.0, 100, 10, cost_factor=1.5)
    got = samples(metrics)
    assert got[("fairgate_tenant_service_units_total", (("tenant", "globex"),))] == 90.0
    assert got[("fairgate_tenant_service_units_total", (("tenant", "acme"),))] == 0.0
    assert got[("fairgate_tenant_weight", (("tenant", "idle"),))] == 4.0
    assert got[("fairgate_tenant_backlogged", (("tenant", "acme"),))] == 1.0
    assert got[("fairgate_tenant_backlogged", (("tenant", "idle"),))] == 0.0
    assert got[("fairgate_tenant_entitled_share", (("tenant", "acme"),))] == pytest.approx(1 / 3)
    assert got[("fairgate_tenant_entitled_share", (("tenant", "globex"),))] == pytest.approx(2 / 3)
    assert ("fairgate_tenant_entitled_share", (("tenant", "idle"),)) not in got


def test_a_weight_change_moves_the_entitled_shares_at_once() -> None:
    states = [TenantState("t1", 1, 0.0), TenantState("t2", 1, 0.0)]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: states, clock=Clock())
    metrics.tenant_weight("t1", 1.0)
    metrics.tenant_weight("t2", 1.0)
    assert samples(metrics)[("fairgate_tenant_entitled_share", (("tenant", "t1"),))] == 0.5
    metrics.tenant_weight("t2", 3.0)  # an admin's change
    assert samples(metrics)[("fairgate_tenant_entitled_share", (("tenant", "t1"),))] == 0.25


def test_the_service_share_is_over_the_window_among_backlogged_tenants() -> None:
    clock = Clock()
    states = [TenantState("t1", 3, 0.0), TenantState("t2", 3, 0.0), TenantState("t3", 0, 0.0)]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: states, clock=clock, window_s=10.0)
    metrics.tenant_weight("t2", 2.0)
    metrics.sample()
    for _ in range(5):
        clock.now += 1.0
        metrics.served("t1", 1.0, 100, 0)
        metrics.served("t2", 2.0, 200, 0)
        metrics.served("t3", 1.0, 700, 0)  # not backlogged: in no one's share
        metrics.sample()
    got = samples(metrics)
    assert got[("fairgate_tenant_service_share", (("tenant", "t1"),))] == pytest.approx(1 / 3)
    assert got[("fairgate_tenant_service_share", (("tenant", "t2"),))] == pytest.approx(2 / 3)
    assert ("fairgate_tenant_service_share", (("tenant", "t3"),)) not in got
    # After the window, with nobody served, the shares are of nothing: none.
    clock.now += 30.0
    metrics.sample()
    clock.now += 1.0
    assert not any(name == "fairgate_tenant_service_share" for name, _ in samples(metrics))


def test_queue_depth_by_tenant_and_class() -> None:
    metrics = GatewayMetrics(
        DEFAULT_SLO_CLASSES,
        lambda: [],
        clock=Clock(),
        queued_by_class=lambda: {("t1", "interactive"): 2, ("t1", "batch"): 7},
    )
    metrics.tenant_seen("t1", "acme")
    got = samples(metrics)
    key = "fairgate_tenant_queue_depth"
    assert got[(key, (("slo_class", "interactive"), ("tenant", "acme")))] == 2
    assert got[(key, (("slo_class", "batch"), ("tenant", "acme")))] == 7


async def test_worker_series_come_from_the_registrys_handles() -> None:
    registry = WorkerRegistry(["http://127.0.0.1:9/p"], ["http://127.0.0.1:9/d"])
    try:
        prefill = registry.handles[0]
        make_ready(prefill, "prefill", num_free_blocks=600)  # 1000 blocks
        metrics = GatewayMetrics(
            DEFAULT_SLO_CLASSES,
            lambda: [],
            clock=Clock(),
            workers=lambda: [WorkerSnapshot.of(h) for h in registry.handles],
        )
        metrics.worker_prefilled(worker_labels(prefill), 100, 64)
        metrics.worker_prefilled(worker_labels(prefill), 50, 0)
        got = samples(metrics)
        ready = (("model", "test-model"), ("role", "prefill"), ("worker", "prefill-worker"))
        assert got[("fairgate_backend_worker_state", (*ready[:2], ("state", "ready"), ready[2]))]
        assert got[("fairgate_backend_kv_blocks_used", ready)] == 400
        assert got[("fairgate_backend_kv_blocks_total", ready)] == 1000
        assert got[("fairgate_backend_batch_size", ready)] == 0
        assert got[("fairgate_backend_prompt_tokens_total", ready)] == 150
        assert got[("fairgate_backend_cached_tokens_total", ready)] == 64
        # Not polled yet: its URL and expected role, its state, no load figures.
        unknown = (("role", "decode"), ("state", "unknown"), ("worker", "http://127.0.0.1:9/d"))
        assert got[("fairgate_backend_worker_state", unknown)] == 1.0
        states = [k for k in got if k[0] == "fairgate_backend_worker_state"]
        assert len(states) == 2  # one series per worker
        batches = [k for k in got if k[0] == "fairgate_backend_batch_size"]
        assert batches == [("fairgate_backend_batch_size", ready)]
        # A worker the registry forgot takes its series with it.
        registry.handles.remove(prefill)
        got = samples(metrics)
        assert ("fairgate_backend_prompt_tokens_total", ready) not in got
        assert not [k for k in got if ("worker", "prefill-worker") in k[1]]
        assert (
            "fairgate_backend_worker_state",
            (*ready[:2], ("state", "ready"), ready[2]),
        ) not in got
    finally:
        await registry.stop()
