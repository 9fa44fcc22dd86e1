"""``gateway.metrics``: what each recording does to the exposition, the SLO and fairness windows,
and Jain's index."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import DEFAULT_SLO_CLASSES
from gateway.metrics import GatewayMetrics, RequestRecord, jain_index
from gateway.scheduler import TenantState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample by name and sorted labels; an empty ``model`` label (a request recorded
    without its model, as most here are) is left out of the key."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if (k, v) != ("model", "")))): (
            s.value
        )
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def record(tenant: str, slo_class: str, **changes: object) -> RequestRecord:
    fields: dict[str, object] = {
        "tenant": tenant,
        "slo_class": slo_class,
        "outcome": "ok",
        "prompt_tokens": 100,
        "cached_tokens": 32,
        "completion_tokens": 11,
        "queue_s": 0.01,
        "ttft_s": 0.5,
        "e2e_s": 1.5,
        "num_preemptions": 0,
    }
    return RequestRecord(**(fields | changes))  # type: ignore[arg-type]


def test_jain_index() -> None:
    assert jain_index([5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([]) is None
    assert jain_index([0.0, 0.0]) is None


def test_a_finished_request_moves_its_tenant_and_class_series() -> None:
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: [], clock=Clock())
    metrics.finished(record("acme", "interactive"))
    metrics.finished(record("acme", "interactive", ttft_s=3.0, e2e_s=4.0, num_preemptions=2))
    got = samples(metrics)
    labels = (("slo_class", "interactive"), ("tenant", "acme"))
    assert got[("fairgate_requests_total", (("outcome", "ok"), *labels))] == 2
    assert got[("fairgate_prompt_tokens_total", labels)] == 200
    assert got[("fairgate_cached_tokens_total", labels)] == 64
    assert got[("fairgate_completion_tokens_total", labels)] == 22
    assert got[("fairgate_preemptions_total", labels)] == 2
    assert got[("fairgate_ttft_seconds_count", labels)] == 2
    # 10 tokens after the first in 1.0 s each time: 0.1 s per token
    assert got[("fairgate_tpot_seconds_count", labels)] == 2
    assert got[("fairgate_tpot_seconds_sum", labels)] == pytest.approx(0.2)
    # interactive's target is 2 s: one of two met
    assert got[("fairgate_slo_requests_total", (("met", "true"), *labels))] == 1
    assert got[("fairgate_slo_attainment", (("slo_class", "interactive"),))] == 0.5
    assert got[("fairgate_tenant_slo_attainment", labels)] == 0.5
    # TPOT, 0.1 s against 0.25 s: both met
    assert got[("fairgate_tpot_requests_total", (("met", "true"), *labels))] == 2
    assert got[("fairgate_tpot_attainment", (("slo_class", "interactive"),))] == 1.0


def test_each_models_requests_are_series_of_their_own() -> None:
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: [], clock=Clock())
    metrics.finished(record("acme", "standard", model="small"))
    metrics.finished(record("acme", "standard", model="large", completion_tokens=5))
    metrics.rejected("acme", "standard", "rate_limited", "large")
    got = samples(metrics)
    of = {
        m: (("model", m), ("slo_class", "standard"), ("tenant", "acme")) for m in ("small", "large")
    }
    assert got[("fairgate_completion_tokens_total", of["small"])] == 11
    assert got[("fairgate_completion_tokens_total", of["large"])] == 5
    assert (
        got[
            (
                "fairgate_requests_total",
                (*of["large"][:1], ("outcome", "rate_limited"), *of["large"][1:]),
            )
        ]
        == 1
    )


def test_tpot_attainment_per_class_and_tenant() -> None:
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: [], clock=Clock())
    metrics.finished(record("acme", "interactive", e2e_s=0.5 + 10 * 0.3))  # 0.3 s a token
    metrics.finished(record("acme", "interactive"))  # 0.1 s a token
    metrics.finished(record("globex", "interactive", e2e_s=0.5 + 10 * 0.2))
    metrics.finished(record("globex", "interactive", completion_tokens=1))  # no TPOT verdict
    metrics.finished(record("globex", "standard"))  # no TPOT target
    got = samples(metrics)
    interactive = ("slo_class", "interactive")
    assert got[("fairgate_tpot_attainment", (interactive,))] == pytest.approx(2 / 3)
    assert got[("fairgate_tenant_tpot_attainment", (interactive, ("tenant", "acme")))] == 0.5
    assert got[("fairgate_tenant_tpot_attainment", (interactive, ("tenant", "globex")))] == 1.0
    assert ("fairgate_tpot_attainment", (("slo_class", "standard"),)) not in got
    assert got[("fairgate_tenant_slo_attainment", (interactive, ("tenant", "globex")))] == 1.0


def test_rejections_count_refusals_and_requests_never_placed() -> None:
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: [], clock=Clock())
    metrics.rejected("", "", "invalid_api_key")
    metrics.rejected("acme", "", "client_disconnected")  # left while being admitted
    metrics.finished(record("acme", "batch", outcome="request_shed", queue_s=None, ttft_s=None))
    # Ended after it ran, or by its client: not a rejection.
    metrics.finished(record("acme", "batch", outcome="worker_unreachable"))
    metrics.finished(record("acme", "batch", outcome="client_disconnected", queue_s=None))
    got = samples(metrics)
    assert (
        got[
            (
                "fairgate_rejections_total",
                (("reason", "invalid_api_key"), ("slo_class", ""), ("tenant", "")),
            )
        ]
        == 1
    )
    batch = (("slo_class", "batch"), ("tenant", "acme"))
    assert got[("fairgate_rejections_total", (("reason", "request_shed"), *batch))] == 1
    assert ("fairgate_rejections_total", (("reason", "worker_unreachable"), *batch)) not in got
    assert ("fairgate_rejections_total", (("reason", "client_disconnected"), *batch)) not in got
    admitting = (("reason", "client_disconnected"), ("slo_class", ""), ("tenant", "acme"))
    assert ("fairgate_rejections_total", admitting) not in got
    assert (
        got[("fairgate_requests_total", (("outcome", "client_disconnected"), *admitting[1:]))] == 1
    )
    # The shed request missed its TTFT target; the one whose client left before its first
    # token has no verdict; the other two got a first token within the hour.
    assert got[("fairgate_slo_requests_total", (("met", "false"), *batch))] == 1
    assert got[("fairgate_slo_requests_total", (("met", "true"), *batch))] == 2
    assert got[("fairgate_slo_attainment", (("slo_class", "batch"),))] == pytest.approx(2 / 3)


def test_queue_depth_counter_and_jain_over_tenants_backlogged_all_window() -> None:
    clock = Clock()
    states = {
        "t-a": TenantState("t-a", num_queued=3, counter=10.0),
        "t-b": TenantState("t-b", num_queued=1, counter=20.0),
        "t-c": TenantState("t-c", num_queued=0, counter=5.0),
    }
    metrics = GatewayMetrics(
        DEFAULT_SLO_CLASSES, lambda: list(states.values()), window_s=10.0, clock=clock
    )
    for tenant_id, name in (("t-a", "a"), ("t-b", "b"), ("t-c", "c")):
        metrics.tenant_seen(tenant_id, name)
    metrics.sample()
    metrics.served("t-a", 1.0, 100, 0)  # 100
    metrics.served("t-b", 2.0, 100, 50)  # (100 + 2 * 50) / 2 = 100
    metrics.served("t-c", 1.0, 1000, 0)  # not backlogged: not in the index
    clock.now += 5.0
    got = samples(metrics)
    assert got[("fairgate_queue_depth", (("tenant", "a"),))] == 3
    assert got[("fairgate_fair_counter", (("tenant", "b"),))] == 20.0
    assert got[("fairgate_jain_index", ())] == pytest.approx(1.0)
    metrics.served("t-a", 1.0, 300, 0)  # a: 400, b: 100 → (500)² / (2 · 170000)
    clock.now += 1.0
    assert samples(metrics)[("fairgate_jain_index", ())] == pytest.approx(500**2 / (2 * 170_000))
    # b leaves the backlog: one tenant left backlogged the whole window, no index.
    states["t-b"] = TenantState("t-b", num_queued=0, counter=20.0)
    clock.now += 1.0
    assert ("fairgate_jain_index", ()) not in samples(metrics)
