"""``fairgate bench gateway``: the OTLP receiver it runs in its own process for ``--tracing``;
the ``--overload`` and ``--prompt-flood`` modes end to end, with windows short enough for CI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.gateway_bench import _ReceiverProcess
from bench.otlp_receiver import TRACES_PATH
from bench.overload_bench import STEADY_SHARE, OverloadPlan, run_overload_bench
from bench.prompt_flood_bench import (
    HUGE_CHARS,
    NEAR_BOUND_CHARS,
    PromptFloodPlan,
    run_prompt_flood_bench,
)
from deploy.cli import _build_parser

# Counting reads only the structure, so empty spans do.
TWO_SPANS: dict[str, Any] = {"resourceSpans": [{"scopeSpans": [{"spans": [{}, {}]}]}]}


def test_the_receiver_process_reports_what_it_counted() -> None:
    with _ReceiverProcess() as receiver:
        answer = httpx.post(receiver.endpoint + TRACES_PATH, json=TWO_SPANS)
        assert answer.status_code == 200
        assert receiver.stop() == 2
        assert receiver.child.process.returncode == 0
        assert receiver.stop() == 2  # reported once, remembered


def test_the_receiver_process_exits_with_its_parent() -> None:
    with _ReceiverProcess() as receiver:
        process = receiver.child.process
        assert process.stdin is not None
        process.stdin.close()  # as it is when this process dies
        assert process.wait(timeout=10) == 0


# ---- --overload and --prompt-flood, each on a real null-engine stack with one-second windows --


def test_the_overload_mode_accounts_for_every_request(tmp_path: Path) -> None:
    plan = OverloadPlan(factors=(2.0,), window_s=1.0, warmup_s=0.5, rps_window_s=1.0, drain_s=0.5)
    output = tmp_path / "overload.json"
    assert run_overload_bench(plan, quick=True, output=str(output)) == 0
    result = json.loads(output.read_text())
    rps_max = result["rps_max"]
    assert rps_max > 0
    assert result["rps_max_cpu_cores"]["gateway"] > 0
    assert set(result["phases"]) == {"2x_one_tenant", "2x_two_tenants"}
    for phase in result["phases"].values():
        assert phase["cpu_cores"]["gateway"] > 0
        for tenant in phase["tenants"].values():
            assert sum(tenant["answers"].values()) == tenant["num_requests"] > 0
            # What a client can meet: served, refused (429/503), or its own timeout; any other
            # kind is a fault of the gateway or of this load generator.
            assert set(tenant["share"]) <= {"ok", "refused", "timeout"}, tenant["answers"]
        # The gateway's metrics count every 200 the clients got (and any it finished for
        # clients that had left).
        served = sum(t["answers"].get("200", 0) for t in phase["tenants"].values())
        assert phase["gateway_outcomes"].get("ok", 0) >= served > 0
    two = result["phases"]["2x_two_tenants"]["tenants"]
    assert two["flood"]["intended_rps"] == pytest.approx(2.0 * rps_max, abs=0.2)
    assert two["steady"]["intended_rps"] == pytest.approx(STEADY_SHARE * rps_max, abs=0.2)
    assert set(result["log_lines"]) == {"gateway-0", "prefill-0", "decode-0"}


def test_the_prompt_flood_mode_refuses_what_cannot_fit_and_serves_what_can(
    tmp_path: Path,
) -> None:
    plan = PromptFloodPlan(phase_s=1.0, rounds=1, flood_clients=1, pause_s=0.2)
    output = tmp_path / "prompt_flood.json"
    assert run_prompt_flood_bench(plan, quick=True, output=str(output)) == 0
    result = json.loads(output.read_text())
    # 500,000 characters are too few to be refused from their length alone: they are tokenized.
    assert result["length_bound_chars"] > NEAR_BOUND_CHARS
    variants = result["variants"]
    assert variants["5mb"]["prompt_chars"] == HUGE_CHARS
    for variant in ("5mb", "near_bound"):
        answers = variants[variant]["flood"]["answers"]
        assert list(answers) == ["400 context_length_exceeded"], answers
    assert list(variants["fits"]["flood"]["answers"]) == ["200"]
    for figures in variants.values():
        for phase in ("small_without_flood", "small_with_flood"):
            assert list(figures[phase]["answers"]) == ["200"], figures[phase]["answers"]


def test_the_bench_gateway_modes_exclude_each_other() -> None:
    parser = _build_parser()
    assert parser.parse_args(["bench", "gateway", "--overload"]).overload == "1.5,3"
    assert parser.parse_args(["bench", "gateway", "--overload", "2"]).overload == "2"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "gateway", "--overload", "--prompt-flood"])
