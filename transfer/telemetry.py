"""Traces and request logs for every fairgate process (the gateway and both worker roles).
Torch-free.

Tracing is off unless asked for, and off costs one ``if`` per request: ``is_tracing()`` is
false and no span, header or attribute is made. It is on when ``setup_tracing`` finds an exporter:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (OTLP over HTTP),
  or an ``otlp_endpoint`` from the gateway's config file. ``OTEL_EXPORTER_OTLP_PROTOCOL``:
  ``http/json`` by default (``transfer.otlp_json``: a third of the protobuf encoder's CPU) or
  ``http/protobuf`` (the SDK's exporter); headers, timeout and compression from the standard
  variables; or
- ``OTEL_TRACES_EXPORTER=console`` (spans as JSON on stdout, for debugging).

``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off whatever else is set.
Sampling follows ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` when set (``always_on``,
``always_off``, ``traceidratio`` and their ``parentbased_`` forms), else the config's ratio
(default 1.0), parent-based: a worker records a request's spans exactly when the gateway did.

Spans are the SDK's: a ``SpanRecord`` (ours) keeps a span's name, ids, times, attributes and
events while it runs, and hands the SDK's batch processor a finished ``ReadableSpan`` when it
ends, for the exporter. The SDK's live ``Span`` would cost ten times the CPU per span (checks
and locks on every attribute, context bookkeeping), and a request makes five.

The batch processor's ``OTEL_BSP_*`` settings apply. Each process names
itself by its role (``fairgate-gateway``, ``fairgate-prefill``, ``fairgate-decode``);
``OTEL_RESOURCE_ATTRIBUTES`` adds to that (``OTEL_SERVICE_NAME`` is not used: one environment
usually starts all three).

Context crosses processes in the W3C ``traceparent`` header of the gateway's calls to the
workers (``traceparent_of``; ``start_span`` reads it). Spans carry counts, ids, times and
names, never prompt or completion text, never a key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import AttributeValue

from transfer.otlp_json import DEFAULT_TIMEOUT_S, OtlpJsonSpanExporter

__all__ = [
    "TRACEPARENT_HEADER",
    "JsonLogFormatter",
    "LogFormat",
    "SpanRecord",
    "configure_logging",
    "is_tracing",
    "setup_tracing",
    "shutdown_tracing",
    "start_child",
    "start_span",
    "trace_id_of",
    "traceparent_of",
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


class SpanRecord:
    """One span of a request, recorded by hand and handed to the SDK's batch processor as a
    finished ``ReadableSpan`` when it ends (a tenth of the CPU of the SDK's live ``Span``:
    no per-attribute checks, no locks, nothing on the context). A span that is not sampled is
    not recorded, but still names its trace for ``traceparent_of``. Thread-safe enough for its
    use: made and ended by one owner; ``set_attributes`` before ``end``."""

    __slots__ = ("_attributes", "_events", "_parent", "context", "kind", "name", "start_ns")

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, AttributeValue],
        start_ns: int | None,
    ) -> None:
        self.name = name
        self.context = context
        self._parent = parent
        self.kind = kind
        self._attributes = dict(attributes) if context.trace_flags.sampled else {}
        self._events: list[Event] = []
        self.start_ns = time.time_ns() if start_ns is None else start_ns

    @property
    def is_recording(self) -> bool:
        return self.context.trace_flags.sampled

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self.is_recording:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        if self.is_recording:
            self._attributes.update(attributes)

    def add_event(self, name: str, timestamp_ns: int | None = None) -> None:
        if self.is_recording:
            self._events.append(Event(name, None, timestamp_ns or time.time_ns()))

    def end(self, error: BaseException | None = None, end_ns: int | None = None) -> None:
        """Hand the finished span to the exporter. ``error``: it failed (its class and code
        are recorded, never its message, which may quote the request)."""
        tracing = _tracing
        if tracing is None or not self.is_recording:
            return
        status = _UNSET
        if error is not None:
            code = getattr(error, "code", None)
            self._attributes["error.type"] = code if isinstance(code, str) else type(error).__name__
            status = _ERROR
        tracing.processor.on_end(
            ReadableSpan(
                self.name,
                self.context,
                self._parent,
                resource=tracing.resource,
                attributes=self._attributes,
                events=self._events,
                kind=self.kind,
                status=status,
                start_time=self.start_ns,
                end_time=time.time_ns() if end_ns is None else end_ns,
                instrumentation_scope=tracing.scope,
            )
        )


@dataclass(slots=True)
class _Tracing:
    """What tracing needs in a process once it is on."""

    processor: SpanProcessor
    resource: Resource
    scope: InstrumentationScope
    ids: RandomIdGenerator
    sample_root: Callable[[int], bool]  # trace id -> sampled, for a trace that starts here
    follow_parent: bool  # a parent's decision is kept (the parentbased_* samplers)


_tracing: _Tracing | None = None
_UNSET = Status(StatusCode.UNSET)
_ERROR = Status(StatusCode.ERROR)


def is_tracing() -> bool:
    """Whether this process traces (``setup_tracing`` found an exporter)."""
    return _tracing is not None


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
    global _tracing
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
    sample_root, follow_parent = _sampler(env, sampling_ratio)
    resource = Resource.create({"service.name": SERVICE_NAMES.get(role, f"fairgate-{role}")})
    _tracing = _Tracing(
        BatchSpanProcessor(exporter),
        resource,
        InstrumentationScope("fairgate"),
        RandomIdGenerator(),
        sample_root,
        follow_parent,
    )
    logger.info("tracing on: %s", type(exporter).__name__)
    return True


def _sampler(env: Mapping[str, str], sampling_ratio: float) -> tuple[Callable[[int], bool], bool]:
    """``OTEL_TRACES_SAMPLER`` (and ``_ARG``), else parent-based on ``sampling_ratio``: how a
    trace that starts here is sampled, and whether a parent's decision is kept."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_traceidratio"
    argument = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    ratio = sampling_ratio
    if name.endswith("traceidratio") and argument:
        try:
            ratio = float(argument)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={argument!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the sampling ratio must be within [0, 1], got {ratio:g}")
    # As the SDK's TraceIdRatioBased: the trace id's low 64 bits under the ratio's bound.
    bound = round(ratio * (1 << 64))
    roots: dict[str, Callable[[int], bool]] = {
        "always_on": lambda trace_id: True,
        "always_off": lambda trace_id: False,
        "traceidratio": lambda trace_id: trace_id & 0xFFFFFFFFFFFFFFFF < bound,
    }
    root = name.removeprefix("parentbased_")
    if root not in roots:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER={name!r}: use always_on, always_off, traceidratio or their "
            "parentbased_ forms"
        )
    return roots[root], name.startswith("parentbased_")


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
    # Milliseconds, as the OTLP exporter specification has it (the SDK's own exporter reads
    # seconds from the variable): read here once for both exporters.
    timeout_ms = setting("TIMEOUT")
    timeout_s = float(timeout_ms) / 1e3 if timeout_ms else DEFAULT_TIMEOUT_S
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # It reads headers and compression itself.
        return OTLPSpanExporter(endpoint=url, timeout=timeout_s)
    if protocol != "http/json":
        raise ValueError(
            f"OTLP protocol {protocol!r} is not supported: use http/json or http/protobuf"
        )
    return OtlpJsonSpanExporter(
        url,
        headers=parse_env_headers(setting("HEADERS") or "", liberal=True),
        timeout_s=timeout_s,
        compression=(setting("COMPRESSION") or "none").strip().lower(),
    )


def shutdown_tracing() -> None:
    """Export what is left and stop (at process exit)."""
    global _tracing
    if _tracing is not None:
        _tracing.processor.shutdown()
    _tracing = None


def start_span(
    name: str,
    attributes: Mapping[str, AttributeValue],
    *,
    traceparent: str | None = None,
    kind: SpanKind = SpanKind.SERVER,
    start_time_ns: int | None = None,
) -> SpanRecord | None:
    """A span of a request arriving here (None while tracing is off), the child of the span a
    ``traceparent`` header names (sampled as it was), else the root of a new trace. Spans are
    often made after the fact, with their ``start_time_ns`` (from ``time.time_ns()``)."""
    tracing = _tracing
    if tracing is None:
        return None
    parent = _parent_of(traceparent)
    if parent is None:
        trace_id = tracing.ids.generate_trace_id()
        sampled = tracing.sample_root(trace_id)
    else:
        trace_id = parent.trace_id
        sampled = (
            parent.trace_flags.sampled if tracing.follow_parent else tracing.sample_root(trace_id)
        )
    context = SpanContext(
        trace_id,
        tracing.ids.generate_span_id(),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    return SpanRecord(name, context, parent, kind, attributes, start_time_ns)


_FALLBACK_IDS = RandomIdGenerator()  # span ids of children made after tracing shut down


def start_child(
    parent: SpanRecord,
    name: str,
    attributes: Mapping[str, AttributeValue],
    start_time_ns: int | None = None,
) -> SpanRecord:
    """A child of ``parent``, sampled as it is. Tracing may have been shut down since the
    parent began (a request still running as the process stops): the child is then not
    recorded, as ``end`` would export nothing anyway."""
    tracing = _tracing
    context = SpanContext(
        parent.context.trace_id,
        _FALLBACK_IDS.generate_span_id() if tracing is None else tracing.ids.generate_span_id(),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.DEFAULT)
        if tracing is None
        else parent.context.trace_flags,
    )
    return SpanRecord(name, context, parent.context, SpanKind.INTERNAL, attributes, start_time_ns)


def traceparent_of(span: SpanRecord) -> str:
    """The W3C ``traceparent`` header value that makes ``span`` the parent on the other side."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _parent_of(traceparent: str | None) -> SpanContext | None:
    """The remote parent a ``traceparent`` header names; None when it is missing or not a
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
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))


def trace_id_of(span: SpanRecord | None) -> str | None:
    """The span's trace id in hex (what a log line carries to lead to its trace)."""
    if span is None or not span.is_recording:
        return None
    return f"{span.context.trace_id:032x}"


# ---- logs -------------------------------------------------------------------------------------

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the fields a record carries
    in ``extra={"fields": {...}}`` (the request log's ids, counts and times). Times in UTC."""

    converter = staticmethod(time.gmtime)  # the "Z" it writes

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
    formatter: logging.Formatter = (
        JsonLogFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT)
    )
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level)
