"""``transfer.otlp_json``: the JSON it sends is the SDK's own protobuf export, field for field
(both read back into ``ExportTraceServiceRequest``), and it reaches a real OTLP receiver."""

from __future__ import annotations

from google.protobuf import json_format
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from bench.otlp_receiver import OtlpReceiver
from transfer.otlp_json import OtlpJsonSpanExporter, encode_spans_json


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: object) -> SpanExportResult:
        self.spans += list(spans)  # type: ignore[call-overload]
        return SpanExportResult.SUCCESS


def _spans() -> list[ReadableSpan]:
    kept = _Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "fairgate-test"}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("fairgate", "1.2")
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1)
    )
    parent_context = trace.set_span_in_context(NonRecordingSpan(remote))
    root = tracer.start_span(
        "chat m",
        parent_context,
        SpanKind.SERVER,
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.max_tokens": 16,
            "fairgate.counter": 12.5,
            "fairgate.stream": False,
            "gen_ai.response.finish_reasons": ("stop", "length"),
            "fairgate.big": 2**62,
        },
    )
    root.add_event("first_token", {"fairgate.n": 1})
    child = tracer.start_span("queue", trace.set_span_in_context(root), SpanKind.INTERNAL, {})
    child.set_status(StatusCode.ERROR, "no room")
    child.end()
    root.end()
    provider.shutdown()
    return kept.spans


def _as_dict(request: ExportTraceServiceRequest) -> dict[str, object]:
    """The request as a dict, span flags without their low byte: OTLP puts the W3C trace flags
    there (ours do), the SDK's protobuf encoder leaves it 0."""
    for resource in request.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                span.flags &= ~0xFF
    return json_format.MessageToDict(request)


def test_the_json_is_the_sdk_protobuf_export() -> None:
    spans = _spans()
    from_protobuf = encode_spans(spans)
    from_json = ExportTraceServiceRequest()
    # OTLP/JSON carries ids in hex; protobuf's JSON reader wants base64 (as the receiver does).
    import base64
    import json

    document = json.loads(encode_spans_json(spans))
    for resource in document["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    json_format.ParseDict(document, from_json)
    assert _as_dict(from_json) == _as_dict(from_protobuf)


def test_batches_reach_a_receiver_plain_and_gzipped() -> None:
    spans = _spans()
    with OtlpReceiver() as receiver:
        for compression in ("none", "gzip"):
            exporter = OtlpJsonSpanExporter(receiver.traces_url, compression=compression)
            assert exporter.export(spans) is SpanExportResult.SUCCESS
            exporter.shutdown()
        received = receiver.spans()
        assert receiver.num_bad_requests == 0
    assert [s.name for s in received] == ["queue", "chat m"] * 2
    root = received[1]
    assert root.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent_span_id == "b7ad6b7169203331"
    assert root.kind == "SERVER" and root.service_name == "fairgate-test"
    assert root.attributes["gen_ai.response.finish_reasons"] == ("stop", "length")
    assert received[0].status_code == "ERROR"


def test_a_receiver_that_is_gone_fails_the_batch_without_raising() -> None:
    with OtlpReceiver() as receiver:
        url = receiver.traces_url
    exporter = OtlpJsonSpanExporter(url, timeout_s=2.0)
    assert exporter.export(_spans()) is SpanExportResult.FAILURE


def test_a_counting_receiver_counts_without_keeping() -> None:
    spans = _spans()
    with OtlpReceiver(count_only=True) as receiver:
        exporter = OtlpJsonSpanExporter(receiver.traces_url)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(spans[:1]) is SpanExportResult.SUCCESS
        exporter.shutdown()
        assert (receiver.num_spans, receiver.num_requests, receiver.spans()) == (3, 2, [])
