"""``QuotaManager`` with a fake clock and an in-memory ledger, over each backend (in memory; a real
Redis server): each quota kind under ``reject`` and ``demote``, sliding windows, settling, budget
periods, quota changes, forgetting, and admissions racing each other on one event loop.

With Redis alone, on the server's own clock: two managers (two replicas) on one Redis never
exceed a concurrency or rate limit together, however their admissions interleave; leases are
renewed while requests run and lapse within a lease when their replica is killed (``kill -9`` of
a real process); settling is exactly once; the scripts' UTC periods are Python's; an unreachable
Redis is a clean 503."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.errors import QuotaExhausted, RateLimited, Unavailable
from gateway.quotas import Admission, QuotaManager, QuotaState
from gateway.quotas_backend import BudgetMissing, QuotaBackend, Reserved, ReserveOrder
from gateway.quotas_memory import MemoryQuotaBackend
from gateway.quotas_redis import RedisQuotaBackend, RedisReservation
from gateway.tenants import BudgetPeriod, OverQuotaPolicy, Quotas, Tenant, period_of
from tests.redis_server import redis_server as redis_server
from tests.redis_server import redis_url as redis_url

JAN_15 = dt.datetime(2025, 1, 15, 12, 0, tzinfo=dt.UTC).timestamp()
FEB_1 = dt.datetime(2025, 2, 1, tzinfo=dt.UTC).timestamp()
JAN_16 = dt.datetime(2025, 1, 16, tzinfo=dt.UTC).timestamp()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLedger:
    """Tokens recorded per (tenant, kind, period), and every lookup made."""

    def __init__(self) -> None:
        self.recorded: dict[tuple[str, BudgetPeriod, str], int] = {}
        self.calls: list[tuple[str, BudgetPeriod, str]] = []

    async def __call__(self, tenant_id: str, kind: BudgetPeriod, period: str) -> int:
        self.calls.append((tenant_id, kind, period))
        await asyncio.sleep(0)  # a real suspension, as SQLite off the loop would be
        return self.recorded.get((tenant_id, kind, period), 0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(JAN_15)


@pytest.fixture
def ledger() -> FakeLedger:
    return FakeLedger()


# On the fake clock a lease must outlast every jump a test makes while a request runs.
FAKE_CLOCK_LEASE_S = 3600.0


@pytest.fixture
async def new_redis_backend(redis_url: str) -> AsyncIterator[Callable[..., RedisQuotaBackend]]:
    """Makes backends on this test's Redis database (options as ``RedisQuotaBackend``'s), and
    closes them after the test, however it ends."""
    made: list[RedisQuotaBackend] = []

    def new(**options: Any) -> RedisQuotaBackend:
        made.append(RedisQuotaBackend(redis_url, **options))
        return made[-1]

    yield new
    for backend in made:
        await backend.close()


@pytest.fixture(params=["memory", "redis"])
def new_backend(request: pytest.FixtureRequest, clock: FakeClock) -> Callable[[], QuotaBackend]:
    """Makes backends of the kind under test, on the fake clock."""
    if request.param == "memory":
        return lambda: MemoryQuotaBackend(clock=clock)
    new_redis_backend = request.getfixturevalue("new_redis_backend")
    return lambda: new_redis_backend(lease_s=FAKE_CLOCK_LEASE_S, clock=clock)


@pytest.fixture
async def quotas(new_backend: Callable[[], QuotaBackend], ledger: FakeLedger) -> QuotaManager:
    manager = QuotaManager(ledger, new_backend())
    await manager.start()
    return manager


def tenant(over_quota: OverQuotaPolicy = "reject", /, **limits: Any) -> Tenant:
    return Tenant(
        tenant_id="t-1",
        name="acme",
        weight=1.0,
        default_class="standard",
        allowed_classes=["standard"],
        quotas=Quotas(**limits),
        over_quota=over_quota,
        created_at=0.0,
    )


async def refused(quotas: QuotaManager, who: Tenant, estimated_tokens: int = 10) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await quotas.admit(who, estimated_tokens=estimated_tokens)
    assert caught.value.param is None
    assert caught.value.status == 429
    return caught.value


# --- concurrency -------------------------------------------------------------------------------


async def test_concurrency_reject_and_release(quotas: QuotaManager) -> None:
    acme = tenant(max_concurrent_requests=2)
    first = await quotas.admit(acme, estimated_tokens=10)
    await quotas.admit(acme, estimated_tokens=10)
    error = await refused(quotas, acme)
    assert type(error) is RateLimited
    assert error.code == "rate_limit_exceeded"
    assert error.message == "too many concurrent requests: max_concurrent_requests is 2"
    assert error.retry_after_s == 1.0
    assert (await quotas.snapshot("t-1")).concurrent == 2  # the refused one reserved nothing
    quotas.settle(first, actual_tokens=10)
    third = await quotas.admit(acme, estimated_tokens=10)
    assert not third.demoted
    assert (await quotas.snapshot("t-1")).concurrent == 2


async def test_concurrency_demote_still_counts(quotas: QuotaManager) -> None:
    acme = tenant("demote", max_concurrent_requests=1)
    first = await quotas.admit(acme, estimated_tokens=10)
    second = await quotas.admit(acme, estimated_tokens=10)
    assert (first.demoted, first.demoted_reason) == (False, None)
    assert second.demoted is True
    assert second.demoted_reason == "too many concurrent requests: max_concurrent_requests is 1"
    assert await quotas.snapshot("t-1") == QuotaState(2, 2, 20, 0, None)


# --- requests per minute -----------------------------------------------------------------------


async def test_requests_per_minute_reject_and_slide(quotas: QuotaManager, clock: FakeClock) -> None:
    acme = tenant(requests_per_minute=3)
    for _ in range(3):
        quotas.settle(await quotas.admit(acme, estimated_tokens=10), actual_tokens=10)
        clock.now += 10
    error = await refused(quotas, acme)  # at +30: the first request leaves at +60
    assert type(error) is RateLimited
    assert error.message == "rate limit reached: requests_per_minute is 3"
    assert error.retry_after_s == 30.0
    clock.now = JAN_15 + 60
    assert not (await quotas.admit(acme, estimated_tokens=10)).demoted
    assert (await refused(quotas, acme)).retry_after_s == 10.0  # the second leaves at +70
    assert (await quotas.snapshot("t-1")).requests_last_minute == 3


async def test_requests_per_minute_demote(quotas: QuotaManager) -> None:
    acme = tenant("demote", requests_per_minute=1)
    assert not (await quotas.admit(acme, estimated_tokens=10)).demoted
    second = await quotas.admit(acme, estimated_tokens=10)
    assert second.demoted_reason == "rate limit reached: requests_per_minute is 1"
    assert (await quotas.snapshot("t-1")).requests_last_minute == 2


async def test_requests_per_minute_lowered_below_window_count(
    quotas: QuotaManager, clock: FakeClock
) -> None:
    for _ in range(4):
        await quotas.admit(tenant(), estimated_tokens=1)
        clock.now += 5
    # 4 requests in the window (+0, +5, +10, +15), limit now 2: the third must leave, at +70.
    error = await refused(quotas, tenant(requests_per_minute=2))
    assert error.retry_after_s == 50.0


# --- tokens per minute -------------------------------------------------------------------------


async def test_tokens_per_minute_reject_and_slide(quotas: QuotaManager, clock: FakeClock) -> None:
    acme = tenant(tokens_per_minute=1000)
    await quotas.admit(acme, estimated_tokens=300)
    clock.now += 10
    await quotas.admit(acme, estimated_tokens=300)
    clock.now += 10
    await quotas.admit(acme, estimated_tokens=300)
    clock.now += 10
    # 900 reserved + 500 = 1400: 400 over, so the first two (600) must leave: at +70.
    error = await refused(quotas, acme, 500)
    assert type(error) is RateLimited
    assert error.message == (
        "rate limit reached: tokens_per_minute is 1000; 900 are used or reserved and this "
        "request needs up to 500"
    )
    assert error.retry_after_s == 40.0
    # 100 over: the first alone (300) leaving is enough, at +60.
    assert (await refused(quotas, acme, 200)).retry_after_s == 30.0
    clock.now = JAN_15 + 60
    assert not (await quotas.admit(acme, estimated_tokens=400)).demoted
    assert (await quotas.snapshot("t-1")).tokens_last_minute == 1000


async def test_tokens_per_minute_demote(quotas: QuotaManager) -> None:
    acme = tenant("demote", tokens_per_minute=1000)
    await quotas.admit(acme, estimated_tokens=800)
    second = await quotas.admit(acme, estimated_tokens=300)
    assert second.demoted is True
    assert second.demoted_reason is not None
    assert second.demoted_reason.startswith("rate limit reached: tokens_per_minute is 1000")
    assert (await quotas.snapshot("t-1")).tokens_last_minute == 1100


async def test_request_larger_than_tokens_per_minute(quotas: QuotaManager) -> None:
    error = await refused(quotas, tenant(tokens_per_minute=1000), 1001)
    assert type(error) is RateLimited
    assert error.message == (
        "this request needs up to 1001 tokens (prompt + max_tokens), more than "
        "tokens_per_minute (1000) allows at all; lower max_tokens"
    )
    assert error.retry_after_s == 60.0
    assert (await quotas.snapshot("t-1")).tokens_last_minute == 0
    demoted = await quotas.admit(tenant("demote", tokens_per_minute=1000), estimated_tokens=1001)
    assert demoted.demoted_reason == error.message


# --- token budget ------------------------------------------------------------------------------


async def test_budget_reject_until_period_end(
    quotas: QuotaManager, ledger: FakeLedger, clock: FakeClock
) -> None:
    ledger.recorded[("t-1", "month", "2025-01")] = 9000
    acme = tenant(token_budget=10_000)
    admitted = await quotas.admit(acme, estimated_tokens=800)
    assert admitted.period == "2025-01"
    clock.now += 100
    error = await refused(quotas, acme, 300)
    assert type(error) is QuotaExhausted
    assert error.code == "insufficient_quota"
    assert error.message == (
        "token budget exhausted: token_budget is 10000 per month; 9800 are used or reserved in "
        "2025-01 and this request needs up to 300"
    )
    assert error.retry_after_s == FEB_1 - (JAN_15 + 100)
    assert await quotas.snapshot("t-1") == QuotaState(1, 0, 0, 9800, "2025-01")  # windows moved on


async def test_request_larger_than_budget(quotas: QuotaManager) -> None:
    error = await refused(quotas, tenant(token_budget=10_000, budget_period="day"), 10_001)
    assert type(error) is QuotaExhausted
    assert error.message == (
        "this request needs up to 10001 tokens (prompt + max_tokens), more than the whole "
        "token_budget of 10000 per day; lower max_tokens"
    )
    assert error.retry_after_s == JAN_16 - JAN_15


async def test_budget_demote_still_charged(quotas: QuotaManager, ledger: FakeLedger) -> None:
    ledger.recorded[("t-1", "month", "2025-01")] = 9900
    admitted = await quotas.admit(tenant("demote", token_budget=10_000), estimated_tokens=500)
    assert admitted.demoted is True
    assert admitted.demoted_reason is not None
    assert admitted.demoted_reason.startswith("token budget exhausted: token_budget is 10000")
    assert (await quotas.snapshot("t-1")).budget_used == 10_400


async def test_budget_loaded_once_then_fresh_each_period(
    quotas: QuotaManager, ledger: FakeLedger, clock: FakeClock
) -> None:
    ledger.recorded[("t-1", "month", "2025-01")] = 5000
    ledger.recorded[("t-1", "month", "2025-02")] = 7  # e.g. written by another gateway
    acme = tenant(token_budget=10_000)
    january = await quotas.admit(acme, estimated_tokens=1000)
    for _ in range(3):
        quotas.settle(await quotas.admit(acme, estimated_tokens=100), actual_tokens=100)
    assert ledger.calls == [("t-1", "month", "2025-01")]
    assert (await quotas.snapshot("t-1")).budget_used == 6300
    clock.now = FEB_1
    february = await quotas.admit(acme, estimated_tokens=100)
    assert february.period == "2025-02"
    assert ledger.calls[1:] == [("t-1", "month", "2025-02")]
    assert (await quotas.snapshot("t-1")).budget_used == 107
    quotas.settle(january, actual_tokens=900)  # goes to January's total, not February's
    assert await quotas.snapshot("t-1") == QuotaState(1, 1, 100, 107, "2025-02")


async def test_daily_budget_rolls_over_at_midnight(
    quotas: QuotaManager, ledger: FakeLedger, clock: FakeClock
) -> None:
    acme = tenant(token_budget=1000, budget_period="day")
    quotas.settle(await quotas.admit(acme, estimated_tokens=1000), actual_tokens=1000)
    assert type(await refused(quotas, acme, 1)) is QuotaExhausted
    clock.now = JAN_16
    assert (await quotas.admit(acme, estimated_tokens=1000)).period == "2025-01-16"
    assert ledger.calls == [("t-1", "day", "2025-01-15"), ("t-1", "day", "2025-01-16")]


async def test_concurrent_first_admissions_load_once(
    quotas: QuotaManager, ledger: FakeLedger
) -> None:
    acme = tenant(token_budget=10_000)
    await asyncio.gather(*(quotas.admit(acme, estimated_tokens=10) for _ in range(5)))
    assert ledger.calls == [("t-1", "month", "2025-01")]
    assert (await quotas.snapshot("t-1")).budget_used == 50


async def test_failed_load_is_retried_by_the_waiters(
    new_backend: Callable[[], QuotaBackend],
) -> None:
    calls: list[str] = []

    async def flaky(tenant_id: str, kind: BudgetPeriod, period: str) -> int:
        calls.append(period)
        await asyncio.sleep(0)
        if len(calls) == 1:
            raise OSError("database is locked")
        return 40

    quotas = QuotaManager(flaky, new_backend())
    await quotas.start()
    acme = tenant(token_budget=100)
    results = await asyncio.gather(
        *(quotas.admit(acme, estimated_tokens=10) for _ in range(3)), return_exceptions=True
    )
    # Whichever admission loads first sees the error (with Redis, the first answered).
    assert sorted(type(result).__name__ for result in results) == [
        "Admission",
        "Admission",
        "OSError",
    ]
    assert calls == ["2025-01", "2025-01"]
    assert (await quotas.snapshot("t-1")).budget_used == 60


# --- settling ----------------------------------------------------------------------------------


async def test_settle_frees_unused_reservation(quotas: QuotaManager) -> None:
    acme = tenant(tokens_per_minute=1000, token_budget=5000)
    big = await quotas.admit(acme, estimated_tokens=1000)
    assert await quotas.snapshot("t-1") == QuotaState(1, 1, 1000, 1000, "2025-01")
    await refused(quotas, acme, 900)
    quotas.settle(big, actual_tokens=100)
    assert await quotas.snapshot("t-1") == QuotaState(0, 1, 100, 100, "2025-01")
    assert not (await quotas.admit(acme, estimated_tokens=900)).demoted
    assert await quotas.snapshot("t-1") == QuotaState(1, 2, 1000, 1000, "2025-01")


async def test_settle_is_idempotent(quotas: QuotaManager) -> None:
    admission = await quotas.admit(tenant(token_budget=5000), estimated_tokens=1000)
    quotas.settle(admission, actual_tokens=0)  # failed before running
    quotas.settle(admission, actual_tokens=700)
    assert await quotas.snapshot("t-1") == QuotaState(0, 1, 0, 0, "2025-01")


async def test_settle_after_the_window_moved_on(quotas: QuotaManager, clock: FakeClock) -> None:
    long_one = await quotas.admit(tenant(), estimated_tokens=1000)
    clock.now += 61
    await quotas.admit(tenant(), estimated_tokens=50)
    quotas.settle(long_one, actual_tokens=400)  # already out of the window: changes nothing
    assert await quotas.snapshot("t-1") == QuotaState(1, 1, 50, 0, None)


async def test_negative_tokens_are_refused(quotas: QuotaManager) -> None:
    with pytest.raises(ValueError, match="estimated_tokens"):
        await quotas.admit(tenant(), estimated_tokens=-1)
    admission = await quotas.admit(tenant(), estimated_tokens=1)
    with pytest.raises(ValueError, match="actual_tokens"):
        quotas.settle(admission, actual_tokens=-1)


# --- tenants change and go ---------------------------------------------------------------------


async def test_quota_change_applies_to_next_admit(quotas: QuotaManager) -> None:
    acme = tenant(requests_per_minute=1)
    await quotas.admit(acme, estimated_tokens=10)
    await refused(quotas, acme)
    raised = msgspec.structs.replace(acme, quotas=Quotas(requests_per_minute=2))
    assert not (await quotas.admit(raised, estimated_tokens=10)).demoted
    await refused(quotas, raised)
    demoting = msgspec.structs.replace(raised, over_quota="demote")
    assert (await quotas.admit(demoting, estimated_tokens=10)).demoted


async def test_forget_drops_state(quotas: QuotaManager, ledger: FakeLedger) -> None:
    acme = tenant(max_concurrent_requests=1, token_budget=10_000)
    old = await quotas.admit(acme, estimated_tokens=100)
    quotas.forget("t-1")
    assert await quotas.snapshot("t-1") == QuotaState(0, 0, 0, 0, None)
    fresh = await quotas.admit(acme, estimated_tokens=100)  # the old slot is gone too
    assert not fresh.demoted
    assert len(ledger.calls) == 2
    quotas.settle(old, actual_tokens=100)  # harmless
    assert await quotas.snapshot("t-1") == QuotaState(1, 1, 100, 100, "2025-01")
    quotas.forget("nobody")


# --- racing admissions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits",
    [
        {"max_concurrent_requests": 10},
        {"requests_per_minute": 10},
        {"tokens_per_minute": 1000},
        {"token_budget": 1000},
    ],
    ids=lambda limits: next(iter(limits)),
)
async def test_racing_admissions_never_overshoot(
    quotas: QuotaManager, limits: dict[str, int]
) -> None:
    acme = tenant(**limits)
    results = await asyncio.gather(
        *(quotas.admit(acme, estimated_tokens=100) for _ in range(50)), return_exceptions=True
    )
    admitted = [result for result in results if isinstance(result, Admission)]
    refusals = [result for result in results if isinstance(result, RateLimited)]
    assert (len(admitted), len(refusals)) == (10, 40)
    state = await quotas.snapshot("t-1")
    assert (state.concurrent, state.requests_last_minute, state.tokens_last_minute) == (
        10,
        10,
        1000,
    )


# --- Redis: replicas, leases, exactly once, the server's clock ---------------------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def replicas(
    new_redis_backend: Callable[..., RedisQuotaBackend], ledger: FakeLedger
) -> list[QuotaManager]:
    """Two managers, each with its own connections, on one Redis and its clock: two replicas."""
    managers = [QuotaManager(ledger, new_redis_backend()) for _ in range(2)]
    for manager in managers:
        await manager.start()
    return managers


async def admit_from_both(
    replicas: list[QuotaManager], who: Tenant, count: int
) -> tuple[list[tuple[QuotaManager, Admission]], list[RateLimited]]:
    """``count`` admissions at once, alternating between the replicas: (replica, admission)
    for those let in, and the refusals."""
    asked = [replicas[i % len(replicas)] for i in range(count)]
    results = await asyncio.gather(
        *(manager.admit(who, estimated_tokens=10) for manager in asked), return_exceptions=True
    )
    admitted = [
        (manager, result)
        for manager, result in zip(asked, results, strict=True)
        if isinstance(result, Admission)
    ]
    refused = [result for result in results if isinstance(result, RateLimited)]
    assert len(admitted) + len(refused) == count, results
    return admitted, refused


async def test_replicas_share_the_concurrency_limit(replicas: list[QuotaManager]) -> None:
    acme = tenant(max_concurrent_requests=4)
    admitted, refused = await admit_from_both(replicas, acme, 40)
    assert (len(admitted), len(refused)) == (4, 36)
    assert {error.message for error in refused} == {
        "too many concurrent requests: max_concurrent_requests is 4"
    }
    for manager in replicas:
        assert (await manager.snapshot("t-1")).concurrent == 4
    for manager, admission in admitted[:2]:
        manager.settle(admission, actual_tokens=5)
        await manager.snapshot("t-1")  # after this replica's own settles
    more, _ = await admit_from_both(replicas, acme, 10)
    assert len(more) == 2


async def test_replicas_share_the_requests_per_minute_limit(replicas: list[QuotaManager]) -> None:
    acme = tenant(requests_per_minute=60)
    admitted, refused = await admit_from_both(replicas, acme, 150)
    assert (len(admitted), len(refused)) == (60, 90)
    assert all(59.0 < (error.retry_after_s or 0.0) <= 60.0 for error in refused)
    for manager, admission in admitted:
        manager.settle(admission, actual_tokens=10)
    for manager in replicas:
        assert (await manager.snapshot("t-1")).requests_last_minute == 60
    _, refused = await admit_from_both(replicas, acme, 4)  # settling does not free the window
    assert len(refused) == 4


async def test_replicas_under_churn_never_exceed_concurrency(
    replicas: list[QuotaManager],
) -> None:
    """Six clients per replica admit, hold for a few ms and settle, for a second and a half: the
    requests in flight across both never exceed the limit, and reach it."""
    acme = tenant(max_concurrent_requests=4)
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + 1.5
    rng = random.Random(7)
    in_flight = peak = num_served = 0

    async def client(manager: QuotaManager) -> None:
        nonlocal in_flight, peak, num_served
        while loop.time() < stop_at:
            try:
                admission = await manager.admit(acme, estimated_tokens=10)
            except RateLimited:
                await asyncio.sleep(rng.uniform(0.001, 0.005))
                continue
            in_flight += 1  # after its slot was reserved...
            peak = max(peak, in_flight)
            await asyncio.sleep(rng.uniform(0.0, 0.01))
            in_flight -= 1  # ...and before it is freed
            num_served += 1
            manager.settle(admission, actual_tokens=10)

    await asyncio.gather(*(client(replicas[i % 2]) for i in range(12)))
    assert peak == 4
    assert num_served > 40
    for manager in replicas:
        assert (await manager.snapshot("t-1")).concurrent == 0


async def reserve_with_budget(
    backend: RedisQuotaBackend, order: ReserveOrder, *, recorded_tokens: int
) -> tuple[RedisReservation, str]:
    """Order, install the budget the backend asks for, order again: the reservation (within
    every limit) and its period."""
    missing = await backend.reserve(order)
    assert isinstance(missing, BudgetMissing)
    await backend.install_budget(order.tenant_id, missing.kind, missing.period, recorded_tokens)
    reserved = await backend.reserve(order)
    assert isinstance(reserved, Reserved)
    assert reserved.breach is None and isinstance(reserved.reservation, RedisReservation)
    assert reserved.period == missing.period
    return reserved.reservation, missing.period


async def test_settle_is_exactly_once_in_redis(
    new_redis_backend: Callable[..., RedisQuotaBackend],
) -> None:
    """A settle sent again (its answer lost, say) changes nothing: only the call that removes the
    live lease corrects the window and the budget."""
    backend = new_redis_backend()
    await backend.start()
    order = ReserveOrder("t-1", Quotas(token_budget=10_000), 1000, reserve_over_limit=False)
    reservation, period = await reserve_with_budget(backend, order, recorded_tokens=500)
    assert await backend.snapshot("t-1") == QuotaState(1, 1, 1000, 1500, period)
    assert await backend.settle_now(reservation, 300) is True
    assert await backend.settle_now(reservation, 300) is False
    assert await backend.settle_now(reservation, 700) is False
    assert await backend.snapshot("t-1") == QuotaState(0, 1, 300, 800, period)


async def test_leases_are_renewed_while_requests_run(
    new_redis_backend: Callable[..., RedisQuotaBackend], ledger: FakeLedger
) -> None:
    lease_s = 1.0
    holder, other = (QuotaManager(ledger, new_redis_backend(lease_s=lease_s)) for _ in range(2))
    await holder.start()
    await other.start()
    acme = tenant(max_concurrent_requests=1)
    long_one = await holder.admit(acme, estimated_tokens=10)
    await asyncio.sleep(2.5 * lease_s)  # renewed every lease / 3
    await refused(other, acme)
    holder.settle(long_one, actual_tokens=10)
    await holder.snapshot("t-1")
    assert not (await other.admit(acme, estimated_tokens=10)).demoted


async def test_lapsed_reservation_frees_its_slot_and_stays_charged(
    new_redis_backend: Callable[..., RedisQuotaBackend],
) -> None:
    """A reservation nobody renews (a backend never started: no renewals) lapses after its
    lease: its slot frees, its estimate stays in the window and the budget, and a late settle
    changes nothing."""
    backend = new_redis_backend(lease_s=0.3)
    order = ReserveOrder("t-1", Quotas(max_concurrent_requests=1, token_budget=10_000), 1000, False)
    reservation, period = await reserve_with_budget(backend, order, recorded_tokens=0)
    second = await backend.reserve(order)
    assert isinstance(second, Reserved)
    assert second.breach is not None and second.breach.limit == "max_concurrent_requests"
    await asyncio.sleep(0.4)
    assert await backend.snapshot("t-1") == QuotaState(0, 1, 1000, 1000, period)
    assert await backend.settle_now(reservation, 10) is False
    assert await backend.snapshot("t-1") == QuotaState(0, 1, 1000, 1000, period)
    third = await backend.reserve(order)
    assert isinstance(third, Reserved) and third.breach is None


# A replica in a process of its own: it admits `count` requests of tenant t-1 (concurrency 4),
# says so, and runs (renewing its leases) until it is killed.
REPLICA_SCRIPT = """
import asyncio, sys
from gateway.quotas import QuotaManager
from gateway.quotas_redis import RedisQuotaBackend
from gateway.tenants import Quotas, Tenant

async def main(url: str, lease_s: float, count: int) -> None:
    async def no_usage(*args: object) -> int:
        return 0
    manager = QuotaManager(no_usage, RedisQuotaBackend(url, lease_s=lease_s))
    await manager.start()
    acme = Tenant("t-1", "acme", 1.0, "standard", ["standard"],
                  Quotas(max_concurrent_requests=4), "reject", 0.0)
    for _ in range(count):
        await manager.admit(acme, estimated_tokens=10)
    print("admitted", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
"""


async def test_killed_replica_s_reservations_lapse_within_the_lease(
    redis_url: str, new_redis_backend: Callable[..., RedisQuotaBackend], ledger: FakeLedger
) -> None:
    lease_s = 2.0
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REPLICA_SCRIPT,
        redis_url,
        str(lease_s),
        "3",
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )
    survivor = QuotaManager(ledger, new_redis_backend(lease_s=lease_s))
    await survivor.start()
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"admitted\n"
        await asyncio.sleep(2 * lease_s)  # its leases are renewed while it lives
        assert (await survivor.snapshot("t-1")).concurrent == 3
        acme = tenant(max_concurrent_requests=4)
        mine = [await survivor.admit(acme, estimated_tokens=10)]
        await refused(survivor, acme)

        process.kill()  # SIGKILL: no settle, no goodbye
        killed_at = time.monotonic()
        await process.wait()
        while (await survivor.snapshot("t-1")).concurrent > 1:
            assert time.monotonic() - killed_at < lease_s + 1.0, "the leases did not lapse"
            await asyncio.sleep(0.02)
        lapsed_after_s = time.monotonic() - killed_at
        # Its last renewal was about lease / 3 before the kill (more on a busy machine), and
        # the lease lapses one lease after it; the slack is this loop's polling.
        assert lease_s / 3 < lapsed_after_s <= lease_s + 0.5
        mine += [await survivor.admit(acme, estimated_tokens=10) for _ in range(3)]
        await refused(survivor, acme)
        for admission in mine:
            survivor.settle(admission, actual_tokens=10)
        assert (await survivor.snapshot("t-1")).concurrent == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("kind", ["day", "month"])
async def test_periods_in_redis_are_python_s(
    new_redis_backend: Callable[..., RedisQuotaBackend], kind: BudgetPeriod
) -> None:
    """The scripts name the UTC day and month themselves (from the server's clock): the same
    names as ``period_of``, across month, year and leap-day boundaries."""
    moments = [
        dt.datetime(year, month, day, tzinfo=dt.UTC).timestamp() + offset
        for year, month, day in [
            (1970, 1, 1),
            (2000, 2, 29),
            (2000, 3, 1),
            (2024, 2, 29),
            (2024, 3, 1),
            (2025, 1, 1),
            (2100, 3, 1),
        ]
        for offset in (-0.001, 0.0, 43_200.0)
        if year > 1970 or offset >= 0
    ]
    rng = random.Random(11)
    moments += [rng.uniform(0, 4.2e9) for _ in range(60)]
    clock = FakeClock(0.0)
    backend = new_redis_backend(clock=clock)
    order = ReserveOrder("t-1", Quotas(token_budget=10, budget_period=kind), 1, False)
    for moment in moments:
        clock.now = moment
        missing = await backend.reserve(order)
        assert isinstance(missing, BudgetMissing)
        assert missing.period == period_of(moment, kind), moment


async def test_unreachable_redis_is_a_clean_503() -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = RedisQuotaBackend(f"redis://:secret@127.0.0.1:{port}/0", timeout_s=0.5)
    quotas = QuotaManager(FakeLedger(), backend)
    try:
        with pytest.raises(ConnectionError, match=f"Redis at 127.0.0.1:{port} does not") as e:
            await quotas.start()
        assert "secret" not in str(e.value)
        with pytest.raises(Unavailable) as caught:
            await quotas.admit(tenant(max_concurrent_requests=1), estimated_tokens=1)
        assert (caught.value.status, caught.value.retry_after_s) == (503, 1.0)
        assert caught.value.message == "quotas cannot be checked right now; try again"
    finally:
        await quotas.close()
