"""A real OTLP/HTTP trace endpoint on loopback, for the tests and ``fairgate bench gateway
--tracing``. The fairgate processes export OTLP/JSON by default, or protobuf with the SDK's
``OTLPSpanExporter`` (see ``transfer/telemetry.py``); pointing ``OTEL_EXPORTER_OTLP_ENDPOINT``
at an ``OtlpReceiver`` exercises the whole export path — batch processor, encoding,
compression, HTTP — and
hands the spans back as plain records to assert on, or, in the benchmark, makes tracing cost
what it costs against a collector on the same host.

``OtlpReceiver`` serves ``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``, or OTLP/JSON;
``Content-Encoding`` gzip or deflate) from a stdlib ``ThreadingHTTPServer`` on its own threads,
so it needs no event loop and works the same from sync tests, async tests and the benchmark's
main thread. It answers 200 with an empty ``ExportTraceServiceResponse``, 404 on other paths, and
400 (or 411/415) for a request it cannot decode, which it counts instead of storing. Its
accessors are safe to call from any thread at any time, including while exports arrive.

``python -m bench.otlp_receiver [--port P]`` prints one line per span as it arrives; with
``--quiet --exit-with-parent`` it is a child process the way the workers are
(``deploy.launcher.start_child``, as the benchmark starts it).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import gzip
import json
import logging
import signal
import socket
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, TypeAlias

import msgspec
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from deploy.launcher import exit_when_stdin_closes
from engine.process_events import emit_event

__all__ = [
    "TRACES_PATH",
    "AttributeValue",
    "OtlpReceiver",
    "ReceivedEvent",
    "ReceivedSpan",
    "SpanKind",
    "StatusCode",
    "main",
]

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
SpanKind = Literal["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"]
StatusCode = Literal["UNSET", "OK", "ERROR"]
# An OTLP ``AnyValue``: arrays become tuples, key-value lists dicts, an empty value None.
AttributeValue: TypeAlias = (
    str | bool | int | float | bytes | tuple["AttributeValue", ...] | dict[str, "AttributeValue"]
) | None

_SPAN_KINDS: dict[int, SpanKind] = {
    Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUS_CODES: dict[int, StatusCode] = {
    Status.STATUS_CODE_UNSET: "UNSET",
    Status.STATUS_CODE_OK: "OK",
    Status.STATUS_CODE_ERROR: "ERROR",
}
_TRACE_ID_BYTES = 16
_SPAN_ID_BYTES = 8
# OTLP/JSON writes these ids in hex where protobuf's JSON mapping of ``bytes`` expects base64.
_JSON_ID_KEYS = frozenset(
    {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
)


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    """One event of a received span."""

    name: str
    time_ns: int
    attributes: dict[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as an exporter sent it. Ids are lowercase hex (``trace_id`` 32 characters, span
    ids 16); ``parent_span_id`` is None for a root span. ``service_name`` is the resource's
    ``service.name`` ("" when it has none). Frozen; the dicts are not copied, so treat them as
    read-only too."""

    service_name: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: SpanKind
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue]
    events: tuple[ReceivedEvent, ...]
    status_code: StatusCode
    status_message: str
    scope_name: str
    resource_attributes: dict[str, AttributeValue]

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class _BadRequest(Exception):
    """An export request answered with ``status`` (a 4xx) instead of being stored."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _any_value(value: AnyValue) -> AttributeValue:
    match value.WhichOneof("value"):
        case "string_value":
            return value.string_value
        case "bool_value":
            return value.bool_value
        case "int_value":
            return value.int_value
        case "double_value":
            return value.double_value
        case "bytes_value":
            return value.bytes_value
        case "array_value":
            return tuple(_any_value(item) for item in value.array_value.values)
        case "kvlist_value":
            return _attributes(value.kvlist_value.values)
        case _:
            return None


def _attributes(key_values: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    return {key_value.key: _any_value(key_value.value) for key_value in key_values}


def _hex_id(raw: bytes, num_bytes: int, field: str) -> str:
    if len(raw) != num_bytes:
        raise _BadRequest(400, f"{field} has {len(raw)} bytes, not {num_bytes}")
    return raw.hex()


def _received_span(
    span: Span, scope_name: str, resource_attributes: dict[str, AttributeValue]
) -> ReceivedSpan:
    kind = _SPAN_KINDS.get(span.kind)
    status_code = _STATUS_CODES.get(span.status.code)
    if kind is None or status_code is None:
        raise _BadRequest(400, f"span {span.name!r}: unknown kind or status code")
    service_name = resource_attributes.get("service.name")
    events = tuple(
        ReceivedEvent(event.name, event.time_unix_nano, _attributes(event.attributes))
        for event in span.events
    )
    return ReceivedSpan(
        service_name=service_name if isinstance(service_name, str) else "",
        name=span.name,
        trace_id=_hex_id(span.trace_id, _TRACE_ID_BYTES, "trace_id"),
        span_id=_hex_id(span.span_id, _SPAN_ID_BYTES, "span_id"),
        parent_span_id=(
            _hex_id(span.parent_span_id, _SPAN_ID_BYTES, "parent_span_id")
            if span.parent_span_id
            else None
        ),
        kind=kind,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes=_attributes(span.attributes),
        events=events,
        status_code=status_code,
        status_message=span.status.message,
        scope_name=scope_name,
        resource_attributes=resource_attributes,
    )


def _ids_hex_to_base64(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: (
                base64.b64encode(bytes.fromhex(value)).decode()
                if key in _JSON_ID_KEYS and isinstance(value, str)
                else _ids_hex_to_base64(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_ids_hex_to_base64(item) for item in node]
    return node


def _decompress(body: bytes, content_encoding: str) -> bytes:
    encoding = content_encoding.strip().lower()
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, EOFError, zlib.error) as exc:
        raise _BadRequest(400, f"body is not valid {encoding}: {exc}") from exc
    raise _BadRequest(415, f"unsupported Content-Encoding {content_encoding!r}")


def _parse_request(payload: bytes, media_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        if media_type == "application/x-protobuf":
            request.ParseFromString(payload)
        elif media_type == "application/json":
            document = json.loads(payload)
            if not isinstance(document, dict):
                raise _BadRequest(400, "an OTLP/JSON body must be an object")
            json_format.ParseDict(_ids_hex_to_base64(document), request)
        else:
            raise _BadRequest(415, f"unsupported Content-Type {media_type!r}")
    # JSONDecodeError, UnicodeDecodeError and bad hex ids are ValueErrors.
    except (DecodeError, json_format.ParseError, ValueError) as exc:
        raise _BadRequest(400, f"undecodable {media_type} body: {exc}") from exc
    return request


class _ScopeSpans(msgspec.Struct, rename="camel"):
    spans: list[msgspec.Raw] = []


class _ResourceSpans(msgspec.Struct, rename="camel"):
    scope_spans: list[_ScopeSpans] = []


class _TraceRequest(msgspec.Struct, rename="camel"):
    resource_spans: list[_ResourceSpans] = []


def _count(body: bytes, media_type: str, content_encoding: str) -> int:
    """How many spans one export request holds, reading no more of it than that takes (the
    counting receiver of the benchmark: it must not take the CPU from what it measures)."""
    payload = _decompress(body, content_encoding)
    if media_type == "application/json":
        try:
            request = msgspec.json.decode(payload, type=_TraceRequest)
        except msgspec.DecodeError as exc:
            raise _BadRequest(400, f"undecodable {media_type} body: {exc}") from exc
        return sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
    parsed = _parse_request(payload, media_type)
    return sum(len(s.spans) for r in parsed.resource_spans for s in r.scope_spans)


def _decode(body: bytes, media_type: str, content_encoding: str) -> list[ReceivedSpan]:
    """The spans of one export request, or ``_BadRequest`` saying why there are none."""
    request = _parse_request(_decompress(body, content_encoding), media_type)
    spans = []
    for resource_spans in request.resource_spans:
        resource_attributes = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(_received_span(span, scope_spans.scope.name, resource_attributes))
    return spans


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint on ``127.0.0.1`` (module docstring). ``start()`` (or ``with``)
    binds a free port (or ``port``) and serves on background threads; ``close()`` (or leaving
    the ``with``) stops the server, ends open connections and joins every thread it started.

    ``on_span``, if given, is called once per stored span, on a server thread, outside the lock.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        on_span: Callable[[ReceivedSpan], None] | None = None,
        count_only: bool = False,
    ) -> None:
        """``count_only``: keep no spans, only count them (``num_spans``)."""
        self._port = port
        self._on_span = on_span
        self.count_only = count_only
        self._num_counted = 0
        # An RLock underneath: a wait_for predicate may call the accessors.
        self._condition = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._num_requests = 0
        self._num_bad_requests = 0
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    def start(self) -> OtlpReceiver:
        if self._server is not None:
            raise RuntimeError("the OTLP receiver is already started")
        self._server = _Server(self, self._port)
        # A short poll keeps close() quick: shutdown() waits for the serve loop's next poll.
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def close(self) -> None:
        server, serve_thread = self._server, self._serve_thread
        if server is None or serve_thread is None:
            return
        server.shutdown()
        server.end_connections()
        server.server_close()  # joins the connection threads
        serve_thread.join()
        self._server = self._serve_thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT``, e.g. ``http://127.0.0.1:40123``."""
        if self._server is None:
            raise RuntimeError("the OTLP receiver is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def traces_url(self) -> str:
        """The full URL ``OTLPSpanExporter(endpoint=...)`` takes: the endpoint's /v1/traces."""
        return self.endpoint + TRACES_PATH

    @property
    def num_requests(self) -> int:
        """Export requests received on /v1/traces, the rejected ones included."""
        with self._condition:
            return self._num_requests

    @property
    def num_bad_requests(self) -> int:
        """Export requests answered with a 4xx (undecodable, unsupported encoding or type)."""
        with self._condition:
            return self._num_bad_requests

    def spans(self) -> list[ReceivedSpan]:
        """Every span stored so far, in arrival order (a copy)."""
        with self._condition:
            return list(self._spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """The stored spans by trace id, each list in arrival order."""
        by_trace: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans():
            by_trace.setdefault(span.trace_id, []).append(span)
        return by_trace

    def clear(self) -> None:
        """Forget the stored spans and reset both counters."""
        with self._condition:
            self._spans.clear()
            self._num_counted = self._num_requests = self._num_bad_requests = 0

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 5.0
    ) -> list[ReceivedSpan]:
        """Block until ``predicate(spans so far)`` holds and return those spans; re-checked after
        every export request. ``TimeoutError`` after ``timeout_s``, listing what did arrive.

        This blocks the calling thread: from a coroutine whose own event loop produces the
        spans, call it through ``asyncio.to_thread``."""
        with self._condition:
            if self._condition.wait_for(lambda: predicate(list(self._spans)), timeout_s):
                return list(self._spans)
            raise TimeoutError(
                f"no match among the spans received within {timeout_s:g} s: {self._summary()}"
            )

    def _summary(self) -> str:
        """Span names and counts by service, and the request counts (caller holds the lock)."""
        by_service: dict[str, collections.Counter[str]] = {}
        for span in self._spans:
            by_service.setdefault(span.service_name, collections.Counter())[span.name] += 1
        services = "; ".join(
            f"{service or '(no service.name)'}: "
            + ", ".join(f"{name} ×{count}" for name, count in sorted(names.items()))
            for service, names in sorted(by_service.items())
        )
        return (
            f"{len(self._spans)} spans from {self._num_requests} requests "
            f"({self._num_bad_requests} rejected)" + (f" — {services}" if services else "")
        )

    @property
    def num_spans(self) -> int:
        """Spans received (stored or, with ``count_only``, counted)."""
        with self._condition:
            return self._num_counted + len(self._spans)

    def _count(self, num_spans: int) -> None:
        with self._condition:
            self._num_requests += 1
            self._num_counted += num_spans
            self._condition.notify_all()

    def _store(self, spans: list[ReceivedSpan]) -> None:
        with self._condition:
            self._num_requests += 1
            self._spans.extend(spans)
            self._condition.notify_all()
        if self._on_span is not None:
            for span in spans:
                self._on_span(span)

    def _reject(self, reason: str) -> None:
        logger.warning("rejected an OTLP export request: %s", reason)
        with self._condition:
            self._num_requests += 1
            self._num_bad_requests += 1
            self._condition.notify_all()


class _Server(ThreadingHTTPServer):
    """One thread per connection, all joined by ``server_close``. The exporter keeps its
    connection alive between exports, so its thread sits in a read; ``end_connections`` shuts
    the open sockets down first so that every such read returns."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, receiver: OtlpReceiver, port: int) -> None:
        self.receiver = receiver
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def end_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # Already closed by its peer or its thread: nothing left to end.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exception(), OSError):
            # The client went away mid-request, or close() ended the connection.
            logger.debug("OTLP connection from %s ended", client_address, exc_info=True)
        else:  # a defect here or in an on_span callback
            logger.exception("OTLP request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive, as the exporter's requests session expects; idle connections end on their own.
    protocol_version = "HTTP/1.1"
    timeout = 60
    server: _Server

    def do_POST(self) -> None:
        is_traces = self.path.split("?", 1)[0] == TRACES_PATH
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            # Without a length the body's end is unknown (chunked bodies are not supported).
            self.close_connection = True
            if is_traces:
                self.server.receiver._reject("no Content-Length")
            self._reply(411, "text/plain; charset=utf-8", b"Content-Length required")
            return
        body = self.rfile.read(int(length))
        if not is_traces:
            self._reply(404, "text/plain; charset=utf-8", b"only POST /v1/traces is served")
            return
        media_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        receiver = self.server.receiver
        encoding = self.headers.get("Content-Encoding", "")
        try:
            if receiver.count_only:
                receiver._count(_count(body, media_type, encoding))
            else:
                receiver._store(_decode(body, media_type, encoding))
        except _BadRequest as exc:
            receiver._reject(str(exc))
            self._reply(exc.status, "text/plain; charset=utf-8", str(exc).encode())
            return
        if media_type == "application/json":
            self._reply(200, "application/json", b"{}")
        else:
            response = ExportTraceServiceResponse().SerializeToString()
            self._reply(200, "application/x-protobuf", response)

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM, printing service, span name, trace id and duration of
    each span (``--quiet``: only the events a parent process reads)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.otlp_receiver",
        description="Receive OTLP/HTTP traces on 127.0.0.1 and print one line per span.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to listen on (default: a free one; 4318 is where exporters send without "
        "OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="keep and print no span, only count them: announce the endpoint (a 'ready' event) "
        "and, at the end, the counts (a 'stopped' event), as JSON lines for the process that "
        "started this one",
    )
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="shut down when standard input closes"
    )
    args = parser.parse_args(argv)
    print_lock = threading.Lock()

    def print_span(span: ReceivedSpan) -> None:
        with print_lock:
            print(
                f"{span.service_name}  {span.name}  {span.trace_id}  "
                f"{span.duration_ns / 1e6:.3f} ms",
                flush=True,
            )

    # SIGTERM ends it like Ctrl-C (how a benchmark stops it), with the counts printed.
    signal.signal(signal.SIGTERM, lambda signum, frame: _raise_interrupt())
    if args.exit_with_parent:
        exit_when_stdin_closes()
    with OtlpReceiver(
        args.port, on_span=None if args.quiet else print_span, count_only=args.quiet
    ) as receiver:
        # Inside: a parent may stop it as soon as it is announced.
        with contextlib.suppress(KeyboardInterrupt):
            if args.quiet:
                emit_event("ready", endpoint=receiver.endpoint)
            else:
                print(f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver.endpoint}", flush=True)
            threading.Event().wait()
        # Stopping already: another SIGTERM (the parent's stop, or --exit-with-parent's) must
        # not interrupt the stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.quiet:
            # If its parent is gone (--exit-with-parent), nobody reads this.
            with contextlib.suppress(BrokenPipeError):
                emit_event(
                    "stopped",
                    num_spans=receiver.num_spans,
                    num_requests=receiver.num_requests,
                    num_bad_requests=receiver.num_bad_requests,
                )
        else:
            print(
                f"spans={receiver.num_spans} requests={receiver.num_requests} "
                f"bad_requests={receiver.num_bad_requests}",
                flush=True,
            )
    return 0


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
