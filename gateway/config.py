"""The gateway's configuration: one TOML file decoded into typed structs, every field with a
default, each overridable by a ``FAIRGATE_<SECTION>_<FIELD>`` environment variable (lists are
comma-separated) and then by command-line flags. ``fairgate up`` needs no file at all.

    [gateway]     host, port, admin_token, worker URLs, poll interval, body limit, shutdown grace
    [store]       path of the SQLite file
    [model]       which tokenizer (the workers' model)
    [scheduler]   policy, queue timeout and bounds, prefill admission cap
    [telemetry]   OTLP endpoint, trace sampling ratio, log format, metrics window
    [replicas]    Redis URL for what gateway replicas share, sync intervals, lease of quota
                  reservations
    [[slo_classes]]  name, rank, TTFT / TPOT targets, sheddable, longest queue wait

Torch-free.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "Config",
    "ConfigError",
    "GatewaySection",
    "ModelSection",
    "ReplicasSection",
    "SchedulerSection",
    "SloClass",
    "StoreSection",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration file or variable that does not decode, named with the field at fault."""


class GatewaySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str = ""  # required to start; `fairgate up` generates one
    prefill_workers: list[str] = []
    decode_workers: list[str] = []
    colocated_workers: list[str] = []
    poll_interval_s: float = 0.5
    # A larger body is refused with 413 before it is read.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 8 << 20
    ready_timeout_s: float = 600.0
    # On SIGTERM: how long requests in flight may take to finish before they are ended with a
    # clean error (new connections are refused at once).
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0.0)] = 30.0
    # The gateway is overloaded while its event loop lags more than this (``gateway.overload``):
    # tenants holding their share of its requests are then refused with 503 overloaded.
    max_loop_lag_s: Annotated[float, msgspec.Meta(gt=0.0)] = 0.05
    # A non-streaming request's tokens come from the decode worker at most this often (stop
    # strings are seen at most this late); 0: every step's tokens at once.
    unstreamed_flush_s: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.05
    # A request whose worker fails (dies, hangs, drops its stream) goes on elsewhere with its
    # output so far, at most this many times; then it ends with a clean error.
    max_migrations: Annotated[int, msgspec.Meta(ge=0)] = 3
    # While a streamed request waits (queued again after a failure, say), an SSE comment line
    # goes out this often, so proxies do not time the stream out.
    sse_keepalive_s: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0
    # A worker with work that completes no engine step for max(min_progress_deadline_s,
    # progress_deadline_steps × its measured step time) is ejected as hung
    # (``gateway.liveness``); it comes back after a successful health check.
    progress_deadline_steps: Annotated[float, msgspec.Meta(gt=0.0)] = 50.0
    min_progress_deadline_s: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0
    # …and before its first step has been measured (a first prefill step has no time cap yet).
    unmeasured_progress_deadline_s: Annotated[float, msgspec.Meta(gt=0.0)] = 120.0
    # Workers started with ``--gateway URL`` register themselves with this token; "" turns
    # self-registration off (only configured and admin-added workers are used).
    registration_token: str = ""
    # Workers found by DNS: "host:port" names resolved every ``dns_refresh_s`` (a Kubernetes
    # headless Service resolves to one address per ready pod); each address is a worker.
    prefill_dns: list[str] = []
    decode_dns: list[str] = []
    dns_refresh_s: Annotated[float, msgspec.Meta(gt=0.0)] = 5.0


class StoreSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``url`` empty: SQLite at ``path`` (the embedded default); ``postgresql://…``: PostgreSQL,
    which several gateway replicas share."""

    path: str = "fairgate.db"
    url: str = ""


class ReplicasSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What gateway replicas share, in Redis at ``redis_url`` ("" : one gateway, all in its
    memory): quota reservations (each with a lease of ``reservation_lease_s``, renewed while its
    request runs, so a replica that dies does not hold them forever), the fair policies'
    per-tenant service, published and read every ``sync_interval_s``, and admin changes, which
    reach every replica within ``admin_sync_s``."""

    redis_url: str = ""
    sync_interval_s: Annotated[float, msgspec.Meta(gt=0.0)] = 0.05
    admin_sync_s: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    reservation_lease_s: Annotated[float, msgspec.Meta(gt=0.0)] = 30.0


class ModelSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The gateway's own model: default, tiny, null or a path. Its tokenizer serves the pools
    whose workers announce none, and its token is the unit of the models' cost factors
    (``gateway.model_costs``). Each pool's own tokenizer comes from its workers."""

    name: str = "default"


class SchedulerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``policy``: one of ``gateway.policies.POLICY_NAMES``, or ``auto``: ``d2lpm`` with several
    prefill workers, else ``dlpm``. The rest configure the fair policies (``scheduling.md``):
    service costs, DLPM's and D²LPM's quanta, the prefix index, the hot-spot guard, how far a
    tenant may run ahead while the request whose turn it is cannot be placed, and when an idle
    tenant's state is dropped."""

    policy: str = "auto"
    queue_timeout_s: Annotated[float, msgspec.Meta(gt=0.0)] = 120.0
    # A tenant with this many requests waiting gets 429 queue_full for more (``gateway.dispatch``).
    max_queued_per_tenant: Annotated[int, msgspec.Meta(ge=1)] = 256
    max_prefill_inflight_tokens: int = 8192
    # …and at most this many seconds of work at the worker's measured prefill speed: what is
    # sent to a worker runs in its order, not the policy's, so it is kept short.
    max_prefill_inflight_s: Annotated[float, msgspec.Meta(gt=0.0)] = 0.025
    # Ask a decode worker to preempt lower-class requests when a higher-class one fits nowhere.
    make_room_for_higher_classes: bool = True
    w_in: Annotated[float, msgspec.Meta(gt=0.0)] = 1.0
    w_out: Annotated[float, msgspec.Meta(gt=0.0)] = 2.0
    quantum_tokens: Annotated[float, msgspec.Meta(gt=0.0)] = 4096.0
    worker_quantum_tokens: Annotated[float, msgspec.Meta(gt=0.0)] = 8192.0
    prefix_index_blocks: Annotated[int, msgspec.Meta(ge=1)] = 1 << 16
    # D²LPM routes by load alone when the worker it chose is loaded over this ratio of the least
    # loaded one's…
    hot_spot_ratio: Annotated[float, msgspec.Meta(ge=1.0)] = 1.5
    # …and by this many tokens more than the request's cached prefix there saves (§4).
    hot_spot_margin_tokens: Annotated[int, msgspec.Meta(ge=0)] = 2048
    default_prefill_tok_s: Annotated[float, msgspec.Meta(gt=0.0)] = 5000.0
    max_borrow_tokens: Annotated[float, msgspec.Meta(ge=0.0)] = 4096.0
    # The TPOT guard (``gateway.scheduler.keeps_tpot``): while a class with a TPOT target is
    # active (requests queued or in flight, or within ``tpot_guard_hold_s`` of that), requests
    # of looser classes go only to decode workers whose predicted step stays within this
    # fraction of the tightest active target.
    tpot_headroom: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.8
    tpot_guard_hold_s: Annotated[float, msgspec.Meta(ge=0.0)] = 10.0
    forget_idle_after_s: Annotated[float, msgspec.Meta(ge=0.0)] = 600.0


class TelemetrySection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Traces and logs (``transfer.telemetry``). The standard ``OTEL_*`` environment variables
    win over ``otlp_endpoint`` and ``sampling_ratio``. ``metrics_window_s``: the sliding window
    of the SLO-attainment and fairness gauges."""

    otlp_endpoint: str = ""  # OTLP/HTTP base URL, e.g. http://collector:4318; "" and no env: off
    sampling_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    log_format: Literal["text", "json"] = "text"
    metrics_window_s: Annotated[float, msgspec.Meta(gt=0.0)] = 60.0


class SloClass(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A service class (``scheduling.md`` §5): higher ``rank`` is served first."""

    name: str
    rank: int
    ttft_target_s: float
    tpot_target_s: float | None = None
    sheddable: bool = False
    # A tenant's new requests of this class get 429 queue_full while its oldest waiting one has
    # waited longer than this (None: a quarter of ``ttft_target_s``, so what is admitted still
    # has most of its TTFT budget for the workers).
    max_queue_wait_s: Annotated[float, msgspec.Meta(gt=0.0)] | None = None

    @property
    def queue_wait_limit_s(self) -> float:
        if self.max_queue_wait_s is None:
            return self.ttft_target_s / 4
        return self.max_queue_wait_s


DEFAULT_SLO_CLASSES = [
    SloClass("interactive", rank=3, ttft_target_s=2.0, tpot_target_s=0.25),
    SloClass("standard", rank=2, ttft_target_s=10.0),
    SloClass("batch", rank=1, ttft_target_s=3600.0, sheddable=True),
]


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    gateway: GatewaySection = GatewaySection()
    store: StoreSection = StoreSection()
    model: ModelSection = ModelSection()
    scheduler: SchedulerSection = SchedulerSection()
    telemetry: TelemetrySection = TelemetrySection()
    replicas: ReplicasSection = ReplicasSection()
    slo_classes: list[SloClass] = msgspec.field(default_factory=lambda: list(DEFAULT_SLO_CLASSES))

    def slo_class(self, name: str) -> SloClass | None:
        return next((c for c in self.slo_classes if c.name == name), None)

    @property
    def lowest_class(self) -> SloClass:
        return min(self.slo_classes, key=lambda c: c.rank)


_SECTIONS = ("gateway", "store", "model", "scheduler", "telemetry", "replicas")


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """File, then environment, then ``overrides`` ({section: {field: value}}, e.g. CLI flags)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    for section in _SECTIONS:
        fields = msgspec.structs.fields(_section_type(section))
        for field in fields:
            value = environ.get(f"FAIRGATE_{section}_{field.name}".upper())
            if value is not None:
                raw.setdefault(section, {})[field.name] = _from_env(value, field.type)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"configuration: {exc}") from exc
    if not config.slo_classes:
        raise ConfigError("configuration: at least one SLO class is needed")
    return config


def _section_type(section: str) -> type[msgspec.Struct]:
    types: dict[str, type[msgspec.Struct]] = {
        "gateway": GatewaySection,
        "store": StoreSection,
        "model": ModelSection,
        "scheduler": SchedulerSection,
        "telemetry": TelemetrySection,
        "replicas": ReplicasSection,
    }
    return types[section]


def _from_env(value: str, annotation: Any) -> Any:
    if annotation == list[str]:
        return [item.strip() for item in value.split(",") if item.strip()]
    return value  # msgspec.convert(strict=False) turns "8000" into 8000
