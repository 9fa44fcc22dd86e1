"""``bench.slo_bench``'s arithmetic and parsing: TPOT from a stream's events as the gateway
encodes them, attainment against the interactive class's targets, and the gateway's attainment
gauges read back from its real exposition. The bench's run itself is a real stack for minutes:
not here."""

from __future__ import annotations

import argparse

import pytest

from bench.slo_bench import (
    LoadSample,
    SloPlan,
    StreamTimes,
    add_arguments,
    attainment_gauges,
    decode_timeline,
    plan_of,
    predicted_step_s,
    summarize_batch,
    summarize_interactive,
    time_per_output_token,
)
from gateway.config import DEFAULT_SLO_CLASSES
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.openai_responses import SSE_DONE, ChatCompletionChunk
from transfer.messages import WorkerLoad, WorkerRole

ARGS = ("chatcmpl-1", 0, "m")


def _stream(
    sent_s: float, text_at: list[float], finish_at: float, completion_tokens: int | None
) -> StreamTimes:
    """A stream fed the gateway's own SSE events: role, one text event per time in
    ``text_at``, the finish, then usage when ``completion_tokens`` is given (as with
    ``stream_options.include_usage``)."""
    times = StreamTimes(sent_s)
    times.on_chunk(ChatCompletionChunk.role(*ARGS), sent_s + 0.001)
    for t in text_at:
        times.on_chunk(ChatCompletionChunk.text(*ARGS, "tok"), t)
    times.on_chunk(ChatCompletionChunk.finish(*ARGS, "length"), finish_at)
    if completion_tokens is not None:
        # usage and [DONE] in one HTTP chunk: both events are read
        usage = ChatCompletionChunk.usage_only(*ARGS, 96, completion_tokens)
        times.on_chunk(usage + SSE_DONE, finish_at)
    return times


def test_time_per_output_token_divides_by_the_tokens_after_the_first() -> None:
    assert time_per_output_token(10.0, 11.0, 5) == pytest.approx(0.25)
    assert time_per_output_token(10.0, 10.0, 1) is None
    assert time_per_output_token(10.0, 10.0, 0) is None


def test_tpot_counts_tokens_from_usage_not_text_events() -> None:
    # Four text events (a detokenizer may hold tokens back) but nine tokens: eight intervals
    # from the first text to the finish.
    times = _stream(0.0, [0.5, 0.9, 1.3, 2.1], 2.1, completion_tokens=9)
    assert times.is_served
    assert times.ttft_s == pytest.approx(0.5)
    assert times.completion_tokens == 9 and times.prompt_tokens == 96
    assert times.tpot_s == pytest.approx((2.1 - 0.5) / 8)
    assert times.gaps_s() == pytest.approx([0.4, 0.4, 0.8])


def test_tpot_without_usage_counts_text_events() -> None:
    times = _stream(0.0, [0.5, 0.7, 0.9, 1.1], 1.2, completion_tokens=None)
    assert times.tpot_s == pytest.approx(0.2)


def test_an_in_band_error_is_not_served_and_has_no_tpot() -> None:
    times = _stream(0.0, [0.5, 0.7], 0.8, completion_tokens=None)
    times.on_chunk(b'data: {"error": {"message": "x", "code": "engine_failed"}}\n\n', 0.9)
    assert times.error == "engine_failed"
    assert not times.is_served
    assert times.tpot_s is None


def test_interactive_attainment_against_the_class_targets() -> None:
    # TPOT target 250 ms, TTFT 2 s: one fast, one slow in TPOT, one slow in TTFT, one refused
    # (counted apart, not in the attainment).
    fast = _stream(0.0, [0.1, 0.2, 0.3], 0.3, completion_tokens=3)  # 100 ms per token
    slow_tpot = _stream(0.0, [0.1, 0.5, 0.9], 0.9, completion_tokens=3)  # 400 ms
    slow_ttft = _stream(0.0, [3.0, 3.1, 3.2], 3.2, completion_tokens=3)
    refused = StreamTimes(0.0, refused="503 overloaded")
    summary = summarize_interactive([fast, slow_tpot, slow_ttft, refused])
    assert summary["sent"] == 4 and summary["served"] == 3
    assert summary["refused"] == {"503 overloaded": 1}
    assert summary["ttft_attainment"] == pytest.approx(2 / 3, abs=1e-3)
    assert summary["tpot_attainment"] == pytest.approx(2 / 3, abs=1e-3)
    assert summary["tpot_ms"]["max"] == pytest.approx(400.0)


def test_batch_counts_only_what_finished_in_the_window() -> None:
    inside = _stream(0.0, [1.0, 2.0], 5.0, completion_tokens=128)
    before = _stream(0.0, [1.0, 2.0], 0.5, completion_tokens=128)
    after = _stream(0.0, [1.0, 2.0], 12.0, completion_tokens=128)
    summary = summarize_batch([inside, before, after], 1.0, 11.0)
    assert summary["sent"] == 3 and summary["completed"] == 1
    assert summary["output_tok_s"] == pytest.approx(12.8)


def test_attainment_gauges_read_the_gateways_exposition() -> None:
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: [])
    for tenant, e2e_s in (("a", 1.0), ("a", 1.0), ("b", 1.0), ("b", 20.0)):
        # 11 tokens: TPOT (e2e - 0.5) / 10, 50 ms or 1.95 s
        metrics.finished(RequestRecord(tenant, "interactive", "ok", 96, 0, 11, 0.0, 0.5, e2e_s, 0))
    gauges = attainment_gauges(metrics.exposition().decode())
    assert gauges["fairgate_tpot_attainment"] == {"interactive": 0.75}
    assert gauges["fairgate_tenant_tpot_attainment"] == {
        "a/interactive": 1.0,
        "b/interactive": 0.5,
    }
    assert gauges["fairgate_slo_attainment"] == {"interactive": 1.0}


def test_plan_of_the_default_flags_is_the_default_plan() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert plan_of(parser.parse_args([])) == SloPlan()
    plan = plan_of(parser.parse_args(["--engine", "tiny", "--duration-s", "20"]))
    assert plan.engine == "tiny" and plan.duration_s == 20.0
    with pytest.raises(ValueError, match="max_tokens"):
        SloPlan(interactive_max_tokens=1)


def test_decode_timeline_keeps_decode_samples_of_the_window_with_the_lines_prediction() -> None:
    def load(role: WorkerRole, num_running_tokens: int) -> WorkerLoad:
        return WorkerLoad(
            "w",
            role,
            True,
            num_running=2,
            num_reserved=1,
            num_running_tokens=num_running_tokens,
            decode_base_s=0.02,
            decode_token_s=0.0001,
        )

    samples = [
        LoadSample(9.0, "decode-0", load("decode", 100)),  # before the window
        LoadSample(10.5, "decode-0", load("decode", 300)),
        LoadSample(10.5, "prefill-0", load("prefill", 300)),  # not a decode worker
        LoadSample(20.0, "decode-0", load("decode", 300)),  # at the window's end: out
    ]
    assert predicted_step_s(load("decode", 300)) == pytest.approx(0.05)
    assert decode_timeline(samples, 10.0, 20.0) == {"decode-0": [[0.5, 2, 1, 300, 50.0]]}
