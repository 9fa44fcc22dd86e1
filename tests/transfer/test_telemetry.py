"""``transfer.telemetry``: when tracing is on, how spans are sampled and linked, and what a
finished span carries to the exporter (a real OTLP receiver)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.otlp_receiver import OtlpReceiver, ReceivedSpan
from transfer import telemetry
from transfer.errors import NoRoomError

REMOTE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REMOTE_UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started
    telemetry.shutdown_tracing()


def _on(receiver: OtlpReceiver, **env: str) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **env}
    assert telemetry.setup_tracing("prefill", environ=environ)


def _flushed(receiver: OtlpReceiver, count: int) -> list[ReceivedSpan]:
    telemetry.shutdown_tracing()  # exports what is left
    spans = receiver.spans()
    assert len(spans) == count, [s.name for s in spans]
    return spans


def test_spans_link_to_a_remote_parent_and_to_each_other(receiver: OtlpReceiver) -> None:
    _on(receiver)
    span = telemetry.start_span("prefill", {"fairgate.prompt_tokens": 7}, traceparent=REMOTE)
    assert span is not None and span.is_recording
    header = telemetry.traceparent_of(span)
    assert header.startswith("00-0af7651916cd43dd8448eb211c80319c-") and header.endswith("-01")
    child = telemetry.start_child(span, "kv_transfer", {"fairgate.kv.blocks": 2}, 1_000)
    child.end(NoRoomError("no room for a prompt that quotes the user"))
    span.add_event("kv_landed")
    span.set_attributes({"fairgate.cached_tokens": 3})
    span.end()
    transfer, prefill = _flushed(receiver, 2)
    assert (prefill.name, prefill.kind, prefill.service_name) == (
        "prefill",
        "SERVER",
        "fairgate-prefill",
    )
    assert prefill.parent_span_id == "b7ad6b7169203331"
    assert prefill.attributes == {"fairgate.prompt_tokens": 7, "fairgate.cached_tokens": 3}
    assert [e.name for e in prefill.events] == ["kv_landed"]
    assert transfer.parent_span_id == prefill.span_id
    assert transfer.trace_id == prefill.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert transfer.start_ns == 1_000
    assert transfer.status_code == "ERROR"
    assert transfer.attributes["error.type"] == "no_room"
    # The error's message (it may quote the request) is nowhere on the span.
    assert not transfer.status_message
    assert not any("quotes" in str(value) for value in transfer.attributes.values())


def test_an_unsampled_parent_is_followed_and_nothing_is_exported(receiver: OtlpReceiver) -> None:
    _on(receiver)
    span = telemetry.start_span("decode", {"a": 1}, traceparent=REMOTE_UNSAMPLED)
    assert span is not None and not span.is_recording
    assert telemetry.traceparent_of(span).endswith("-00")  # the decision travels on
    assert telemetry.trace_id_of(span) is None
    span.end()
    _flushed(receiver, 0)


def test_root_sampling_by_ratio(receiver: OtlpReceiver) -> None:
    _on(receiver, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.25")
    spans = [telemetry.start_span("chat", {}) for _ in range(2000)]
    sampled = sum(1 for s in spans if s is not None and s.is_recording)
    assert 400 < sampled < 600
    for span in spans:
        assert span is not None
        span.end()
    _flushed(receiver, sampled)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER_ARG": "2", "OTEL_TRACES_SAMPLER": "traceidratio"}, "ratio"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "not supported"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ],
)
def test_settings_that_cannot_work_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        telemetry.setup_tracing(
            "gateway", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **environ}
        )
    assert not telemetry.is_tracing()
