"""What ``Generation`` tells the metrics besides service: the prompt and cached tokens of each
prefill, on the worker that ran it, and the tenant's weight as its policy takes it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import pytest

from engine.tokenizer import Tokenizer
from gateway import generation
from gateway.config import DEFAULT_SLO_CLASSES
from gateway.dispatch import Dispatcher
from gateway.generation import Finished, Generation
from gateway.metrics import GatewayMetrics, WorkerSnapshot, worker_labels
from gateway.policies import FcfsPolicy
from gateway.scheduler import QueuedRequest
from gateway.workers import WorkerRegistry
from tests.gateway.test_generation import registry as registry
from tests.gateway.test_generation import tokenizer as tokenizer
from transfer.messages import SamplingSpec, TokenFrame

PROMPT = list(range(1000, 1100))  # 100 tokens
NUM_CACHED = 64


async def two_tokens(
    prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
) -> AsyncGenerator[TokenFrame]:
    yield TokenFrame([5], None, len(prompt), NUM_CACHED, 1)
    yield TokenFrame([6], "length", len(prompt), NUM_CACHED, 2)


async def run(
    registry: WorkerRegistry, tokenizer: Tokenizer, metrics: GatewayMetrics, queued: QueuedRequest
) -> None:
    dispatcher = Dispatcher(FcfsPolicy(), registry, max_prefill_inflight_tokens=10_000)
    request = Generation(
        queued,
        PROMPT,
        SamplingSpec(max_tokens=2),
        (),
        tokenizer=tokenizer,
        dispatcher=dispatcher,
        registry=registry,
        cache_salt=b"",
        received=0.0,
        metrics=metrics,
    )
    events = [event async for event in request.events()]
    assert isinstance(events[-1], Finished)


def queued(request_id: str, weight: float, *, demoted: bool = False) -> QueuedRequest:
    return QueuedRequest(
        request_id=request_id,
        tenant_id="acme",
        slo_class="standard",
        weight=weight,
        arrival=0.0,
        num_prompt_tokens=len(PROMPT),
        max_tokens=2,
        demoted=demoted,
        model="test-model",  # make_ready's
    )


async def test_a_prefill_counts_on_its_prefill_worker_and_the_weight_is_the_policys(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "run_disaggregated", two_tokens)
    metrics = GatewayMetrics(
        DEFAULT_SLO_CLASSES,
        list,
        workers=lambda: [WorkerSnapshot.of(h) for h in registry.handles],
    )
    await run(registry, tokenizer, metrics, queued("r1", 3.0))
    prefill, decode = (worker_labels(h) for h in registry.handles)
    assert metrics.prefilled() == {prefill: (len(PROMPT), NUM_CACHED)}  # not the decode worker
    assert metrics.weight_of("acme") == 3.0
    # A demoted request's lowered weight is not its tenant's (as the fair policies take it).
    await run(registry, tokenizer, metrics, queued("r2", 0.03, demoted=True))
    assert metrics.weight_of("acme") == 3.0
    assert metrics.prefilled() == {prefill: (2 * len(PROMPT), 2 * NUM_CACHED)}
    assert decode not in metrics.prefilled()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("vtc", len(PROMPT) + 2 * 2),  # VTC charges the whole prompt, cached or not
        ("dlpm", len(PROMPT) - NUM_CACHED + 2 * 2),  # DLPM the tokens its prefill computed
    ],
)
async def test_the_service_counted_is_what_the_policy_charges(
    registry: WorkerRegistry,
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    expected: int,
) -> None:
    monkeypatch.setattr(generation, "run_disaggregated", two_tokens)
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, list, policy=policy)
    await run(registry, tokenizer, metrics, queued("r1", 1.0))
    [point] = metrics.fairness_points()
    assert (point.service_units, point.cost_units) == (expected, expected)
