"""Traces and request logs for every fairgate process (the gateway and both worker roles).
Torch-free.

Tracing is off unless asked for, and off costs one ``if`` per request: ``tracer()`` is None and
no span, header or attribute is made. It is on when ``setup_tracing`` finds an exporter:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (OTLP over HTTP),
  or an ``otlp_endpoint`` from the gateway's config file. ``OTEL_EXPORTER_OTLP_PROTOCOL``:
  ``http/json`` by default (``transfer.otlp_json``: a third of the protobuf encoder's CPU) or
  ``http/protobuf`` (the SDK's exporter); headers, timeout and compression from the standard
  variables; or
- ``OTEL_TRACES_EXPORTER=console`` (spans as JSON on stdout, for debugging).

``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off whatever else is set.
Sampling follows ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` when set, else the
config's ratio (default 1.0), always parent-based: a worker records a request's spans exactly
when the gateway did. The batch processor's ``OTEL_BSP_*`` settings apply. Each process names
itself by its role (``fairgate-gateway``, ``fairgate-prefill``, ``fairgate-decode``);
``OTEL_RESOURCE_ATTRIBUTES`` adds to that (``OTEL_SERVICE_NAME`` is not used: one environment
usually starts all three).

Context crosses processes in the W3C ``traceparent`` header of the gateway's calls to the
workers (``traceparent_of``, ``context_of``). Spans carry counts, ids, times and names, never
prompt or completion text, never a key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    Tracer,
)
from opentelemetry.util.types import AttributeValue

from transfer.otlp_json import DEFAULT_TIMEOUT_S, OtlpJsonSpanExporter, headers_from

__all__ = [
    "TRACEPARENT_HEADER",
    "JsonLogFormatter",
    "LogFormat",
    "configure_logging",
    "context_of",
    "end_with_error",
    "setup_tracing",
    "shutdown_tracing",
    "start_child",
    "start_span",
    "trace_id_of",
    "traceparent_of",
    "tracer",
]

logger = logging.getLogger(__name__)

TRACEPARENT_HEADER = "traceparent"
SERVICE_NAMES = {
    "gateway": "fairgate-gateway",
    "prefill": "fairgate-prefill",
    "decode": "fairgate-decode",
    "colocated": "fairgate-decode",
}
LogFormat = Literal["text", "json"]

_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def tracer() -> Tracer | None:
    """This process's tracer, None while tracing is off."""
    return _tracer


def setup_tracing(
    role: str,
    *,
    otlp_endpoint: str | None = None,
    sampling_ratio: float = 1.0,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Turn tracing on for a process of ``role`` if an exporter is configured (module
    docstring); True when it is on. ``otlp_endpoint`` and ``sampling_ratio`` come from a config
    file; the environment's ``OTEL_*`` settings win over them."""
    global _tracer, _provider
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter_name == "none":
        return False
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name not in ("", "otlp"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: use otlp, console or none")
    else:
        found = _otlp_exporter(env, otlp_endpoint)
        if found is None:
            return False  # nothing to export to
        exporter = found
    if not 0.0 <= sampling_ratio <= 1.0:
        raise ValueError(f"the sampling ratio must be within [0, 1], got {sampling_ratio:g}")
    # Without OTEL_TRACES_SAMPLER the SDK would sample everything; the config's ratio instead
    # (1.0 by ALWAYS_ON, which decides for less than the ratio sampler).
    sampler: Sampler | None = None
    if not env.get("OTEL_TRACES_SAMPLER"):
        root = ALWAYS_ON if sampling_ratio == 1.0 else TraceIdRatioBased(sampling_ratio)
        sampler = ParentBased(root)
    resource = Resource.create({"service.name": SERVICE_NAMES.get(role, f"fairgate-{role}")})
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer("fairgate")
    logger.info("tracing on: %s", type(exporter).__name__)
    return True


def _otlp_exporter(env: Mapping[str, str], otlp_endpoint: str | None) -> SpanExporter | None:
    """The OTLP/HTTP exporter the environment (or the config's endpoint) asks for, None when
    no endpoint is set. ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/json`` (our default:
    ``transfer.otlp_json``, a third of the CPU) or ``http/protobuf`` (the SDK's exporter)."""

    def setting(name: str) -> str | None:
        return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}")

    url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")  # a full URL, used as it is
    if not url:
        base_url = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or otlp_endpoint
        if not base_url:
            return None
        url = base_url.rstrip("/") + "/v1/traces"
    protocol = (setting("PROTOCOL") or "http/json").strip().lower()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=url)  # it reads headers, timeout, compression itself
    if protocol != "http/json":
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported: use http/json or http/protobuf"
        )
    timeout_ms = setting("TIMEOUT")
    return OtlpJsonSpanExporter(
        url,
        headers=headers_from(setting("HEADERS") or ""),
        timeout_s=float(timeout_ms) / 1e3 if timeout_ms else DEFAULT_TIMEOUT_S,
        compression=(setting("COMPRESSION") or "none").strip().lower(),
    )


def shutdown_tracing() -> None:
    """Export what is left and stop (at process exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def start_span(
    name: str,
    attributes: Mapping[str, AttributeValue],
    *,
    traceparent: str | None = None,
    kind: SpanKind = SpanKind.SERVER,
    start_time_ns: int | None = None,
) -> Span | None:
    """A span of a request arriving here (None while tracing is off), the child of the span a
    ``traceparent`` header names, else the root of a new trace. Spans are made with all the
    attributes known then, in one call, and often after the fact (``start_time_ns``, from
    ``time.time_ns()``): the SDK's cost is per call and per attribute."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        name, context_of(traceparent), kind, attributes, start_time=start_time_ns
    )


def start_child(
    parent: Span,
    name: str,
    attributes: Mapping[str, AttributeValue],
    start_time_ns: int | None = None,
) -> Span:
    """A child of ``parent`` (which exists only while tracing is on)."""
    assert _tracer is not None, "tracing is off: there is no parent span"
    return _tracer.start_span(
        name,
        trace.set_span_in_context(parent),
        SpanKind.INTERNAL,
        attributes,
        start_time=start_time_ns,
    )


def end_with_error(span: Span, error: BaseException) -> None:
    """End ``span`` marked failed by ``error``: its class and code, never its message (which may
    quote the request)."""
    code = getattr(error, "code", None)
    span.set_attribute("error.type", code if isinstance(code, str) else type(error).__name__)
    span.set_status(StatusCode.ERROR)
    span.end()


def traceparent_of(span: Span) -> str:
    """The W3C ``traceparent`` header value that makes ``span`` the parent on the other side."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def context_of(traceparent: str | None) -> Context | None:
    """The parent context a ``traceparent`` header names; None when it is missing or not a
    valid version-00 header (the span then starts a trace of its own)."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def trace_id_of(span: Span | None) -> str | None:
    """The span's trace id in hex (what a log line carries to lead to its trace)."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


# ---- logs -------------------------------------------------------------------------------------

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the fields a record carries
    in ``extra={"fields": {...}}`` (the request log's ids, counts and times)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int | str, log_format: LogFormat = "text") -> None:
    """The root logger's handler and format, for a process's entry point."""
    root = logging.getLogger()
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter(_TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level)
