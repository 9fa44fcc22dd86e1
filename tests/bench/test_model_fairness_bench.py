"""``bench.model_fairness_bench``'s arithmetic, on what runs fast: service per model normalised
by the cost factors (at the end, and in force when each request was sent), the queue of each
(tenant, model) lane from the gateway's per-tenant and per-model series, the scenarios' loads.
The measurement itself (a real stack with SmolLM2 and the tiny model) is the benchmark's."""

from __future__ import annotations

import json
import os

import pytest

from bench.model_fairness_bench import (
    GatewaySample,
    counter_jumps,
    cpu_seconds,
    factor_at,
    factor_changes,
    lane_depths,
    normalized_service,
    parse_gateway_sample,
    pool_costs,
    raw_service,
    scenario_loads,
    scenarios_of,
)
from bench.tenant_load import Completion, completion_from_answer, jain_index

BIG, SMALL = "SmolLM2-135M-Instruct", "tiny-random-llama"


def _completion(
    tenant: str, model: str, sent_s: float, finished_s: float, prompt: int, output: int
) -> Completion:
    return Completion(tenant, sent_s, finished_s, prompt, 0, output, model)


COMPLETIONS = [
    _completion("P", BIG, 0.0, 0.5, 20, 10),  # before the window
    _completion("P", BIG, 0.5, 1.0, 20, 10),  # 20 + 2·10 = 40 on the big model
    _completion("P", SMALL, 0.9, 1.2, 10, 5),  # 20 on the small one
    _completion("Q", SMALL, 1.0, 1.5, 100, 50),  # 200
    _completion("Q", SMALL, 1.6, 1.9, 100, 50),  # 200
    _completion("Q", SMALL, 1.5, 2.0, 100, 50),  # at the window's end: the next window's
]


def test_raw_service_is_per_tenant_and_model_by_completion_time() -> None:
    assert raw_service(COMPLETIONS, 1.0, 2.0) == {
        "P": {BIG: 40.0, SMALL: 20.0},
        "Q": {SMALL: 400.0},
    }


def test_normalised_service_weighs_each_models_service_by_its_factor() -> None:
    """Raw, Q got 400 against P's 60 (Jain 0.64); in reference tokens, with the small model's
    token at a tenth, P got 40 + 2 and Q 40: about equal."""
    factors = {BIG: 1.0, SMALL: 0.1}
    normalized = normalized_service(
        COMPLETIONS, 1.0, 2.0, lambda c: factors[c.model], {"P": 1.0, "Q": 1.0, "R": 1.0}
    )
    assert normalized == pytest.approx({"P": 42.0, "Q": 40.0, "R": 0.0})
    assert jain_index([normalized["P"], normalized["Q"]]) > 0.99
    assert jain_index([60.0, 400.0]) < 0.7
    halved = normalized_service(
        COMPLETIONS, 1.0, 2.0, lambda c: factors[c.model], {"P": 2.0, "Q": 1.0}
    )
    assert halved == pytest.approx({"P": 21.0, "Q": 40.0})


def test_the_factor_in_force_is_the_last_sampled_at_or_before_the_time() -> None:
    samples = [
        GatewaySample(1.0, factors={BIG: 1.0}),  # the small model not seen yet
        GatewaySample(2.0, factors={BIG: 1.0, SMALL: 1.0}),  # unmeasured
        GatewaySample(3.0, factors={BIG: 1.0, SMALL: 0.02}),
    ]
    assert factor_at(samples, SMALL, 0.5) == 1.0  # before any sample: the first one's
    assert factor_at(samples, SMALL, 2.9) == 1.0
    assert factor_at(samples, SMALL, 3.0) == 0.02
    assert factor_at(samples, SMALL, 99.0) == 0.02
    with pytest.raises(ValueError):
        factor_at(samples, "other", 2.0)
    # normalised by the factor at sending, the unmeasured start charges the small model fully
    sent_early = [
        _completion("Q", SMALL, 2.5, 3.5, 100, 50),
        _completion("Q", SMALL, 3.1, 3.6, 100, 50),
    ]
    at_sending = normalized_service(
        sent_early, 3.0, 4.0, lambda c: factor_at(samples, c.model, c.sent_s), {"Q": 1.0}
    )
    assert at_sending == pytest.approx({"Q": 200.0 + 4.0})


def test_lane_depths_are_solved_from_tenant_and_model_depths() -> None:
    """The shared scenario: P queued on both models, Q on the small one. The big model's queue
    is P's alone, so P's queue on the small model is P's total less it, and Q's is its own."""
    sample = GatewaySample(
        0.0, tenant_depths={"P": 30.0, "Q": 12.0}, model_depths={BIG: 20.0, SMALL: 22.0}
    )
    lanes = [("P", BIG), ("P", SMALL), ("Q", SMALL)]
    assert lane_depths(sample, lanes) == {("P", BIG): 20.0, ("P", SMALL): 10.0, ("Q", SMALL): 12.0}
    # P's queue on the small model empty: seen as such, not as P's total
    drained = GatewaySample(
        0.0, tenant_depths={"P": 20.0, "Q": 12.0}, model_depths={BIG: 20.0, SMALL: 12.0}
    )
    assert lane_depths(drained, lanes)[("P", SMALL)] == 0.0
    # two tenants each on the same two models: not determined, left out
    crossed = [("P", BIG), ("P", SMALL), ("Q", BIG), ("Q", SMALL)]
    assert lane_depths(sample, crossed) == {}


def test_a_gateway_sample_is_read_from_the_metrics_page() -> None:
    text = "\n".join(
        [
            "# TYPE fairgate_queue_depth gauge",
            'fairgate_queue_depth{tenant="P"} 7.0',
            'fairgate_queue_depth{tenant="Q"} 3.0',
            "# TYPE fairgate_fair_counter gauge",
            'fairgate_fair_counter{tenant="P"} 1234.5',
            "# TYPE fairgate_model_queue_depth gauge",
            f'fairgate_model_queue_depth{{model="{BIG}"}} 7.0',
            f'fairgate_model_queue_depth{{model="{SMALL}"}} 3.0',
            "# TYPE fairgate_model_cost_factor gauge",
            f'fairgate_model_cost_factor{{model="{BIG}"}} 1.0',
            f'fairgate_model_cost_factor{{model="{SMALL}"}} 0.015',
            "# TYPE fairgate_jain_index gauge",
            "fairgate_jain_index 0.9",
        ]
    )
    sample = parse_gateway_sample(text + "\n", 4.0)
    assert sample == GatewaySample(
        4.0,
        tenant_depths={"P": 7.0, "Q": 3.0},
        model_depths={BIG: 7.0, SMALL: 3.0},
        factors={BIG: 1.0, SMALL: 0.015},
        counters={"P": 1234.5},
    )


def test_scenarios_put_each_tenant_on_its_models() -> None:
    disjoint = scenario_loads(
        "disjoint", BIG, SMALL, concurrency=10, reference_concurrency=4, prefix="a-"
    )
    assert [(load.name, load.model, load.concurrency) for load in disjoint] == [
        ("a-P", BIG, 4),
        ("a-Q", SMALL, 10),
    ]
    shared = scenario_loads("shared", BIG, SMALL, concurrency=11, reference_concurrency=4)
    assert [(load.name, load.model, load.concurrency) for load in shared] == [
        ("P", BIG, 4),
        ("P", SMALL, 5),  # half of Q's on the cheap model
        ("Q", SMALL, 11),
    ]
    assert {load.weight for load in shared} == {1.0}
    assert scenarios_of(["shared", "disjoint"]) == ["shared", "disjoint"]
    with pytest.raises(ValueError, match="known: disjoint, shared"):
        scenarios_of(["disjoint", "mixed"])


def test_counter_jumps_are_rises_too_large_for_service() -> None:
    samples = [
        GatewaySample(0.0, counters={"P": 100.0}),
        GatewaySample(0.5, counters={"P": 300.0, "Q": 5000.0}),  # Q's first: not a rise
        GatewaySample(1.0, counters={"P": 500.0, "Q": 5100.0}),
        GatewaySample(1.5, counters={"P": 700.0, "Q": 6900.0}),  # Q lifted by 1800
    ]
    assert counter_jumps(samples, ["P", "Q"], min_units=1000.0) == {
        "P": [],
        "Q": [(1.5, 1800.0)],
    }


def test_pool_costs_compare_cpu_per_unit_of_service_with_the_reference_pool() -> None:
    cpu_s = {
        "prefill@big": 20.0,
        "decode@big": 20.0,  # 40 CPU-s for 10 000 units
        "prefill@small": 10.0,
        "decode@small": 30.0,  # 40 CPU-s for 200 000 units: a twentieth per unit
        "gateway": 8.0,
        "load generator": 1.0,
    }
    pools = pool_costs(cpu_s, {"big": 10_000.0, "small": 200_000.0}, "big")
    assert pools == {
        "big": {"cpu_s": 40.0, "raw_service": 10_000.0, "cpu_factor": 1.0},
        "small": {"cpu_s": 40.0, "raw_service": 200_000.0, "cpu_factor": 0.05},
    }
    unserved = pool_costs(cpu_s, {"small": 200_000.0}, "big")
    assert unserved["small"]["cpu_factor"] is None


def test_an_answer_names_its_model_in_the_completion() -> None:
    body = json.dumps(
        {
            "model": SMALL,
            "usage": {
                "prompt_tokens": 40,
                "completion_tokens": 32,
                "prompt_tokens_details": {"cached_tokens": 16},
            },
        }
    ).encode()
    completion = completion_from_answer("Q", 1.0, 2.0, body)
    assert completion == Completion("Q", 1.0, 2.0, 40, 16, 32, SMALL)
    assert completion.service() == 24 + 64


def test_cpu_seconds_read_past_a_command_name_with_spaces() -> None:
    # pid (comm) state ppid ... utime=field 14, stime=field 15, in clock ticks
    fields = ["S", *["0"] * 10, "250", "150", *["0"] * 30]
    stat = "123 (python -m deploy) " + " ".join(fields)
    assert cpu_seconds(stat) == pytest.approx(400 / os.sysconf("SC_CLK_TCK"))


def test_factor_changes_keep_the_first_value_and_each_change() -> None:
    samples = [
        GatewaySample(0.0, factors={BIG: 1.0, SMALL: 1.0}),
        GatewaySample(1.04, factors={BIG: 1.0, SMALL: 1.0}),
        GatewaySample(2.0, factors={BIG: 1.0, SMALL: 0.05}),
        GatewaySample(3.0, factors={BIG: 1.0, SMALL: 0.05}),
        GatewaySample(4.0, factors={BIG: 1.0, SMALL: 0.06}),
    ]
    assert factor_changes(samples) == {
        BIG: [(0.0, 1.0)],
        SMALL: [(0.0, 1.0), (2.0, 0.05), (4.0, 0.06)],
    }
