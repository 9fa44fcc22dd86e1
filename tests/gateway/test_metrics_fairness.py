"""``gateway.metrics``' fairness and per-worker series: service units, weights, backlog, shares,
queue by class; each worker's state, batch, KV blocks and prefix-cache counts, for the workers
the registry knows only."""

from __future__ import annotations

import pytest

from gateway.config import DEFAULT_SLO_CLASSES
from gateway.fairness_history import FairnessHistory, GapBound
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


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("vtc", (4000 + 2 * 50) / 2),  # VTC charges the whole prompt, cached or not
        ("dlpm", (1000 + 2 * 50) / 2),  # the others, the prompt tokens computed
        ("d2lpm", (1000 + 2 * 50) / 2),
    ],
)
def test_service_is_measured_as_the_policy_charges_it(policy: str, expected: float) -> None:
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, list, clock=Clock(), policy=policy)
    metrics.tenant_seen("t1", "acme")
    metrics.served("t1", 2.0, 1000, 50, num_prompt_tokens=4000)  # 3000 of 4000 cached
    got = samples(metrics)
    assert got[("fairgate_tenant_service_units_total", (("tenant", "acme"),))] == expected


def test_under_vtc_a_tenant_whose_prompts_hit_the_cache_is_not_over_the_bound() -> None:
    """r2_vtc_gap.py: two tenants VTC serves alike (same prompts and output, one request each
    a second), one of whose prompts are a cached prefix. VTC's counters stay equal, and so must
    the receipt's service: no gap, within the 2U bound."""
    clock = Clock()
    states = [TenantState("a", 3, 0.0), TenantState("b", 3, 0.0)]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: states, clock=clock, policy="vtc")
    history = FairnessHistory(clock=clock)
    prompt, output = 4000, 50
    for _ in range(300):
        clock.now += 1.0
        for tenant_id, cached in (("a", prompt), ("b", 0)):
            metrics.served(tenant_id, 1.0, prompt - cached, output, num_prompt_tokens=prompt)
        history.sample(metrics.fairness_points())
    u = 1 * 4095 + 2 * 16384
    receipt = history.receipt("b", 300.0, GapBound("vtc", float(u), measure=metrics.measure))
    assert receipt.max_gap is not None and receipt.max_gap.units == 0.0
    assert receipt.within_bound is True
    assert "all prompt tokens" in receipt.measure


def test_a_deleted_tenants_series_go_and_a_renamed_ones_take_the_new_name() -> None:
    """r2_dup_series.py: a tenant deleted and another made with its name gives one series
    per name, not two; a rename moves the series to the new name."""
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, list, clock=Clock())
    metrics.tenant_seen("ten_old", "acme")
    metrics.served("ten_old", 1.0, 100, 10)
    metrics.forget_tenant("ten_old")  # Gateway.apply_admin_change on tenant_deleted
    metrics.tenant_seen("ten_new", "acme")
    metrics.served("ten_new", 1.0, 5, 1)
    text = metrics.exposition().decode()
    lines = [
        line.rsplit(" ", 1)
        for line in text.splitlines()
        if line.startswith("fairgate_tenant_") and 'tenant="acme"' in line
    ]
    keys = [key for key, _ in lines]
    assert len(keys) == len(set(keys)), sorted(keys)
    assert ['fairgate_tenant_service_units_total{tenant="acme"}', "7.0"] in lines
    assert "ten_old" not in text
    metrics.rename_tenant("ten_new", "acme-2")
    metrics.rename_tenant("ten_never_seen", "nobody")  # not named by the metrics: stays so
    got = samples(metrics)
    assert got[("fairgate_tenant_service_units_total", (("tenant", "acme-2"),))] == 7.0
    assert not [key for key in got if ("tenant", "acme") in key[1]]
    assert not [key for key in got if ("tenant", "nobody") in key[1]]


def test_the_entitled_share_over_the_window_is_what_the_service_share_is_measured_against() -> None:
    """acme and globex (weights 1) always backlogged, initech (weight 2) every other second:
    acme's entitled share now flips between 1/2 and 1/4; over the window it is their mean."""
    clock = Clock()
    initech = TenantState("initech", 0, 0.0)
    states = [TenantState("acme", 3, 0.0), TenantState("globex", 3, 0.0), initech]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: states, clock=clock, window_s=60.0)
    metrics.tenant_weight("initech", 2.0)
    metrics.sample()
    for second in range(60):
        clock.now += 1.0
        # initech backlogged over the pairs of seconds (2k, 2k + 1], idle over the others.
        states[2] = TenantState("initech", 3 if second % 4 in (0, 1) else 0, 0.0)
        for tenant_id in ("acme", "globex", "initech"):
            metrics.served(tenant_id, metrics.weight_of(tenant_id), 100, 0)
        metrics.sample()
    got = samples(metrics)
    window = got[("fairgate_tenant_entitled_share_window", (("tenant", "acme"),))]
    # Backlogged over every second; initech over a quarter of them (both ends queued).
    assert window == pytest.approx(0.75 * 0.5 + 0.25 * 0.25, abs=0.02)
    assert got[("fairgate_tenant_service_share", (("tenant", "acme"),))] == pytest.approx(
        (100 * 60) / (100 * 60 * 2 + 100 * 15), abs=0.02
    )
    assert ("fairgate_tenant_entitled_share_window", (("tenant", "initech"),)) in got


def test_frequent_scrapes_do_not_shrink_the_share_window() -> None:
    """r2_ring.py: the sampler and three scrapes a second. a is served over the first half of
    the 60 s window, b over the second: each received half of the window's service."""
    clock = Clock()
    states = [TenantState("a", 2, 0.0), TenantState("b", 2, 0.0)]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: states, clock=clock, window_s=60.0)
    metrics.sample()
    for tick in range(60 * 4):
        clock.now += 0.25
        metrics.served("a" if tick < 120 else "b", 1.0, 25, 0)
        metrics.sample()
    got = samples(metrics)
    assert got[("fairgate_tenant_service_share", (("tenant", "a"),))] == pytest.approx(
        0.5, abs=0.01
    )


async def test_a_dead_or_unknown_workers_last_load_report_is_not_shown() -> None:
    """Its batch and KV gauges would say it holds requests and blocks it no longer answers
    for (FairgateKvCacheNearFull firing for a dead worker); its state is still exported."""
    workers = [
        WorkerSnapshot("w-ready", "decode", "m", "ready", 3, 950, 1000),
        WorkerSnapshot("w-dead", "decode", "m", "dead", 5, 990, 1000),
        WorkerSnapshot("w-unknown", "decode", "m", "unknown", 1, 999, 1000),
        WorkerSnapshot("w-ejected", "decode", "m", "ejected", 4, 500, 1000),
    ]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, list, clock=Clock(), workers=lambda: workers)
    got = samples(metrics)
    for name in (
        "fairgate_backend_batch_size",
        "fairgate_backend_kv_blocks_used",
        "fairgate_backend_kv_blocks_total",
    ):
        shown = {dict(labels)["worker"] for key, labels in got if key == name}
        assert shown == {"w-ready", "w-ejected"}, name  # an ejected worker still reports
    states = {
        dict(labels)["worker"]: dict(labels)["state"]
        for key, labels in got
        if key == "fairgate_backend_worker_state"
    }
    assert states == {
        "w-ready": "ready",
        "w-dead": "dead",
        "w-unknown": "unknown",
        "w-ejected": "ejected",
    }
