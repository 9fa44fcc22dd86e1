"""A worker's Prometheus metrics (``GET /metrics`` on every worker, text format).

Read from the engine thread's load snapshot at each scrape: batch size, waiting requests,
queued and running tokens, KV blocks used and total, swapped-out requests, measured prefill
speed, the prefix cache's hit tokens and hit rate, preemptions by mode. Recorded as they happen:
KV transfers (bytes, duration, outcome) on the sending side, KV landings by outcome on the
receiving side. No label names a request or a tenant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.engine_thread import EngineLoad

__all__ = ["WorkerMetrics"]

TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class WorkerMetrics:
    """``load()`` is the engine's latest snapshot, None before the model is loaded. Safe to
    record from any thread (prometheus_client's metrics lock)."""

    def __init__(self, load: Callable[[], EngineLoad | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.transfer_bytes = Counter(
            "fairgate_kv_transfer_bytes",
            "KV bytes shipped to decode workers",
            registry=self.registry,
        )
        self.transfer_seconds = Histogram(
            "fairgate_kv_transfer_seconds",
            "Duration of one request's KV transfer, sender side",
            buckets=TRANSFER_BUCKETS,
            registry=self.registry,
        )
        self.transfers = Counter(
            "fairgate_kv_transfers",
            "KV transfers sent (prefill) or landed (decode), by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(_LoadCollector(load))

    def transfer_sent(self, num_bytes: int, seconds: float, *, is_ok: bool) -> None:
        self.transfers.labels("ok" if is_ok else "failed").inc()
        if is_ok:
            self.transfer_bytes.inc(num_bytes)
            self.transfer_seconds.observe(seconds)

    def transfer_landed(self, *, is_ok: bool) -> None:
        self.transfers.labels("ok" if is_ok else "failed").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LoadCollector(Collector):
    def __init__(self, load: Callable[[], EngineLoad | None]) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        load = self._load()
        if load is None:
            return

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("fairgate_worker_batch_size", "Requests in the running batch", load.num_running)
        yield gauge(
            "fairgate_worker_waiting_requests", "Requests not yet admitted", load.num_waiting
        )
        yield gauge(
            "fairgate_worker_reserved_requests",
            "Decode reservations waiting for their KV",
            load.num_reserved,
        )
        yield gauge(
            "fairgate_worker_queued_tokens",
            "Prompt tokens waiting or admitted and not yet computed",
            load.num_queued_tokens,
        )
        yield gauge(
            "fairgate_worker_running_tokens",
            "Tokens held in the KV cache by running requests",
            load.num_running_tokens,
        )
        yield gauge(
            "fairgate_worker_kv_blocks_used",
            "KV cache blocks in use",
            load.num_total_blocks - load.num_free_blocks,
        )
        yield gauge("fairgate_worker_kv_blocks_total", "KV cache blocks", load.num_total_blocks)
        yield gauge(
            "fairgate_worker_swapped_requests",
            "Requests whose KV waits in host memory",
            load.num_swapped,
        )
        yield gauge(
            "fairgate_worker_prefill_tokens_per_second",
            "Measured prompt throughput (moving average)",
            load.prefill_tok_s,
        )
        yield CounterMetricFamily(
            "fairgate_worker_admitted_tokens",
            "Tokens of the requests admitted",
            value=load.num_admitted_tokens,
        )
        yield CounterMetricFamily(
            "fairgate_worker_prefix_cache_hit_tokens",
            "Admitted tokens found in the prefix cache",
            value=load.num_admitted_cached_tokens,
        )
        preemptions = CounterMetricFamily(
            "fairgate_worker_preemptions", "Requests preempted, by mode", labels=["mode"]
        )
        preemptions.add_metric(["swap"], load.num_swapped_out)
        # Handed back to the gateway, or (a prefill worker) recomputed in place.
        preemptions.add_metric(["recompute"], load.num_preemptions - load.num_swapped_out)
        yield preemptions
