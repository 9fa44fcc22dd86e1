"""``Generation`` over a real ``Dispatcher`` and ``WorkerRegistry``, with the workers' side
(``run_disaggregated``) replaced by frames the test chooses: what the gateway's metrics count
as each tenant's service."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway import generation
from gateway.config import DEFAULT_SLO_CLASSES
from gateway.dispatch import Dispatcher
from gateway.generation import Finished, Generation
from gateway.metrics import GatewayMetrics
from gateway.scheduler import FcfsPolicy, QueuedRequest, TenantState
from gateway.workers import WorkerRegistry
from tests.gateway.test_dispatch import DECODE_URL, PREFILL_URL, make_ready
from transfer.messages import SamplingSpec, TokenFrame

PROMPT = list(range(1000, 1100))  # 100 tokens
CACHED = {"cached": 64, "demoted": 0}  # prompt tokens each tenant's prefill finds cached


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_path(resolve_model("default")))


@pytest.fixture
async def registry() -> AsyncIterator[WorkerRegistry]:
    workers = WorkerRegistry([PREFILL_URL], [DECODE_URL])
    make_ready(workers.handles[0], "prefill")
    make_ready(workers.handles[1], "decode")
    try:
        yield workers
    finally:
        await workers.stop()


async def two_tokens(
    prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
) -> AsyncGenerator[TokenFrame]:
    """The workers' answer: two tokens, the prompt partly cached as the tenant's entry says."""
    cached = CACHED[request_id]
    yield TokenFrame([5], None, len(prompt), cached, 1)
    yield TokenFrame([6], "length", len(prompt), cached, 2)


async def test_service_is_computed_prompt_tokens_and_output_over_the_admitted_weight(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "run_disaggregated", two_tokens)
    backlogged = [TenantState("cached", 1, 0.0), TenantState("demoted", 1, 0.0)]
    metrics = GatewayMetrics(DEFAULT_SLO_CLASSES, lambda: backlogged)
    dispatcher = Dispatcher(FcfsPolicy(), registry, max_prefill_inflight_tokens=10_000)
    metrics.sample()
    for tenant_id, weight in (("cached", 1.0), ("demoted", 0.5)):
        queued = QueuedRequest(
            request_id=tenant_id,
            tenant_id=tenant_id,
            slo_class="standard",
            weight=weight,  # a demoted request's is lowered; its tenant's stays 1
            arrival=0.0,
            num_prompt_tokens=len(PROMPT),
            max_tokens=2,
            demoted=weight < 1.0,
        )
        run = Generation(
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
        events = [event async for event in run.events()]
        assert isinstance(events[-1], Finished)
    metrics.sample()
    # cached: 1 * (100 - 64) + 2 * 2 = 40; demoted: (1 * 100 + 2 * 2) / 0.5 = 208.
    assert metrics.jain() == pytest.approx((40 + 208) ** 2 / (2 * (40**2 + 208**2)))
