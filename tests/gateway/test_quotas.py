"""``QuotaManager`` with a fake clock and an in-memory ledger: each quota kind under ``reject`` and
``demote``, sliding windows, settling, budget periods, quota changes, forgetting, and admissions
racing each other on one event loop."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import msgspec
import pytest

from gateway.errors import QuotaExhausted, RateLimited
from gateway.quotas import Admission, QuotaManager, QuotaState
from gateway.tenants import BudgetPeriod, OverQuotaPolicy, Quotas, Tenant

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


@pytest.fixture
def quotas(clock: FakeClock, ledger: FakeLedger) -> QuotaManager:
    return QuotaManager(ledger, clock=clock)


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
    assert quotas.snapshot("t-1").concurrent == 2  # the refused one reserved nothing
    quotas.settle(first, actual_tokens=10)
    third = await quotas.admit(acme, estimated_tokens=10)
    assert not third.demoted
    assert quotas.snapshot("t-1").concurrent == 2


async def test_concurrency_demote_still_counts(quotas: QuotaManager) -> None:
    acme = tenant("demote", max_concurrent_requests=1)
    first = await quotas.admit(acme, estimated_tokens=10)
    second = await quotas.admit(acme, estimated_tokens=10)
    assert (first.demoted, first.demoted_reason) == (False, None)
    assert second.demoted is True
    assert second.demoted_reason == "too many concurrent requests: max_concurrent_requests is 1"
    assert quotas.snapshot("t-1") == QuotaState(2, 2, 20, 0, None)


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
    assert quotas.snapshot("t-1").requests_last_minute == 3


async def test_requests_per_minute_demote(quotas: QuotaManager) -> None:
    acme = tenant("demote", requests_per_minute=1)
    assert not (await quotas.admit(acme, estimated_tokens=10)).demoted
    second = await quotas.admit(acme, estimated_tokens=10)
    assert second.demoted_reason == "rate limit reached: requests_per_minute is 1"
    assert quotas.snapshot("t-1").requests_last_minute == 2


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
    assert quotas.snapshot("t-1").tokens_last_minute == 1000


async def test_tokens_per_minute_demote(quotas: QuotaManager) -> None:
    acme = tenant("demote", tokens_per_minute=1000)
    await quotas.admit(acme, estimated_tokens=800)
    second = await quotas.admit(acme, estimated_tokens=300)
    assert second.demoted is True
    assert second.demoted_reason is not None
    assert second.demoted_reason.startswith("rate limit reached: tokens_per_minute is 1000")
    assert quotas.snapshot("t-1").tokens_last_minute == 1100


async def test_request_larger_than_tokens_per_minute(quotas: QuotaManager) -> None:
    error = await refused(quotas, tenant(tokens_per_minute=1000), 1001)
    assert type(error) is RateLimited
    assert error.message == (
        "this request needs up to 1001 tokens (prompt + max_tokens), more than "
        "tokens_per_minute (1000) allows at all; lower max_tokens"
    )
    assert error.retry_after_s == 60.0
    assert quotas.snapshot("t-1").tokens_last_minute == 0
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
    assert quotas.snapshot("t-1") == QuotaState(1, 0, 0, 9800, "2025-01")  # windows moved on


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
    assert quotas.snapshot("t-1").budget_used == 10_400


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
    assert quotas.snapshot("t-1").budget_used == 6300
    clock.now = FEB_1
    february = await quotas.admit(acme, estimated_tokens=100)
    assert february.period == "2025-02"
    assert ledger.calls[1:] == [("t-1", "month", "2025-02")]
    assert quotas.snapshot("t-1").budget_used == 107
    quotas.settle(january, actual_tokens=900)  # goes to January's total, not February's
    assert quotas.snapshot("t-1") == QuotaState(1, 1, 100, 107, "2025-02")


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
    assert quotas.snapshot("t-1").budget_used == 50


async def test_failed_load_is_retried_by_the_waiters() -> None:
    calls: list[str] = []

    async def flaky(tenant_id: str, kind: BudgetPeriod, period: str) -> int:
        calls.append(period)
        await asyncio.sleep(0)
        if len(calls) == 1:
            raise OSError("database is locked")
        return 40

    quotas = QuotaManager(flaky, clock=FakeClock(JAN_15))
    acme = tenant(token_budget=100)
    results = await asyncio.gather(
        *(quotas.admit(acme, estimated_tokens=10) for _ in range(3)), return_exceptions=True
    )
    assert [type(result) for result in results] == [OSError, Admission, Admission]
    assert calls == ["2025-01", "2025-01"]
    assert quotas.snapshot("t-1").budget_used == 60


# --- settling ----------------------------------------------------------------------------------


async def test_settle_frees_unused_reservation(quotas: QuotaManager) -> None:
    acme = tenant(tokens_per_minute=1000, token_budget=5000)
    big = await quotas.admit(acme, estimated_tokens=1000)
    assert quotas.snapshot("t-1") == QuotaState(1, 1, 1000, 1000, "2025-01")
    await refused(quotas, acme, 900)
    quotas.settle(big, actual_tokens=100)
    assert quotas.snapshot("t-1") == QuotaState(0, 1, 100, 100, "2025-01")
    assert not (await quotas.admit(acme, estimated_tokens=900)).demoted
    assert quotas.snapshot("t-1") == QuotaState(1, 2, 1000, 1000, "2025-01")


async def test_settle_is_idempotent(quotas: QuotaManager) -> None:
    admission = await quotas.admit(tenant(token_budget=5000), estimated_tokens=1000)
    quotas.settle(admission, actual_tokens=0)  # failed before running
    quotas.settle(admission, actual_tokens=700)
    assert quotas.snapshot("t-1") == QuotaState(0, 1, 0, 0, "2025-01")


async def test_settle_after_the_window_moved_on(quotas: QuotaManager, clock: FakeClock) -> None:
    long_one = await quotas.admit(tenant(), estimated_tokens=1000)
    clock.now += 61
    await quotas.admit(tenant(), estimated_tokens=50)
    quotas.settle(long_one, actual_tokens=400)  # already out of the window: changes nothing
    assert quotas.snapshot("t-1") == QuotaState(1, 1, 50, 0, None)


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
    assert quotas.snapshot("t-1") == QuotaState(0, 0, 0, 0, None)
    fresh = await quotas.admit(acme, estimated_tokens=100)  # the old slot is gone too
    assert not fresh.demoted
    assert len(ledger.calls) == 2
    quotas.settle(old, actual_tokens=100)  # harmless
    assert quotas.snapshot("t-1") == QuotaState(1, 1, 100, 100, "2025-01")
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
    state = quotas.snapshot("t-1")
    assert (state.concurrent, state.requests_last_minute, state.tokens_last_minute) == (
        10,
        10,
        1000,
    )
