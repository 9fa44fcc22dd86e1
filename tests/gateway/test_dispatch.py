"""``Dispatcher`` with the FCFS policy and a real ``WorkerRegistry`` whose workers are never
polled: the tests set each handle's state, info and load as a poll would, then watch requests
wait, get placed, and move the gateway's accounting on the handles."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

import msgspec
import pytest

from gateway.dispatch import NO_WORKER_GRACE_S, ROOM_RETRY_S, Dispatcher, RequestLedger, WorkerPair
from gateway.errors import (
    NoWorkerAvailable,
    QueueFull,
    QueueTimeout,
    RequestShed,
    retry_after_header,
)
from gateway.policies import FcfsPolicy
from gateway.scheduler import (
    Decision,
    QueuedRequest,
    Rejection,
    Shed,
    WorkerView,
)
from gateway.workers import WorkerHandle, WorkerRegistry
from transfer.errors import WorkerUnreachable
from transfer.messages import MakeRoomResult, Priority, WorkerInfo, WorkerLoad, WorkerRole

BLOCK_SIZE = 16
PREFILL_URL = "http://127.0.0.1:9/prefill"  # never polled: start() is not called
DECODE_URL = "http://127.0.0.1:9/decode"


class RecordingFcfs(FcfsPolicy):
    """FCFS that also records which requests it was told had finished."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[str] = []

    def on_finish(self, request: QueuedRequest, num_output_tokens: int, now: float) -> None:
        self.finished.append(request.request_id)


def make_ready(handle: WorkerHandle, role: WorkerRole, *, num_free_blocks: int = 1000) -> None:
    """What a successful poll of a ready worker leaves on its handle."""
    worker_id = f"{role}-worker"
    handle.info = WorkerInfo(
        worker_id=worker_id,
        instance_id="instance-1",
        role=role,
        model_id="test-model",
        block_size=BLOCK_SIZE,
        num_total_blocks=1000,
        max_model_len=4096,
        vocab_size=49152,
    )
    handle.load = WorkerLoad(
        worker_id=worker_id,
        role=role,
        ready=True,
        num_free_blocks=num_free_blocks,
        num_total_blocks=1000,
    )
    handle.state = "ready"


def request(request_id: str, num_prompt_tokens: int = 100) -> QueuedRequest:
    return QueuedRequest(
        request_id=request_id,
        tenant_id="tenant",
        slo_class="standard",
        weight=1.0,
        arrival=0.0,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=16,
        model="test-model",
    )


def ledger_of(dispatcher: Dispatcher, request: QueuedRequest) -> RequestLedger:
    ledger = dispatcher.ledger(request.request_id)
    assert ledger is not None
    return ledger


def leave(
    dispatcher: Dispatcher,
    request: QueuedRequest,
    num_output_tokens: int,
    *,
    handed_back: bool = False,
) -> None:
    """The request's run left its pair with ``num_output_tokens`` (as ``Generation`` reports
    it; the tokens themselves are not reported here)."""
    ledger = ledger_of(dispatcher, request)
    ledger.num_output_tokens = num_output_tokens
    dispatcher.left(ledger, handed_back=handed_back)


async def settle() -> None:
    """Let the loop run the scheduling passes and wake-ups that are due."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
async def registry() -> AsyncIterator[WorkerRegistry]:
    workers = WorkerRegistry([PREFILL_URL], [DECODE_URL])
    try:
        yield workers
    finally:
        await workers.stop()


@pytest.fixture
def prefill(registry: WorkerRegistry) -> WorkerHandle:
    handle = registry.handles[0]
    make_ready(handle, "prefill")
    return handle


@pytest.fixture
def decode(registry: WorkerRegistry) -> WorkerHandle:
    handle = registry.handles[1]
    make_ready(handle, "decode")
    return handle


@pytest.fixture
def policy() -> RecordingFcfs:
    return RecordingFcfs()


@pytest.fixture
def dispatcher(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle, decode: WorkerHandle
) -> Dispatcher:
    # Room for one 100-token prompt in flight on the prefill worker, not two.
    return Dispatcher(policy, registry, max_prefill_inflight_tokens=150, queue_timeout_s=5.0)


async def test_a_submit_with_room_is_placed_at_once_and_the_accounting_moves(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    free_before = decode.free_kv_tokens()
    assert free_before == 1000 * BLOCK_SIZE
    a = request("a", 100)
    pair = await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    assert pair == WorkerPair(prefill, decode)
    assert (prefill.inflight_tokens, prefill.inflight_requests) == (100, 1)
    assert (decode.inflight_tokens, decode.inflight_requests) == (100, 1)
    assert decode.tokens_reserved_since_report == 101  # the prompt's KV and the first token's
    assert decode.free_kv_tokens() == free_before - 101
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)

    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    assert (prefill.inflight_tokens, prefill.inflight_requests) == (0, 0)
    assert (decode.inflight_tokens, decode.inflight_requests) == (100, 1)  # still decoding

    decode.is_full = True  # the worker said "no room" meanwhile
    leave(dispatcher, a, 7)
    assert (decode.inflight_tokens, decode.inflight_requests) == (0, 0)
    assert not decode.is_full  # the finished request freed blocks
    assert policy.finished == ["a"]
    # The KV reservation is dropped by the next load report, not by ``left`` (the report
    # taken before the request finished may or may not count its blocks).
    assert decode.tokens_reserved_since_report == 101


async def test_a_handed_back_request_given_up_ends_for_the_policy(
    dispatcher: Dispatcher, policy: RecordingFcfs
) -> None:
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    leave(dispatcher, a, 3, handed_back=True)  # handed back: not ended yet
    assert policy.finished == []
    dispatcher.close(ledger_of(dispatcher, a))  # and it will not be queued again
    assert policy.finished == ["a"]


async def test_a_colocated_worker_prefills_itself(policy: RecordingFcfs) -> None:
    registry = WorkerRegistry([], [], ["http://127.0.0.1:9/colocated"])
    try:
        (colocated,) = registry.handles
        make_ready(colocated, "colocated")
        dispatcher = Dispatcher(policy, registry, queue_timeout_s=5.0)
        a = request("a", 40)
        pair = await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
        assert pair == WorkerPair(None, colocated)
        assert (colocated.inflight_tokens, colocated.inflight_requests) == (40, 1)
        dispatcher.first_token(
            ledger_of(dispatcher, a), 0
        )  # no prefill worker: nothing to give back
        assert (colocated.inflight_tokens, colocated.inflight_requests) == (40, 1)
        leave(dispatcher, a, 1)
        assert (colocated.inflight_tokens, colocated.inflight_requests) == (0, 0)
    finally:
        await registry.stop()


async def test_a_full_prefill_cap_makes_the_next_submit_wait_until_prefill_done(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    b = request("b", 100)
    waiting_b = asyncio.create_task(dispatcher.submit(dispatcher.open(b)))
    await settle()
    assert not waiting_b.done()  # 100 + 100 would pass the cap of 150
    assert (policy.queued(), dispatcher.num_waiting) == (1, 1)
    assert prefill.inflight_tokens == 100

    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    pair_b = await asyncio.wait_for(waiting_b, 1.0)
    assert pair_b == WorkerPair(prefill, decode)
    assert (prefill.inflight_tokens, prefill.inflight_requests) == (100, 1)
    assert (decode.inflight_tokens, decode.inflight_requests) == (200, 2)
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)


async def test_a_request_that_finds_no_room_in_time_gets_queue_timeout(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle
) -> None:
    decode = registry.handles[1]
    make_ready(decode, "decode", num_free_blocks=2)  # 32 KV slots: a 100-token prompt never fits
    dispatcher = Dispatcher(policy, registry, queue_timeout_s=0.05)
    with pytest.raises(QueueTimeout, match=r"waited 0\.05 s") as raised:
        await asyncio.wait_for(dispatcher.submit(dispatcher.open(request("a", 100))), 2.0)
    assert (raised.value.status, raised.value.code) == (503, "queue_timeout")
    assert retry_after_header(raised.value) == {"retry-after": "1"}
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)
    assert (prefill.inflight_tokens, decode.inflight_requests) == (0, 0)


async def test_submit_without_a_ready_worker_fails_after_the_grace(
    policy: RecordingFcfs, registry: WorkerRegistry
) -> None:
    dispatcher = Dispatcher(policy, registry, queue_timeout_s=60.0)
    started = time.monotonic()
    with pytest.raises(
        NoWorkerAvailable, match="no worker of model 'test-model' can serve"
    ) as raised:
        await asyncio.wait_for(dispatcher.submit(dispatcher.open(request("a"))), 5.0)
    assert time.monotonic() - started >= NO_WORKER_GRACE_S
    # Still none: the next one is refused at once.
    with pytest.raises(NoWorkerAvailable):
        dispatcher.check_can_serve("test-model")
    assert retry_after_header(raised.value) == {"retry-after": "5"}
    assert "127.0.0.1" not in raised.value.message  # the tenant never sees internal addresses
    # A ready prefill worker alone cannot serve either: it needs a decode worker.
    make_ready(registry.handles[0], "prefill")
    with pytest.raises(NoWorkerAvailable, match="no worker of model 'test-model' can serve"):
        await asyncio.wait_for(dispatcher.submit(dispatcher.open(request("b"))), 5.0)
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)


async def test_waiting_requests_fail_soon_when_the_last_worker_of_a_role_dies(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle
) -> None:
    """No waiting out the queue timeout for a worker that may never come back: once the last
    worker of a role has been dead (a failed poll or call marks it) for the grace, every waiting
    request ends with no_worker, and Retry-After."""
    decode = registry.handles[1]
    make_ready(decode, "decode", num_free_blocks=2)  # no room: requests wait
    dispatcher = Dispatcher(policy, registry, queue_timeout_s=60.0)
    registry.on_change = dispatcher.wake
    waiting = [
        asyncio.create_task(dispatcher.submit(dispatcher.open(request(str(i))))) for i in range(3)
    ]
    await settle()
    assert dispatcher.num_waiting == 3
    registry.mark_dead(prefill, WorkerUnreachable("connection refused"))
    for task in waiting:
        with pytest.raises(NoWorkerAvailable) as raised:
            await asyncio.wait_for(task, 5.0)
        assert retry_after_header(raised.value) == {"retry-after": "5"}
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)


async def test_a_worker_back_within_the_grace_serves_the_requests_that_waited(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle
) -> None:
    """One failed call marks a live worker dead; the registry's next poll brings it back before
    the grace ends: nobody waiting was failed for it."""
    decode = registry.handles[1]
    make_ready(decode, "decode", num_free_blocks=2)  # no room yet: requests wait
    dispatcher = Dispatcher(policy, registry, queue_timeout_s=60.0)
    registry.on_change = dispatcher.wake
    waiting = asyncio.create_task(dispatcher.submit(dispatcher.open(request("a"))))
    await settle()
    registry.mark_dead(prefill, WorkerUnreachable("reset by peer"))
    await asyncio.sleep(NO_WORKER_GRACE_S / 3)
    make_ready(prefill, "prefill")  # the next poll: it answers
    make_ready(decode, "decode")  # and the decode worker has room now
    dispatcher.wake()
    pair = await asyncio.wait_for(waiting, 5.0)
    assert pair.prefill is prefill


def tenant_request(request_id: str, tenant_id: str, rank: int = 2) -> QueuedRequest:
    return dataclasses.replace(request(request_id), tenant_id=tenant_id, rank=rank)


async def test_a_tenant_with_a_full_queue_is_refused_and_the_others_are_not(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle
) -> None:
    make_ready(registry.handles[1], "decode", num_free_blocks=2)  # no room: requests wait
    dispatcher = Dispatcher(policy, registry, max_queued_per_tenant=2)
    waiting = [
        asyncio.create_task(dispatcher.submit(dispatcher.open(tenant_request(str(i), "flood"))))
        for i in range(2)
    ]
    await settle()
    with pytest.raises(QueueFull, match="2 requests waiting") as raised:
        dispatcher.check_backlog("flood", 2)
    assert (raised.value.status, raised.value.code) == (429, "queue_full")
    assert retry_after_header(raised.value) == {"retry-after": "1"}
    dispatcher.check_backlog("calm", 2)  # another tenant's queue is its own
    waiting[0].cancel()
    await asyncio.wait({waiting[0]})
    dispatcher.check_backlog("flood", 2)  # one left the queue: room for one more
    waiting[1].cancel()
    await asyncio.wait({waiting[1]})


async def test_a_tenant_whose_oldest_request_waited_too_long_is_refused_in_that_class(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle
) -> None:
    """A standing queue: new arrivals of the class would only wait longer, so they are refused
    at once; another class of the same tenant, with a queue of its own, is not."""
    make_ready(registry.handles[1], "decode", num_free_blocks=2)  # no room: requests wait
    now = [100.0]
    dispatcher = Dispatcher(
        policy, registry, max_queue_wait_s={2: 10.0, 3: 2.0}, clock=lambda: now[0]
    )
    task = asyncio.create_task(
        dispatcher.submit(dispatcher.open(tenant_request("old", "flood", rank=2)))
    )
    await settle()
    now[0] += 10.0
    model = "test-model"
    dispatcher.check_backlog("flood", 2, model)  # waited exactly the limit: still taken
    dispatcher.check_backlog("flood", 3, model)  # nothing of rank 3 waits
    now[0] += 0.5
    with pytest.raises(QueueFull, match=r"waited 10\.5 s") as raised:
        dispatcher.check_backlog("flood", 2, model)
    assert retry_after_header(raised.value) == {"retry-after": "10"}
    dispatcher.check_backlog("flood", 3, model)
    dispatcher.check_backlog("other", 2, model)
    # Another model's queue is its own: a standing queue for a full large model does not
    # refuse the tenant's requests for an idle small one (nor does the gatekeeper's check,
    # which comes before the model is known).
    dispatcher.check_backlog("flood", 2, "small-model")
    dispatcher.check_backlog("flood", 2)
    task.cancel()
    await asyncio.wait({task})
    dispatcher.check_backlog("flood", 2, model)  # its queue is empty again


async def test_cancelling_a_waiting_submit_takes_it_out_of_the_queue(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    waiting_b = asyncio.create_task(dispatcher.submit(dispatcher.open(request("b", 100))))
    await settle()
    assert (policy.queued(), dispatcher.num_waiting) == (1, 1)

    waiting_b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_b
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)

    # Room comes back: nothing is placed for the request that left.
    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    await settle()
    assert (prefill.inflight_tokens, prefill.inflight_requests) == (0, 0)
    assert (decode.inflight_tokens, decode.inflight_requests) == (100, 1)  # a's decode only


async def test_a_submit_cancelled_in_the_tick_of_its_placement_reserves_nothing(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    waiting_b = asyncio.create_task(dispatcher.submit(dispatcher.open(request("b", 100))))
    await settle()
    # a's prefill ends, which schedules a pass that would place b; b's caller goes away in the
    # same tick, before the pass runs: the policy still picks b, the dispatcher reserves nothing
    # for it and hands it back.
    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    waiting_b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting_b
    assert policy.finished == ["b"]
    assert (prefill.inflight_tokens, prefill.inflight_requests) == (0, 0)
    assert (decode.inflight_tokens, decode.inflight_requests) == (100, 1)  # a's decode only
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)


async def test_a_cancel_that_arrives_after_placement_is_not_swallowed(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    waiting_b = asyncio.create_task(dispatcher.submit(dispatcher.open(request("b", 100))))
    await settle()
    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    await asyncio.sleep(0)  # the pass runs: b is placed, its submit has not resumed yet
    assert prefill.inflight_tokens == 100 and not waiting_b.done()
    waiting_b.cancel()  # b's caller goes away now
    # A cancelled caller must see CancelledError (and its room must come back), not a pair it
    # will never use.
    with pytest.raises(asyncio.CancelledError):
        await waiting_b
    assert (prefill.inflight_tokens, prefill.inflight_requests) == (0, 0)
    assert (decode.inflight_tokens, decode.inflight_requests) == (100, 1)


async def test_a_requeued_request_goes_ahead_of_earlier_waiters(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle
) -> None:
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    waiting_b = asyncio.create_task(dispatcher.submit(dispatcher.open(request("b", 100))))
    await settle()
    c = request("c", 100)
    waiting_c = asyncio.create_task(dispatcher.submit(dispatcher.open(c), requeue=True))
    await settle()
    assert policy.queued() == 2

    dispatcher.first_token(ledger_of(dispatcher, a), 0)  # room for one of them
    await asyncio.wait_for(waiting_c, 1.0)
    await settle()
    assert not waiting_b.done()  # c went ahead of b, which had waited longer

    dispatcher.first_token(ledger_of(dispatcher, c), 0)
    pair_b = await asyncio.wait_for(waiting_b, 1.0)
    assert pair_b.prefill is prefill
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)


async def test_fail_all_fails_every_waiter(
    dispatcher: Dispatcher, policy: RecordingFcfs, prefill: WorkerHandle
) -> None:
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(request("a", 100))), 1.0)
    waiters = [
        asyncio.create_task(dispatcher.submit(dispatcher.open(request(name, 100)))) for name in "bc"
    ]
    await settle()
    assert (policy.queued(), dispatcher.num_waiting) == (2, 2)

    stopping = NoWorkerAvailable("the gateway is stopping")
    dispatcher.fail_all(stopping)
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1.0)
    assert results == [stopping, stopping]
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)
    assert prefill.inflight_requests == 1  # only a was ever placed


class SheddingFcfs(RecordingFcfs):
    """Sheds a request named "shed-now" at admission and rejects one named "shed-later" at its
    first scheduling pass; records the policy's progress events."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, int]] = []

    def enqueue(self, request: QueuedRequest, now: float) -> None:
        if request.request_id == "shed-now":
            raise Shed("cannot make its deadline")
        super().enqueue(request, now)

    def schedule(
        self,
        prefill: Sequence[WorkerView],
        decode: Sequence[WorkerView],
        now: float,
        *,
        model: str = "",
    ) -> list[Decision]:
        decisions: list[Decision] = []
        for queued in list(self._queue):
            if queued.request_id == "shed-later":
                self._queue.remove(queued)
                decisions.append(Rejection(queued, "its deadline passed"))
        return decisions + super().schedule(prefill, decode, now, model=model)

    def on_first_token(self, request: QueuedRequest, num_cached_tokens: int, now: float) -> None:
        self.events.append(("first_token", request.request_id, num_cached_tokens))

    def on_tokens(self, request: QueuedRequest, num_tokens: int, now: float) -> None:
        self.events.append(("tokens", request.request_id, num_tokens))


async def test_sheds_and_rejections_end_their_requests_and_progress_reaches_the_policy(
    registry: WorkerRegistry, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    policy = SheddingFcfs()
    dispatcher = Dispatcher(policy, registry, max_prefill_inflight_tokens=1000)
    with pytest.raises(RequestShed, match="cannot make its deadline"):
        await dispatcher.submit(dispatcher.open(request("shed-now")))
    with pytest.raises(RequestShed, match="its deadline passed"):
        await asyncio.wait_for(dispatcher.submit(dispatcher.open(request("shed-later"))), 1.0)
    assert (policy.queued(), dispatcher.num_waiting) == (0, 0)

    a = request("a")
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    dispatcher.first_token(ledger_of(dispatcher, a), 32)
    dispatcher.tokens(ledger_of(dispatcher, a), 3)
    leave(dispatcher, a, 3)
    assert policy.events == [("first_token", "a", 32), ("tokens", "a", 3)]
    assert policy.finished == ["a"]

    b = request("b")
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(b)), 1.0)
    leave(dispatcher, b, 0)  # failed before its first token: no first_token event
    assert policy.events[2:] == []


async def test_a_prefill_worker_holds_at_most_its_measured_speed_times_the_time_cap(
    registry: WorkerRegistry, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    """1000 tok/s × 0.15 s: 150 tokens may be in flight there, so one 100-token prompt goes and
    the next waits for it (the token cap alone would take 100 of them)."""
    assert prefill.load is not None
    prefill.load = msgspec.structs.replace(prefill.load, prefill_tok_s=1000.0)
    dispatcher = Dispatcher(
        FcfsPolicy(), registry, max_prefill_inflight_tokens=10_000, max_prefill_inflight_s=0.15
    )
    a = request("a", 100)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(a)), 1.0)
    waiting_b = asyncio.create_task(dispatcher.submit(dispatcher.open(request("b", 100))))
    await settle()
    assert not waiting_b.done()
    dispatcher.first_token(ledger_of(dispatcher, a), 0)
    await asyncio.wait_for(waiting_b, 1.0)


class MakeRoomCalls:
    """Stands in for a decode worker's ``make_room`` route: records what the gateway asks."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Priority]] = []

    async def __call__(self, num_tokens: int, priority: Priority) -> MakeRoomResult:
        self.calls.append((num_tokens, priority))
        return MakeRoomResult(num_free_tokens=0, num_preempted=0)


def ranked(request_id: str, rank: int, num_prompt_tokens: int = 100) -> QueuedRequest:
    queued = request(request_id, num_prompt_tokens)
    queued.rank = rank
    return queued


async def batch_running(registry: WorkerRegistry, now: list[float]) -> Dispatcher:
    """A dispatcher on the clock ``now[0]`` whose decode worker runs one batch request (class
    rank 1): a lower class a higher one may ask it to preempt."""
    dispatcher = Dispatcher(
        FcfsPolicy(), registry, max_prefill_inflight_tokens=10_000, clock=lambda: now[0]
    )
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(ranked("batch", 1))), 1.0)
    return dispatcher


async def cancel_all(tasks: list[asyncio.Task[WorkerPair]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_higher_class_request_that_fits_nowhere_asks_a_lower_class_worker_for_room(
    registry: WorkerRegistry,
    prefill: WorkerHandle,
    decode: WorkerHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_ready(decode, "decode", num_free_blocks=10)  # 160 KV slots: one 100-token prompt
    make_room = MakeRoomCalls()
    monkeypatch.setattr(decode.client, "make_room", make_room)
    now = [100.0]
    dispatcher = Dispatcher(
        FcfsPolicy(), registry, max_prefill_inflight_tokens=10_000, clock=lambda: now[0]
    )
    batch = ranked("batch", 1)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(batch)), 1.0)
    assert decode.ranks_inflight == {1: 1}

    # Another batch request: same class, no room is asked for it.
    same_class = asyncio.create_task(dispatcher.submit(dispatcher.open(ranked("batch-2", 1))))
    await settle()
    assert make_room.calls == []
    same_class.cancel()
    await asyncio.gather(same_class, return_exceptions=True)

    interactive = ranked("interactive", 3, num_prompt_tokens=90)
    waiting = asyncio.create_task(dispatcher.submit(dispatcher.open(interactive)))
    await settle()
    assert make_room.calls == [(91, Priority(rank=3, counter=0.0, arrival=0.0))]
    dispatcher.wake()  # passes within ROOM_RETRY_S do not ask again
    await settle()
    assert len(make_room.calls) == 1
    now[0] += ROOM_RETRY_S
    dispatcher.wake()
    await settle()
    assert len(make_room.calls) == 2

    # The batch request is handed back (preempted): its room goes to the waiting request.
    dispatcher.first_token(ledger_of(dispatcher, batch), 0)
    leave(dispatcher, batch, 3, handed_back=True)
    assert decode.ranks_inflight == {}
    assert await asyncio.wait_for(waiting, 1.0) == WorkerPair(prefill, decode)
    assert decode.ranks_inflight == {3: 1}
    assert prefill.ranks_inflight == {3: 1}  # until its prefill ends
    dispatcher.first_token(ledger_of(dispatcher, interactive), 0)
    assert prefill.ranks_inflight == {}


async def test_a_worker_that_found_no_room_is_not_asked_again_by_the_next_request(
    registry: WorkerRegistry,
    prefill: WorkerHandle,
    decode: WorkerHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_ready(decode, "decode", num_free_blocks=10)
    make_room = MakeRoomCalls()  # answers that it preempted nothing
    monkeypatch.setattr(decode.client, "make_room", make_room)
    now = [100.0]
    dispatcher = await batch_running(registry, now)
    waiting = [
        asyncio.create_task(dispatcher.submit(dispatcher.open(ranked(f"interactive-{i}", 3, 90))))
        for i in range(2)
    ]
    await settle()
    assert len(make_room.calls) == 1
    dispatcher.wake()  # the other request has not asked yet, but the worker just said no
    await settle()
    assert len(make_room.calls) == 1
    # A higher class may find room where a lower one did not (a worker only preempts requests
    # less important than the one it makes room for): it asks at once.
    waiting.append(asyncio.create_task(dispatcher.submit(dispatcher.open(ranked("urgent", 5, 90)))))
    await settle()
    assert [priority.rank for _, priority in make_room.calls] == [3, 5]
    now[0] += ROOM_RETRY_S
    dispatcher.wake()
    await settle()
    assert [priority.rank for _, priority in make_room.calls] == [3, 5, 5]
    await cancel_all(waiting)


async def test_free_blocks_without_a_free_batch_slot_are_no_room(
    registry: WorkerRegistry,
    prefill: WorkerHandle,
    decode: WorkerHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """make_room frees blocks only: a worker whose batch slots are all taken answers with free
    tokens and nothing preempted. Its fresh report still shows no room for the request, so the
    worker counts as refused and the next request does not ask it again at once."""
    make_ready(decode, "decode", num_free_blocks=10)
    calls: list[int] = []

    async def free_but_no_slot(num_tokens: int, priority: Priority) -> MakeRoomResult:
        calls.append(priority.rank)
        return MakeRoomResult(num_free_tokens=16_000, num_preempted=0)

    refreshed: list[WorkerHandle] = []

    async def refresh(handle: WorkerHandle) -> None:  # the report: blocks free, no batch slot
        refreshed.append(handle)
        assert handle.info is not None and handle.load is not None
        handle.info = msgspec.structs.replace(handle.info, max_num_seqs=1)
        handle.load = msgspec.structs.replace(handle.load, num_free_blocks=1000, num_running=1)

    monkeypatch.setattr(decode.client, "make_room", free_but_no_slot)
    monkeypatch.setattr(registry, "refresh", refresh)
    dispatcher = await batch_running(registry, [100.0])
    waiting = [
        asyncio.create_task(dispatcher.submit(dispatcher.open(ranked(f"interactive-{i}", 3, 90))))
        for i in range(3)
    ]
    await settle()
    dispatcher.wake()
    await settle()
    assert calls == [3] and refreshed == [decode]
    assert not any(task.done() for task in waiting)
    await cancel_all(waiting)


async def test_a_worker_that_could_not_be_asked_is_not_asked_by_a_higher_class_either(
    registry: WorkerRegistry,
    prefill: WorkerHandle,
    decode: WorkerHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_ready(decode, "decode", num_free_blocks=10)
    calls: list[int] = []

    async def unreachable(num_tokens: int, priority: Priority) -> MakeRoomResult:
        calls.append(priority.rank)
        raise WorkerUnreachable(f"{DECODE_URL}: connection refused")

    monkeypatch.setattr(decode.client, "make_room", unreachable)
    now = [100.0]
    dispatcher = await batch_running(registry, now)
    waiting = [
        asyncio.create_task(dispatcher.submit(dispatcher.open(ranked("interactive", 3, 90))))
    ]
    await settle()
    waiting.append(asyncio.create_task(dispatcher.submit(dispatcher.open(ranked("urgent", 5, 90)))))
    await settle()
    assert calls == [3]  # a failing worker may hang each call: nobody asks it for a while
    now[0] += ROOM_RETRY_S
    dispatcher.wake()
    await settle()
    assert calls == [3, 5]
    await cancel_all(waiting)


async def test_no_room_is_asked_when_the_request_fits_or_the_option_is_off(
    registry: WorkerRegistry,
    prefill: WorkerHandle,
    decode: WorkerHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_room = MakeRoomCalls()
    monkeypatch.setattr(decode.client, "make_room", make_room)
    # Room enough on the decode worker: the second interactive request waits for the prefill
    # side (the first outranked the batch request there and passed its cap).
    dispatcher = Dispatcher(FcfsPolicy(), registry, max_prefill_inflight_tokens=150)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(ranked("batch", 1))), 1.0)
    await asyncio.wait_for(dispatcher.submit(dispatcher.open(ranked("interactive-1", 3))), 1.0)
    assert prefill.ranks_inflight == {1: 1, 3: 1}
    waiting = asyncio.create_task(dispatcher.submit(dispatcher.open(ranked("interactive", 3))))
    await settle()
    assert not waiting.done() and make_room.calls == []
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)

    make_ready(decode, "decode", num_free_blocks=10)
    off = Dispatcher(FcfsPolicy(make_room=False), registry, max_prefill_inflight_tokens=10_000)
    waiting = asyncio.create_task(
        off.submit(off.open(ranked("interactive-2", 3, num_prompt_tokens=150)))
    )
    await settle()
    assert not waiting.done() and make_room.calls == []
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_an_outage_that_ended_while_nobody_waited_leaves_the_next_one_its_grace(
    policy: RecordingFcfs, registry: WorkerRegistry, prefill: WorkerHandle, decode: WorkerHandle
) -> None:
    dispatcher = Dispatcher(policy, registry, queue_timeout_s=60.0)
    registry.on_change = dispatcher.wake
    registry.mark_dead(prefill, WorkerUnreachable("gone"))
    dispatcher.check_can_serve("test-model")  # the grace begins
    make_ready(prefill, "prefill")  # back, with nobody waiting
    dispatcher.wake()
    await settle()
    await asyncio.sleep(NO_WORKER_GRACE_S)
    registry.mark_dead(prefill, WorkerUnreachable("gone again"))
    dispatcher.check_can_serve("test-model")  # a new outage: its own grace, not the old one's


async def test_removing_a_drained_prefill_worker_stops_no_request_it_prefilled() -> None:
    """A request whose prefill is done and whose first token came (its KV on its way from the
    prefill worker to the decode worker) depends on the prefill worker until the decode worker
    says the KV landed, unless that prefill worker is drained: then it is sending nothing, and
    removing it (a rolling restart's drain, then remove) must not move the request."""
    workers = WorkerRegistry([PREFILL_URL], [DECODE_URL])
    try:
        prefill, decode = workers.handles
        make_ready(prefill, "prefill")
        make_ready(decode, "decode")
        ledger = RequestLedger(request("r1"), received=time.monotonic())
        ledger.pair = WorkerPair(prefill, decode)
        ledger.stage = "decode"
        ledger.num_frames_here = 1  # the prefill's first token only
        assert ledger.runs_on(prefill)  # its KV may still be on the way
        prefill.state = "drained"
        assert not ledger.runs_on(prefill)
        assert ledger.runs_on(decode)
        ledger.stage = "prefill"  # still prefilling (a drained worker has none: belt and braces)
        assert ledger.runs_on(prefill)
    finally:
        await workers.stop()
