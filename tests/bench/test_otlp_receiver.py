"""The OTLP/HTTP receiver, fed by the real SDK and ``OTLPSpanExporter`` over loopback."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from bench.otlp_receiver import OtlpReceiver, ReceivedEvent, ReceivedSpan

PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module: making one (its TLS context) costs more than a request."""
    with httpx.Client() as client:
        yield client


def _provider(processor: SpanProcessor, service_name: str = "fairgate-test") -> TracerProvider:
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), shutdown_on_exit=False
    )
    provider.add_span_processor(processor)
    return provider


def _one_span_request(attributes: list[KeyValue]) -> bytes:
    span = Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        name="handmade",
        kind=Span.SPAN_KIND_CONSUMER,
        start_time_unix_nano=1_000,
        end_time_unix_nano=3_500_000,
        attributes=attributes,
    )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    serialized: bytes = request.SerializeToString()
    return serialized


def test_sdk_spans_arrive_whole(receiver: OtlpReceiver) -> None:
    provider = _provider(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_url)))
    tracer = provider.get_tracer("fairgate.tests")
    with tracer.start_as_current_span("request", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("tenant_id", "acme")
        parent.set_attribute("num_prompt_tokens", 64)
        parent.set_attribute("ttft_s", 0.25)
        parent.set_attribute("is_streamed", True)
        parent.set_attribute("block_ids", [3, 4, 5])
        parent.set_attribute("roles", ["prefill", "decode"])
        parent.add_event("queued", {"queue_depth": 2})
        with tracer.start_as_current_span("prefill", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.ERROR, "worker gone"))
    provider.shutdown()

    spans = receiver.wait_for(lambda spans: len(spans) == 2, timeout_s=2.0)
    by_name = {span.name: span for span in spans}
    request, prefill = by_name["request"], by_name["prefill"]
    context = parent.get_span_context()
    assert request.trace_id == format(context.trace_id, "032x")
    assert request.span_id == format(context.span_id, "016x")
    assert prefill.trace_id == request.trace_id
    assert prefill.span_id == format(child.get_span_context().span_id, "016x")
    assert request.parent_span_id is None
    assert prefill.parent_span_id == request.span_id
    assert (request.kind, prefill.kind) == ("SERVER", "CLIENT")
    assert request.attributes == {
        "tenant_id": "acme",
        "num_prompt_tokens": 64,
        "ttft_s": 0.25,
        "is_streamed": True,
        "block_ids": (3, 4, 5),
        "roles": ("prefill", "decode"),
    }
    (queued,) = request.events
    assert queued.name == "queued"
    assert queued.attributes == {"queue_depth": 2}
    assert request.start_ns <= queued.time_ns <= request.end_ns
    assert (request.status_code, prefill.status_code) == ("UNSET", "ERROR")
    assert prefill.status_message == "worker gone"
    assert request.start_ns <= prefill.start_ns <= prefill.end_ns <= request.end_ns
    for span in spans:
        assert span.service_name == "fairgate-test"
        assert span.scope_name == "fairgate.tests"
        assert span.resource_attributes["telemetry.sdk.language"] == "python"
    assert receiver.traces() == {request.trace_id: [prefill, request]}  # ended first, sent first
    assert (receiver.num_requests, receiver.num_bad_requests) == (2, 0)


def test_gzip_batches_wake_a_waiter(receiver: OtlpReceiver) -> None:
    """A batch processor exports on its own thread; ``wait_for`` wakes when the batch lands."""
    exporter = OTLPSpanExporter(endpoint=receiver.traces_url, compression=Compression.Gzip)
    provider = _provider(BatchSpanProcessor(exporter, schedule_delay_millis=20), "fairgate-decode")
    tracer = provider.get_tracer("fairgate")
    for step in range(3):
        with tracer.start_as_current_span("decode_step", attributes={"step": step}):
            pass
    spans = receiver.wait_for(lambda spans: len(spans) == 3, timeout_s=2.0)
    provider.shutdown()
    assert [span.attributes["step"] for span in spans] == [0, 1, 2]
    assert {span.service_name for span in spans} == {"fairgate-decode"}
    assert receiver.num_bad_requests == 0


def test_every_value_type_decodes(receiver: OtlpReceiver, http: httpx.Client) -> None:
    attributes = [
        KeyValue(key="raw", value=AnyValue(bytes_value=b"\x00\xff")),
        KeyValue(key="empty", value=AnyValue()),
        KeyValue(
            key="nested",
            value=AnyValue(
                kvlist_value=KeyValueList(values=[KeyValue(key="n", value=AnyValue(int_value=-1))])
            ),
        ),
    ]
    body = _one_span_request(attributes)
    answer = http.post(receiver.traces_url, content=body, headers=PROTOBUF)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/x-protobuf"
    (span,) = receiver.spans()
    assert span.attributes == {"raw": b"\x00\xff", "empty": None, "nested": {"n": -1}}
    assert (span.kind, span.service_name, span.duration_ns) == ("CONSUMER", "", 3_499_000)


def test_otlp_json_with_hex_ids(receiver: OtlpReceiver, http: httpx.Client) -> None:
    document = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "by-hand"},
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "eee19b7ec3c1b173",
                                "name": "from-json",
                                "kind": 2,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "attributes": [{"key": "n", "value": {"intValue": "7"}}],
                                "events": [{"name": "e", "timeUnixNano": "1544712660500000000"}],
                                "status": {"code": 1},
                            }
                        ],
                    }
                ],
            }
        ]
    }
    answer = http.post(receiver.traces_url, json=document)
    assert (answer.status_code, answer.json()) == (200, {})
    assert receiver.spans() == [
        ReceivedSpan(
            service_name="json-svc",
            name="from-json",
            trace_id="5b8efff798038103d269b633813fc60c",
            span_id="eee19b7ec3c1b174",
            parent_span_id="eee19b7ec3c1b173",
            kind="SERVER",
            start_ns=1544712660000000000,
            end_ns=1544712661000000000,
            attributes={"n": 7},
            events=(ReceivedEvent("e", 1544712660500000000, {}),),
            status_code="OK",
            status_message="",
            scope_name="by-hand",
            resource_attributes={"service.name": "json-svc"},
        )
    ]


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"not a protobuf", PROTOBUF, 400),
        (b"not gzip", {**PROTOBUF, "Content-Encoding": "gzip"}, 400),
        (gzip.compress(b"\xff\xff\xff"), {**PROTOBUF, "Content-Encoding": "gzip"}, 400),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400),
        (json.dumps({"resourceSpans": 3}).encode(), {"Content-Type": "application/json"}, 400),
        (b"", {"Content-Type": "text/plain"}, 415),
        (b"", {**PROTOBUF, "Content-Encoding": "br"}, 415),
    ],
    ids=[
        "garbage",
        "not-gzip",
        "gzipped-garbage",
        "json-array",
        "json-wrong-shape",
        "unknown-type",
        "unknown-encoding",
    ],
)
def test_undecodable_requests_are_refused_and_counted(
    receiver: OtlpReceiver, http: httpx.Client, body: bytes, headers: dict[str, str], status: int
) -> None:
    answer = http.post(receiver.traces_url, content=body, headers=headers)
    assert answer.status_code == status
    assert (receiver.num_requests, receiver.num_bad_requests) == (1, 1)
    assert receiver.spans() == []


def test_a_span_with_a_short_trace_id_is_refused(
    receiver: OtlpReceiver, http: httpx.Client
) -> None:
    request = ExportTraceServiceRequest()
    request.ParseFromString(_one_span_request([]))
    request.resource_spans[0].scope_spans[0].spans[0].trace_id = b"\x01" * 8
    answer = http.post(receiver.traces_url, content=request.SerializeToString(), headers=PROTOBUF)
    assert answer.status_code == 400
    assert "trace_id has 8 bytes" in answer.text
    assert receiver.num_bad_requests == 1


def test_other_paths_are_not_found_and_not_counted(
    receiver: OtlpReceiver, http: httpx.Client
) -> None:
    answer = http.post(receiver.endpoint + "/v1/metrics", content=b"", headers=PROTOBUF)
    assert answer.status_code == 404
    assert receiver.num_requests == 0


def test_wait_for_times_out_naming_what_arrived(receiver: OtlpReceiver, http: httpx.Client) -> None:
    http.post(receiver.traces_url, content=_one_span_request([]), headers=PROTOBUF)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"1 spans from 1 requests .*\(no service.name\)"):
        receiver.wait_for(lambda spans: len(spans) > 1, timeout_s=0.1)
    assert 0.1 <= time.monotonic() - started < 1.0
    receiver.clear()
    assert (receiver.spans(), receiver.num_requests) == ([], 0)


async def test_works_inside_an_event_loop(receiver: OtlpReceiver) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            receiver.traces_url, content=_one_span_request([]), headers=PROTOBUF
        )
    assert answer.status_code == 200
    assert [span.name for span in receiver.spans()] == ["handmade"]


def test_close_ends_kept_alive_connections_and_threads() -> None:
    threads_before = set(threading.enumerate())
    client = httpx.Client()  # keeps its connection open across the close below
    try:
        with OtlpReceiver() as receiver:
            for _ in range(2):
                answer = client.post(
                    receiver.traces_url, content=_one_span_request([]), headers=PROTOBUF
                )
                assert answer.status_code == 200
            assert len(set(threading.enumerate()) - threads_before) >= 2  # server + connection
        assert set(threading.enumerate()) - threads_before == set()
        with pytest.raises(RuntimeError, match="not started"):
            _ = receiver.endpoint
    finally:
        client.close()
