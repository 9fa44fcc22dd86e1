"""``transfer.otlp_json``: the JSON it sends is the SDK's own protobuf export, field for field
(both read back into ``ExportTraceServiceRequest``), and it reaches a real OTLP receiver. A kept
-alive connection the collector closed is retried once on a new one; a refused or silent
collector is tried once."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
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


class _AnswerThenHangUp(BaseHTTPRequestHandler):
    """200 to one request, then the connection is closed without a ``Connection: close``: what a
    collector does to a kept-alive connection that sat idle too long."""

    protocol_version = "HTTP/1.1"  # so the exporter keeps the connection

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # not on the test's stderr


class _HangUpServer(socketserver.TCPServer):
    """Loopback, one connection at a time; ``hung_up`` is released as each is closed."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _AnswerThenHangUp)
        self.num_connections = 0
        self.hung_up = threading.Semaphore(0)

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.num_connections += 1
        self.hung_up.release()


@pytest.fixture
def hang_up_server() -> Iterator[_HangUpServer]:
    server = _HangUpServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _count_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The address of every connection http.client opens from now on (the real
    ``socket.create_connection``, counted)."""
    addresses: list[Any] = []
    create_connection = socket.create_connection

    def counted(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        addresses.append(address)
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    return addresses


def test_a_kept_alive_connection_the_collector_closed_is_retried_on_a_new_one(
    hang_up_server: _HangUpServer,
) -> None:
    url = f"http://127.0.0.1:{hang_up_server.server_address[1]}/v1/traces"
    exporter = OtlpJsonSpanExporter(url, timeout_s=2.0)
    spans = _spans()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert hang_up_server.hung_up.acquire(timeout=2.0)  # the connection the exporter kept
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert hang_up_server.hung_up.acquire(timeout=2.0)
    assert hang_up_server.num_connections == 2


def test_a_refused_connection_is_tried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as unlistened:  # bound, so no one else takes the port; refuses
        unlistened.bind(("127.0.0.1", 0))
        port = unlistened.getsockname()[1]
        addresses = _count_connections(monkeypatch)
        exporter = OtlpJsonSpanExporter(f"http://127.0.0.1:{port}/v1/traces", timeout_s=2.0)
        assert exporter.export(_spans()) is SpanExportResult.FAILURE
    assert addresses == [("127.0.0.1", port)]


def test_a_collector_that_does_not_answer_costs_one_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never accepts or answers
        port = silent.getsockname()[1]
        addresses = _count_connections(monkeypatch)
        exporter = OtlpJsonSpanExporter(f"http://127.0.0.1:{port}/v1/traces", timeout_s=0.2)
        assert exporter.export(_spans()) is SpanExportResult.FAILURE
        exporter.shutdown()
    assert addresses == [("127.0.0.1", port)]


class _HangUpAtOnce(socketserver.BaseRequestHandler):
    """Reads the request and closes without an answer: on a fresh connection that is the
    collector's failure, not a stale connection's."""

    def handle(self) -> None:
        self.request.recv(65536)


def test_a_fresh_connection_hung_up_on_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    server = socketserver.TCPServer(("127.0.0.1", 0), _HangUpAtOnce)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    try:
        port = server.server_address[1]
        addresses = _count_connections(monkeypatch)
        exporter = OtlpJsonSpanExporter(f"http://127.0.0.1:{port}/v1/traces", timeout_s=2.0)
        assert exporter.export(_spans()) is SpanExportResult.FAILURE
        exporter.shutdown()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert addresses == [("127.0.0.1", port)]
