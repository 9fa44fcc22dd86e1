"""``Generation`` over a real ``Dispatcher`` and ``WorkerRegistry``, with the workers' side
(``run_disaggregated``) replaced by frames the test chooses: what the gateway's metrics count
as each tenant's service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway import generation
from gateway.config import DEFAULT_SLO_CLASSES
from gateway.dispatch import Dispatcher
from gateway.errors import ShuttingDown
from gateway.generation import Finished, Generation
from gateway.metrics import GatewayMetrics
from gateway.policies import FcfsPolicy
from gateway.scheduler import QueuedRequest, TenantState
from gateway.workers import WorkerRegistry
from tests.gateway.test_dispatch import DECODE_URL, PREFILL_URL, make_ready
from transfer.errors import EngineFailed, WorkerUnreachable
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
            model="test-model",  # make_ready's
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


def _generation(
    registry: WorkerRegistry, tokenizer: Tokenizer, stop: tuple[str, ...] = ()
) -> Generation:
    queued = QueuedRequest(
        request_id="r",
        tenant_id="t",
        slo_class="standard",
        weight=1.0,
        arrival=0.0,
        num_prompt_tokens=len(PROMPT),
        max_tokens=8,
        model="test-model",  # make_ready's
    )
    dispatcher = Dispatcher(FcfsPolicy(), registry, max_prefill_inflight_tokens=10_000)
    return Generation(
        queued,
        PROMPT,
        SamplingSpec(max_tokens=8),
        stop,
        tokenizer=tokenizer,
        dispatcher=dispatcher,
        registry=registry,
        cache_salt=b"",
        received=0.0,
    )


async def test_a_worker_that_fails_mid_stream_moves_the_request_with_its_output_so_far(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first placement sends "Hello" (held back: it may begin the stop string), then its
    engine dies. The request goes on elsewhere from its output so far: the next placement gets
    the prompt plus "Hello" as prior output, the same seed, and the stop string still matches
    across the two placements. Nothing is sent twice, and usage counts every token once."""
    hello, world = tokenizer.encode("Hello"), tokenizer.encode(" world and more")
    calls: list[tuple[list[int], int, int | None]] = []

    async def dies_once(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], sampling: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        num_prior = kwargs["num_prior_output_tokens"]
        calls.append((prompt, num_prior, sampling.seed))
        if len(calls) == 1:
            yield TokenFrame(hello, None, len(prompt), 0, len(hello))
            raise EngineFailed(f"{PREFILL_URL}: the engine failed", worker_url=PREFILL_URL)
        yield TokenFrame(world, "length", len(prompt) - num_prior, 0, num_prior + len(world))

    monkeypatch.setattr(generation, "run_disaggregated", dies_once)
    run = _generation(registry, tokenizer, stop=("Hello world",))
    # The dead prefill worker is marked so; bring it back as the registry's next poll would.
    registry.on_change = lambda: make_ready(registry.handles[0], "prefill")
    events = [event async for event in run.events()]
    assert events[-1] == Finished("stop", run.usage)
    assert "".join(e for e in events if isinstance(e, str)) == ""  # all before the stop string
    (first, _, seed), (second, num_prior, same_seed) = calls
    assert first == PROMPT
    assert (second, num_prior) == (PROMPT + hello, len(hello))
    assert seed is not None and same_seed == seed
    assert run.usage.completion_tokens == len(hello) + len(world)
    assert run.dispatcher.num_waiting == 0


async def test_a_request_whose_workers_keep_failing_ends_after_the_migration_bound(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def always_dies(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        nonlocal calls
        calls += 1
        yield TokenFrame([5], None, len(prompt), 0, kwargs["num_prior_output_tokens"] + 1)
        raise WorkerUnreachable(f"{DECODE_URL}: the stream broke", worker_url=DECODE_URL)

    monkeypatch.setattr(generation, "run_disaggregated", always_dies)
    run = _generation(registry, tokenizer)
    registry.on_change = lambda: make_ready(registry.handles[1], "decode")
    with pytest.raises(WorkerUnreachable, match="failed 4 times; giving up"):
        async for _ in run.events():
            pass
    assert calls == 1 + run.dispatcher.max_migrations
    assert run.dispatcher.ledger("r") is None  # closed: nothing held anywhere
    assert registry.handles[1].inflight_requests == 0
    assert run.dispatcher.policy.queued() == 0


async def test_a_lost_worker_stops_the_run_waiting_on_it_and_the_request_moves(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung decode worker sends nothing more; the registry finds it lost (``worker_lost``):
    the run waiting on it is cancelled and the request goes on elsewhere."""
    hung = asyncio.Event()
    calls = 0

    async def hangs_once(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        nonlocal calls
        calls += 1
        num_prior = kwargs["num_prior_output_tokens"]
        if calls == 1:
            yield TokenFrame([5], None, len(prompt), 0, 1)
            hung.set()
            await asyncio.Event().wait()  # never answers again
        yield TokenFrame([6], "length", len(prompt) - num_prior, 0, num_prior + 1)

    monkeypatch.setattr(generation, "run_disaggregated", hangs_once)
    run = _generation(registry, tokenizer)
    task = asyncio.create_task(_collect(run))
    await asyncio.wait_for(hung.wait(), 5.0)
    decode = registry.handles[1]
    registry.on_change = lambda: make_ready(decode, "decode")  # as a later health check would
    run.dispatcher.worker_lost(decode, WorkerUnreachable("hung", worker_url=decode.url))
    events = await asyncio.wait_for(task, 5.0)
    assert isinstance(events[-1], Finished) and calls == 2
    assert run.usage.completion_tokens == 2
    assert task.cancelling() == 0


async def _collect(run: Generation) -> list[object]:
    return [event async for event in run.events()]


async def test_a_worker_that_fails_before_any_token_is_left_for_another_placement(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def dead_once(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise WorkerUnreachable(f"{DECODE_URL}: connection refused")
        yield TokenFrame([5], "length", len(prompt), 0, 1)

    monkeypatch.setattr(generation, "run_disaggregated", dead_once)
    run = _generation(registry, tokenizer)
    # The dead worker is marked so; with no other worker the retry finds it dead: bring it back
    # as the registry's next poll would.
    registry.on_change = lambda: make_ready(registry.handles[1], "decode")
    events = [event async for event in run.events()]
    assert isinstance(events[-1], Finished) and calls == 2


async def test_an_interrupt_ends_a_request_waiting_for_workers_with_its_error(
    registry: WorkerRegistry, tokenizer: Tokenizer
) -> None:
    """The gateway stopping: the wait for a placement raises the interrupt's error, the queue
    forgets the request, and the task iterating is not left cancelled."""
    make_ready(registry.handles[1], "decode", num_free_blocks=1)  # no room: it waits
    run = _generation(registry, tokenizer)
    events = run.events()
    waiting = asyncio.create_task(anext(events))
    await asyncio.sleep(0.05)
    assert run.dispatcher.num_waiting == 1
    run.interrupt(ShuttingDown("stopping"))
    with pytest.raises(ShuttingDown):
        await waiting
    assert run.dispatcher.num_waiting == 0
    assert waiting.cancelling() == 0
    await events.aclose()


async def test_an_interrupt_while_parked_at_an_event_ends_at_the_next_one(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    words = [tokenizer.encode(word) for word in ("Hello", " there", " again")]

    async def three_words(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        for index, word in enumerate(words, start=1):
            yield TokenFrame(word, "length" if index == 3 else None, len(prompt), 0, index)

    monkeypatch.setattr(generation, "run_disaggregated", three_words)
    run = _generation(registry, tokenizer)
    events = run.events()
    assert await anext(events) == "Hello"
    run.interrupt(ShuttingDown("stopping"))
    with pytest.raises(ShuttingDown):
        await anext(events)
    assert run.dispatcher.num_waiting == 0


async def test_a_worker_lost_between_placement_and_run_moves_the_request(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placed, but the task has not resumed yet when the worker is found lost: the run raises
    the loss as it starts (cancelling the task there would end the request with no answer)."""
    calls = 0

    async def one_token(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        nonlocal calls
        calls += 1
        yield TokenFrame([5], "length", len(prompt), 0, 1)

    monkeypatch.setattr(generation, "run_disaggregated", one_token)
    run = _generation(registry, tokenizer)
    decode = registry.handles[1]
    registry.on_change = lambda: make_ready(decode, "decode")
    task = asyncio.create_task(_collect(run))
    while (ledger := run.dispatcher.ledger("r")) is None or ledger.stage != "prefill":
        await asyncio.sleep(0)
    assert calls == 0  # placed, the run not begun
    run.dispatcher.worker_lost(decode, WorkerUnreachable("gone", worker_url=decode.url))
    events = await asyncio.wait_for(task, 5.0)
    assert isinstance(events[-1], Finished)
    assert calls == 1  # the first placement never ran; the second did
    assert ledger.num_placements == 2 and ledger.num_migrations == 1


async def test_a_worker_lost_after_the_last_token_went_out_does_not_run_the_request_again(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found lost while the gateway is parked at the text of the frame that finished the
    request: it finishes; running it again would send the text twice and bill it twice."""
    hello = tokenizer.encode("Hello")
    calls: list[int] = []

    async def finishes(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        num_prior = kwargs["num_prior_output_tokens"]
        calls.append(num_prior)
        yield TokenFrame(hello, "stop", len(prompt), 0, len(hello) + num_prior)

    monkeypatch.setattr(generation, "run_disaggregated", finishes)
    run = _generation(registry, tokenizer)
    decode = registry.handles[1]
    registry.on_change = lambda: make_ready(decode, "decode")
    events = run.events()
    assert await anext(events) == "Hello"
    run.dispatcher.worker_lost(decode, WorkerUnreachable("gone", worker_url=decode.url))
    rest = [event async for event in events]
    assert calls == [0]
    assert rest == [Finished("stop", run.usage)] and run.usage.completion_tokens == len(hello)


async def test_a_prefill_worker_lost_after_the_kv_landed_leaves_the_request_alone(
    registry: WorkerRegistry, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a token came from the decode worker, the prefill worker has nothing of the request:
    losing it (restarted, drained and removed) must not move a request decoding elsewhere."""
    landed = asyncio.Event()
    calls = 0

    async def decoding(
        prefill: Any, decode: Any, request_id: str, prompt: list[int], *args: Any, **kwargs: Any
    ) -> AsyncGenerator[TokenFrame]:
        nonlocal calls
        calls += 1
        yield TokenFrame([5], None, len(prompt), 0, 1)  # the prefill's first token
        yield TokenFrame([6], None, len(prompt), 0, 2)  # from the decode worker: landed
        landed.set()
        await asyncio.sleep(0.2)
        yield TokenFrame([7], "length", len(prompt), 0, 3)

    monkeypatch.setattr(generation, "run_disaggregated", decoding)
    run = _generation(registry, tokenizer)
    prefill = registry.handles[0]
    task = asyncio.create_task(_collect(run))
    await asyncio.wait_for(landed.wait(), 5.0)
    run.dispatcher.worker_lost(prefill, WorkerUnreachable("gone", worker_url=prefill.url))
    prefill.state = "dead"  # and no other prefill worker: a move would end in no_worker
    events = await asyncio.wait_for(task, 5.0)
    assert isinstance(events[-1], Finished) and calls == 1
    assert run.usage.completion_tokens == 3
