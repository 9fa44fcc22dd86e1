"""Two "replicas" (two policies, each with its ``ReplicaSync``) on one real Redis: service charged
on one reaches the other's counters and deficits within a few sync intervals, the lift rule
takes the other replica's backlog into account, and admin changes reach the other replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import SchedulerSection, SloClass
from gateway.policies import make_policy
from gateway.replica_sync import AdminChange, ReplicaSync
from gateway.scheduler import Placement, QueuedRequest, SchedulingPolicy, WorkerView
from tests.redis_server import RedisServer
from tests.redis_server import redis_server as redis_server
from tests.redis_server import redis_url as redis_url

ONE_CLASS = [SloClass("standard", rank=1, ttft_target_s=1e9)]
INTERVAL_S = 0.02


def _policy(name: str) -> Any:
    return make_policy(name, SchedulerSection(), ONE_CLASS, block_size=16)


def _request(request_id: str, tenant_id: str, num_prompt_tokens: int = 100) -> QueuedRequest:
    return QueuedRequest(
        request_id=request_id,
        tenant_id=tenant_id,
        slo_class="standard",
        weight=1.0,
        arrival=0.0,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=10,
    )


def _place_all(policy: SchedulingPolicy) -> list[str]:
    decisions = policy.schedule(
        [WorkerView("p0", inflight_tokens=0, max_inflight_tokens=10**6)],
        [WorkerView("d0", free_kv_tokens=10**9)],
        0.0,
    )
    return [d.request.request_id for d in decisions if isinstance(d, Placement)]


def _book(policy: Any) -> Any:
    """The policy's service book of the one class (``ServiceBook``)."""
    return policy._lanes["standard"].book


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> float:
    """Seconds until ``predicate`` holds."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "not within the time allowed"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


Pair = tuple[Any, Any, ReplicaSync, ReplicaSync, list[AdminChange]]


@pytest.fixture(params=["vtc", "dlpm", "d2lpm"])
async def pair(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    redis_url: str,
) -> AsyncIterator[Pair]:
    a, b = _policy(request.param), _policy(request.param)
    seen_by_b: list[AdminChange] = []
    sync_a = ReplicaSync(redis_url, a, on_admin_change=lambda c: None, sync_interval_s=INTERVAL_S)
    sync_b = ReplicaSync(redis_url, b, on_admin_change=seen_by_b.append, sync_interval_s=INTERVAL_S)
    await sync_a.start()
    await sync_b.start()
    try:
        yield a, b, sync_a, sync_b, seen_by_b
    finally:
        await sync_a.stop()
        await sync_b.stop()


async def test_service_charged_on_one_replica_reaches_the_other(pair: Pair) -> None:
    a, b, *_ = pair
    b.enqueue(_request("b-1", "t"), 0.0)  # t is active on b too
    a.enqueue(_request("a-1", "t"), 0.0)
    assert _place_all(a) == ["a-1"]  # charged on a: its prompt (VTC), prompt + output (DLPM)
    if a.name == "vtc":
        charged = a.counter("t")
        assert charged > 0 and b.counter("t") == 0
        waited_s = await _until(lambda: b.counter("t") == charged)
    else:
        [before] = [s.deficit for s in b.tenants() if s.tenant_id == "t"]
        waited_s = await _until(
            lambda: [s.deficit for s in b.tenants() if s.tenant_id == "t"] != [before]
        )
        [after] = [s.deficit for s in b.tenants() if s.tenant_id == "t"]
        assert after == before - 100  # what a computed: the prompt (output: as it comes)
    assert waited_s < 20 * INTERVAL_S + 0.5
    await asyncio.sleep(5 * INTERVAL_S)
    if a.name == "vtc":
        assert a.counter("t") == charged  # its own charges come back to it from nobody


async def test_the_lift_rule_uses_the_least_counter_of_every_replicas_backlog(pair: Pair) -> None:
    a, b, *_ = pair
    # On b, a backlogged tenant far ahead (5000); on a, one at 1000.
    b.enqueue(_request("y-0", "y", 5000), 0.0)
    _place_all(b)
    b.enqueue(_request("y-1", "y"), 0.0)
    a.enqueue(_request("x-0", "x", 1000), 0.0)
    _place_all(a)
    a.enqueue(_request("x-1", "x"), 0.0)
    await _until(lambda: _book(b).remote_floor == 1000.0)  # b hears a's floor
    b.enqueue(_request("z-0", "z"), 0.0)  # a newcomer on b
    assert _book(b).counters["z"] == 1000.0  # lifted to a's backlog minimum, not to b's 5000


async def test_a_tenant_far_ahead_of_another_replicas_backlog_waits(pair: Pair) -> None:
    """Tenants each sending to their own replica (a client's keep-alive connection stays on
    one): a replica's tenant more than the borrowing limit ahead of the least counter backlogged
    on another replica waits, so the shared workers' room goes to the one behind. DLPM as well
    as VTC: the deficits are each replica's own, and alone on its replica a tenant always gets
    the refill."""
    a, b, *_ = pair
    b.enqueue(_request("y-0", "y", 100), 0.0)
    _place_all(b)
    b.enqueue(_request("y-1", "y"), 0.0)  # y: backlogged on b at 100
    a.enqueue(_request("x-0", "x", 10_000), 0.0)
    _place_all(a)  # x: 10,000, far ahead
    a.enqueue(_request("x-1", "x"), 0.0)
    await _until(lambda: _book(a).remote_floor == 100.0)
    assert _place_all(a) == []  # x waits while y is so far behind
    b.enqueue(_request("y-big", "y", 20_000), 0.0)
    assert sorted(_place_all(b)) == ["y-1", "y-big"]  # y catches up (and then some)
    await _until(lambda: _book(a).remote_floor in (None, 20_200.0))
    assert _place_all(a) == ["x-1"]


async def test_with_no_backlog_anywhere_a_newcomer_is_lifted_to_the_last_leavers_counter(
    pair: Pair,
) -> None:
    """A replica that has seen no one (just started) does not lift newcomers to 0 while the
    others' tenants are far along: with no backlog anywhere, to the highest last leaver's."""
    a, b, *_ = pair
    request = _request("x-0", "x", 50_000)
    a.enqueue(request, 0.0)
    _place_all(a)
    a.on_finish(request, 0, 1.0)  # x left a's backlog at 50,000
    await _until(lambda: _book(b).remote_idle == 50_000.0)
    b.enqueue(_request("w-0", "w"), 2.0)
    assert _book(b).counters["w"] == 50_000.0


@pytest.mark.parametrize("name", ["vtc", "dlpm", "d2lpm"])
def test_the_floor_told_to_the_others_counts_every_tenant_backlogged_in_the_interval(
    name: str,
) -> None:
    """A tenant whose queue emptied since the last sync (the workers took all it had) was
    backlogged in the interval: its counter is the floor, not nothing."""
    policy = _policy(name)
    policy.take_service_deltas()  # shared from now on
    policy.enqueue(_request("x-0", "x", 500), 0.0)
    assert _place_all(policy) == ["x-0"]  # x's queue is empty again, its counter 500
    assert policy.backlog_floors() == {"standard": 500.0}
    assert policy.backlog_floors() == {}  # the next interval: x was not backlogged


@pytest.mark.parametrize("name", ["vtc", "dlpm", "d2lpm"])
def test_a_tenant_with_requests_in_flight_is_lifted_to_the_borrowing_limit_below_the_others(
    name: str,
) -> None:
    """The lift across replicas: a tenant joining again while its requests are in flight (a
    closed-loop client whose queue its replica emptied) stays at most ``max_borrow_tokens``
    below the other replicas' backlog; one coming back from idle is lifted all the way."""
    policy = _policy(name)
    policy.take_service_deltas()
    policy.enqueue(_request("y-0", "y"), 0.0)
    assert _place_all(policy) == ["y-0"]  # y: 100, in flight
    policy.set_remote_floors({"standard": 10_000.0}, {})
    policy.enqueue(_request("z-0", "z"), 0.0)  # (first: y's lifted counter would lift z)
    policy.enqueue(_request("y-1", "y"), 0.0)
    borrow = SchedulerSection().max_borrow_tokens
    assert _book(policy).counters["y"] == 10_000.0 - borrow
    assert _book(policy).counters["z"] == 10_000.0


async def test_admin_changes_reach_the_other_replica(pair: Pair) -> None:
    _, _, sync_a, _, seen_by_b = pair
    change = AdminChange("key", key_id="key_123")
    await sync_a.publish_admin(change)
    waited_s = await _until(lambda: seen_by_b == [change])
    assert waited_s < 1.0
