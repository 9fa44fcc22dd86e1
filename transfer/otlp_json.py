"""An OTLP/HTTP span exporter that encodes JSON with msgspec (``OTEL_EXPORTER_OTLP_PROTOCOL=
http/json``, fairgate's default).

Why not the SDK's protobuf exporter: building the protobuf messages costs about 130 µs of
Python per span on our 2-core machines, three times what building OTLP's JSON mapping and
encoding it with msgspec costs, and every process exports from a thread that takes the
interpreter lock from the request path. Collectors take both encodings on the same
``/v1/traces`` route. The JSON mapping follows the OTLP specification: trace and span ids in
hex, enums as integers, 64-bit integers as decimal strings, lowerCamelCase field names.

Settings are the standard ones: ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``..._HEADERS``
(``k=v,k2=v2``, URL-encoded), ``..._TIMEOUT`` (milliseconds) and ``..._COMPRESSION`` (``gzip``
or ``none``). TLS endpoints are verified against the system's CA store.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import ssl
import threading
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["OtlpJsonSpanExporter", "encode_spans_json"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
_ENCODER = msgspec.json.Encoder()

# What a request on a kept-alive connection that the collector closed while it sat idle fails
# with: the collector's FIN, read as an empty status line (``RemoteDisconnected``), its RST
# (``ConnectionResetError``; ``BrokenPipeError`` on the write; ``ConnectionAbortedError`` on
# Windows), or over TLS a write after the peer went (``SSLEOFError``). Not ``TimeoutError`` (a
# closed socket fails at once; a silent collector would cost a second timeout), nor
# ``IncompleteRead`` or another ``BadStatusLine`` (the collector read the batch and answered:
# sending it again would duplicate it).
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    ssl.SSLEOFError,
)


def _value(value: Any) -> dict[str, Any]:
    # bool before int: bool is an int
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bytes):
        return {"bytesValue": base64.b64encode(value).decode()}
    return {"arrayValue": {"values": [_value(item) for item in value]}}


def _attributes(attributes: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    if not attributes:
        return []
    return [{"key": key, "value": _value(value)} for key, value in attributes.items()]


def _span(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    encoded: dict[str, Any] = {
        "traceId": f"{context.trace_id:032x}",
        "spanId": f"{context.span_id:016x}",
        "name": span.name,
        "kind": span.kind.value + 1,  # the API's enum starts at INTERNAL = 0, OTLP's at 1
        "startTimeUnixNano": str(span.start_time),
        "endTimeUnixNano": str(span.end_time),
        "attributes": _attributes(span.attributes),
        # Bits 0-7: the W3C trace flags; 0x100: whether the parent is remote is known.
        "flags": 0x100 | int(context.trace_flags),
    }
    parent = span.parent
    if parent is not None:
        encoded["parentSpanId"] = f"{parent.span_id:016x}"
        encoded["flags"] |= 0x200 if parent.is_remote else 0
    if span.events:
        encoded["events"] = [
            {
                "timeUnixNano": str(event.timestamp),
                "name": event.name,
                "attributes": _attributes(event.attributes),
            }
            for event in span.events
        ]
    status = span.status
    encoded["status"] = (
        {"code": status.status_code.value, "message": status.description or ""}
        if status.status_code.value  # UNSET is 0 in both enums
        else {}
    )
    return encoded


def encode_spans_json(spans: Sequence[ReadableSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` in OTLP's JSON mapping, spans grouped by resource and
    instrumentation scope."""
    by_resource: dict[int, tuple[Any, dict[tuple[str, str | None], list[dict[str, Any]]]]] = {}
    for span in spans:
        resource = span.resource
        _, scopes = by_resource.setdefault(id(resource), (resource, {}))
        scope = span.instrumentation_scope
        key = ("", None) if scope is None else (scope.name, scope.version)
        scopes.setdefault(key, []).append(_span(span))
    return _ENCODER.encode(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": _attributes(resource.attributes)},
                    "scopeSpans": [
                        {
                            "scope": {"name": name, **({"version": version} if version else {})},
                            "spans": encoded,
                        }
                        for (name, version), encoded in scopes.items()
                    ],
                }
                for resource, scopes in by_resource.values()
            ]
        }
    )


class OtlpJsonSpanExporter(SpanExporter):
    """POSTs each batch to ``url`` (the full ``…/v1/traces`` URL) on one kept-alive connection;
    a failed batch is logged and dropped (the processor's next batch tries again)."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        compression: str = "none",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) OTLP endpoint: {url!r}")
        if compression not in ("none", "gzip"):
            raise ValueError(f"OTLP compression must be gzip or none, got {compression!r}")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._is_gzip = compression == "gzip"
        self._timeout_s = timeout_s
        self._connection: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()  # the processor's thread, and a flush at shutdown
        self._is_failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = encode_spans_json(spans)
        if self._is_gzip:
            body = gzip.compress(body, compresslevel=1)
        with self._lock:
            try:
                status = self._post_once_more_if_stale(body)
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                return self._failed(f"{exc!r}")
            if 200 <= status < 300:
                if self._is_failing:
                    logger.info("OTLP export to %s works again", self._host)
                self._is_failing = False
                return SpanExportResult.SUCCESS
            return self._failed(f"HTTP {status}")

    def _post_once_more_if_stale(self, body: bytes) -> int:
        """Retry only a kept-alive connection the collector closed while it sat idle: any other
        failure (refused, unresolvable, timed out) would fail again and block the processor's
        thread twice as long."""
        # http.client drops the socket after a response that closes it, and we drop it after
        # a failure: a socket still there has carried a request before.
        is_reused = self._connection is not None and self._connection.sock is not None
        try:
            return self._post(body)
        except _STALE_CONNECTION_ERRORS:
            if not is_reused:
                raise
        self._close()
        return self._post(body)

    def _post(self, body: bytes) -> int:
        if self._connection is None:
            if self._scheme == "https":
                self._connection = http.client.HTTPSConnection(
                    self._host,
                    self._port,
                    timeout=self._timeout_s,
                    context=ssl.create_default_context(),
                )
            else:
                self._connection = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout_s
                )
        self._connection.request("POST", self._path, body, self._headers)
        response = self._connection.getresponse()
        response.read()
        return response.status

    def _failed(self, reason: str) -> SpanExportResult:
        if not self._is_failing:  # once per outage, not once per batch
            logger.warning("OTLP export to %s failed: %s; spans are dropped", self._host, reason)
        self._is_failing = True
        return SpanExportResult.FAILURE

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def shutdown(self) -> None:
        with self._lock:
            self._close()
