"""``bench.soak_bench``: the reconciliation of a tenant's outcomes with its ledger, and a tiny soak
on a real supervised stack (null engine) so that the benchmark keeps working: 200 requests from
two tenants, a tenth of them abandoned by their clients, one decode worker killed halfway."""

from __future__ import annotations

import argparse

import pytest

from bench.soak_bench import (
    RequestOutcome,
    SoakPlan,
    add_arguments,
    plan_of,
    plan_requests,
    reconcile,
    run_soak_bench,
)

P = 32  # prompt tokens of every request


def _completed(completion_tokens: int, *, stream: bool = False) -> RequestOutcome:
    return RequestOutcome("t", stream, 64, "completed", 1.0, usage=(P, 0, completion_tokens))


def _ledger(
    requests: int, completion_tokens: int, prompt_tokens: int | None = None
) -> dict[str, int]:
    prompt = P * requests if prompt_tokens is None else prompt_tokens
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "cached_tokens": 0,
        "completion_tokens": completion_tokens,
    }


def _check(outcomes: list[RequestOutcome], ledger: dict[str, int]) -> dict[str, object]:
    counters = {
        name: ledger[name] for name in ("prompt_tokens", "cached_tokens", "completion_tokens")
    }
    return reconcile(outcomes, ledger, counters, P)


def test_completed_and_unbilled_failures_must_match_the_ledger_exactly() -> None:
    outcomes = [
        _completed(10),
        _completed(20, stream=True),
        RequestOutcome("t", False, 64, "error_status", 1.0, "503 worker_unreachable", 503),
        # an error event before any text: nothing reached the client, nothing is billed
        RequestOutcome("t", True, 64, "stream_error", 1.0, "worker_unreachable", 200),
    ]
    result = _check(outcomes, _ledger(2, 30))
    assert result["is_exact"] and result["matches"]
    assert not _check(outcomes, _ledger(3, 30))["matches"]  # a failure billed
    assert not _check(outcomes, _ledger(2, 31))["matches"]  # a token too many
    assert not _check(outcomes, _ledger(2, 30, prompt_tokens=P * 2 - 1))["matches"]


def test_a_stream_left_after_text_is_billed_its_prompt_and_between_its_events_and_max_tokens() -> (
    None
):
    left = RequestOutcome("t", True, 16, "disconnected", 1.0, num_text_events=3)
    outcomes = [_completed(10), left]
    for completion in (13, 16, 26):
        assert _check(outcomes, _ledger(2, completion))["matches"], completion
    assert not _check(outcomes, _ledger(2, 12))["matches"]  # less than the client read
    assert not _check(outcomes, _ledger(2, 27))["matches"]  # more than max_tokens
    assert not _check(outcomes, _ledger(1, 10))["matches"]  # it read text: it must be billed


def test_an_unstreamed_request_its_client_left_may_or_may_not_be_billed() -> None:
    left = RequestOutcome("t", False, 16, "disconnected", 1.0)
    outcomes = [_completed(10), left]
    assert _check(outcomes, _ledger(1, 10))["matches"]
    assert _check(outcomes, _ledger(2, 26))["matches"]
    assert not _check(outcomes, _ledger(3, 26))["matches"]


def test_the_ledger_must_equal_the_gateways_own_counters() -> None:
    ledger = _ledger(1, 10)
    counters = {"prompt_tokens": P, "cached_tokens": 0, "completion_tokens": 11}
    result = reconcile([_completed(10)], ledger, counters, P)
    assert not result["matches"]
    assert result["checks"] == {
        "requests": True,
        "completion_tokens": True,
        "cached_tokens": True,
        "prompt_tokens": True,
        "gateway_counters": False,
    }


def test_the_plan_is_the_seeds() -> None:
    plan = SoakPlan(num_requests=50, num_tenants=3, disconnect_fraction=0.5)
    assert plan_requests(plan) == plan_requests(plan)
    specs = plan_requests(plan)
    assert {s.tenant for s in specs} == {"soak-0", "soak-1", "soak-2"}
    assert all(len(s.prompt_token_ids) == plan.prompt_tokens for s in specs)
    assert all(plan.min_tokens <= s.max_tokens <= plan.max_tokens for s in specs)
    for spec in specs:  # a stream leaves after some text, an unstreamed request after a while
        assert spec.leave_after_events is None or spec.stream
        assert spec.leave_after_latency is None or not spec.stream


def test_the_flags_make_the_plan() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert plan_of(parser.parse_args([])) == SoakPlan()
    args = parser.parse_args(["--requests", "200", "--kill-at", "0.5", "--kill-roles", "prefill"])
    plan = plan_of(args)
    assert (plan.num_requests, plan.kill_at, plan.kill_roles) == (200, (0.5,), ("prefill",))
    assert plan_of(parser.parse_args(["--kill-at", "", "--kill-roles", ""])).kill_at == ()
    with pytest.raises(ValueError, match="prefill or decode"):
        plan_of(parser.parse_args(["--kill-roles", "gateway,decode"]))


def test_nonsense_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="as many kills"):
        SoakPlan(kill_at=(0.5,), kill_roles=())
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SoakPlan(kill_at=(1.0,), kill_roles=("decode",))


def test_a_tiny_soak_loses_nothing_and_its_ledger_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = SoakPlan(
        num_requests=200,
        num_tenants=2,
        concurrency=8,
        disconnect_fraction=0.1,
        kill_at=(0.3, 0.6),
        kill_roles=("decode", "prefill"),
        num_prefill_workers=2,
        num_decode_workers=2,
        ramp_s=0.5,
    )
    result = run_soak_bench(plan)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")  # the JSON line
    outcomes = result["outcomes"]
    assert sum(outcomes.values()) == 200
    assert result["zero_lost"], result["errors"]
    assert result["workers_back"], result["kills"]
    assert [kill["role"] for kill in result["kills"]] == ["decode", "prefill"]
    # The requests on the killed workers moved to the others: none failed.
    assert result["zero_5xx"] and result["zero_4xx"], result["errors"]
    assert result["usage_matches"], result["tenants"]
    for tenant in result["tenants"].values():
        assert tenant["ledger"]["requests"] >= tenant["client"]["completed"] > 0
    streamed = result["outcomes_streamed"]
    assert streamed["completed"] > 0 and outcomes["completed"] > streamed["completed"]
    assert outcomes["disconnected"] > 0
    assert result["gateway_outcomes"].get("client_disconnected", 0) > 0  # aborts reached it
