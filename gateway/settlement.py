"""How an admitted request ends, whatever ends it (its answer sent, a failure, its client gone,
the gateway stopping): ``Settlement.finish`` settles its quota reservation with the work done,
records the usage billed (what its client received: ``billed``), counts it in the metrics, ends
its span and logs its one line, never its text. Only the first call for a request counts.
Torch-free.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from opentelemetry.util.types import AttributeValue

from gateway.admission import Admitted
from gateway.errors import ClientError
from gateway.gatekeeper import end_span, outcome_of
from gateway.generation import Generation, TokenUsage
from gateway.in_flight import RequestsInFlight
from gateway.metrics import CLIENT_DISCONNECTED, GatewayMetrics, RequestRecord
from gateway.openai_requests import GenerationRequest
from gateway.overload import LoadGuard
from gateway.quotas import QuotaManager
from gateway.tenants import Tenant, UsageDelta
from gateway.usage import UsageRecorder
from transfer.errors import FairgateError
from transfer.telemetry import SpanRecord, trace_id_of

__all__ = ["Run", "Settlement", "billed"]

logger = logging.getLogger("fairgate.requests")


@dataclass(slots=True)
class Run:
    """One admitted request, from admission to its last record (the route keeps what reached
    its client up to date)."""

    request: GenerationRequest
    tenant: Tenant
    admitted: Admitted
    generation: Generation
    completion_id: str
    created: int
    is_finished: bool = False
    # What reached the client (the billing rule, ``billed``): a whole answer, or the
    # completion tokens generated up to the last text event a stream sent.
    is_delivered: bool = False
    num_delivered_tokens: int = 0


def billed(run: Run) -> TokenUsage:
    """What the request is billed (the README's rule): all of it when the whole answer was
    delivered; after a failure or a client that left, its prompt and the completion tokens that
    reached the client, and nothing when none did."""
    usage = run.generation.usage
    if run.is_delivered:
        return usage
    if run.num_delivered_tokens == 0:
        return TokenUsage()
    return TokenUsage(usage.prompt_tokens, usage.cached_tokens, run.num_delivered_tokens)


def _work_done(generation: Generation) -> int:
    """The tokens a request cost the workers, whoever received them: its prompt once computed
    and every token generated. Quotas count this, so a client that hangs up before its answer
    (billed nothing) does not get around its rate limits or budget."""
    usage = generation.usage
    prompt_tokens = usage.prompt_tokens if generation.timing.first_token is not None else 0
    return prompt_tokens + usage.completion_tokens


@dataclass(frozen=True, slots=True)
class Settlement:
    """Ends admitted requests (module docstring), over the parts it records in."""

    in_flight: RequestsInFlight
    load_guard: LoadGuard  # the gatekeeper counted the request in
    quotas: QuotaManager
    usage: UsageRecorder
    metrics: GatewayMetrics

    def finish(self, run: Run, error: BaseException | None) -> None:
        """Settle the quota with the work done, record the usage billed, count it in the metrics,
        end its span and log its one line. Only the first call counts."""
        if run.is_finished:
            return
        run.is_finished = True
        generation = run.generation
        self.in_flight.finished(generation)
        self.load_guard.leave(run.tenant.tenant_id)
        if generation.interrupted is not None and outcome_of(error) == CLIENT_DISCONNECTED:
            error = generation.interrupted  # the gateway cut it: that is its outcome
        usage = billed(run)
        self.quotas.settle(run.admitted.quota, actual_tokens=_work_done(generation))
        if usage.total_tokens:
            self.usage.add(
                UsageDelta(
                    tenant_id=run.tenant.tenant_id,
                    at=time.time(),
                    prompt_tokens=usage.prompt_tokens,
                    cached_tokens=usage.cached_tokens,
                    completion_tokens=usage.completion_tokens,
                    model_id=run.admitted.model.model_id,
                    key_id=run.admitted.key_id,
                    units=run.admitted.cost_factor * usage.total_tokens,
                )
            )
        outcome = outcome_of(error)
        # A failure of ours: the tenant was told less (``public_error``); the log has the cause.
        is_theirs = isinstance(error, ClientError) or outcome == CLIENT_DISCONNECTED
        failure = None if is_theirs else error
        if failure is not None:
            logger.warning("request %s failed: %s", run.completion_id, _error_text(failure))
        record = _record(run, usage, outcome)
        self.metrics.finished(record)
        span = generation.span
        if span is not None and span.is_recording:
            _end_span(span, run, usage, outcome, error)
        if logger.isEnabledFor(logging.INFO):  # built only when read (benchmarks log warnings)
            _log_line(run, record)


def _record(run: Run, usage: TokenUsage, outcome: str) -> RequestRecord:
    """The request for the metrics: what it was billed, and where its time went."""
    generation = run.generation
    timing = generation.timing
    return RequestRecord(
        tenant=run.tenant.name,
        slo_class=run.admitted.slo_class,
        outcome=outcome,
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        completion_tokens=usage.completion_tokens,
        queue_s=None if timing.placed is None else timing.placed - timing.received,
        ttft_s=None if timing.first_token is None else timing.first_token - timing.received,
        e2e_s=time.monotonic() - timing.received,
        num_preemptions=generation.num_preemptions,
        model=run.admitted.model.model_id,
    )


def _end_span(
    span: SpanRecord, run: Run, usage: TokenUsage, outcome: str, error: BaseException | None
) -> None:
    generation = run.generation
    ended: dict[str, AttributeValue] = {
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "fairgate.cached_tokens": usage.cached_tokens,
        "fairgate.preemptions": generation.num_preemptions,
    }
    if generation.finish_reason is not None:
        ended["gen_ai.response.finish_reasons"] = (generation.finish_reason,)
    if run.admitted.is_demoted:
        ended["fairgate.demoted"] = True
    span.set_attributes(ended)
    end_span(span, outcome, error)


def _log_line(run: Run, record: RequestRecord) -> None:
    """The request's one INFO line, its fields also structured (``extra``) for JSON logs."""
    fields = {
        "request_id": run.completion_id,
        "tenant": record.tenant,
        "slo_class": record.slo_class,
        "outcome": record.outcome,
        "finish_reason": run.generation.finish_reason,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "completion_tokens": record.completion_tokens,
        "queue_ms": None if record.queue_s is None else round(record.queue_s * 1e3, 1),
        "ttft_ms": None if record.ttft_s is None else round(record.ttft_s * 1e3, 1),
        "latency_ms": round(record.e2e_s * 1e3, 1),
        "preemptions": record.num_preemptions,
        "trace_id": trace_id_of(run.generation.span),
    }
    logger.info(
        "request %s",
        " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items()),
        extra={"fields": fields},
    )


def _error_text(error: BaseException) -> str:
    if isinstance(error, FairgateError):
        return f"{error.message} ({error.code})"
    return repr(error)
