"""Quotas per model: ``QuotaManager.admit`` with ``model_quotas`` charges the tenant's overall scope
and the (tenant, model) scope together, over each backend (in memory; a real Redis server), on a
fake clock: a model's limit refuses that model alone, the overall limit still binds across models,
a breach in either scope reserves nothing in the other, settling corrects both, a model's budget
is loaded with its model id, demotion and forgetting cover model scopes.

With Redis alone: two managers (two replicas) never exceed a model's concurrency limit together;
model leases are renewed while requests run and lapse like the tenant's; model ids of any shape
get keys of their own under the tenant's hash tag."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.errors import QuotaExhausted, RateLimited, Unavailable
from gateway.quotas import Admission, QuotaManager, QuotaState
from gateway.quotas_backend import TENANT_SCOPE, QuotaBackend, Reserved, ReserveOrder, ScopeName
from gateway.quotas_redis import RedisQuotaBackend, RedisReservation
from gateway.tenants import BudgetPeriod, OverQuotaPolicy, Quotas, Tenant
from tests.gateway.test_quotas import JAN_15, JAN_16, FakeClock, FakeLedger, tenant
from tests.gateway.test_quotas import clock as clock
from tests.gateway.test_quotas import new_backend as new_backend
from tests.gateway.test_quotas import new_redis_backend as new_redis_backend
from tests.redis_server import redis_server as redis_server
from tests.redis_server import redis_url as redis_url

BIG = "org/big-model:v1"  # '/' and ':' as real model ids have them
SMALL = "small"


class ModelLedger(FakeLedger):
    """``FakeLedger`` (overall usage), and usage per (tenant, kind, period, model)."""

    def __init__(self) -> None:
        super().__init__()
        self.model_recorded: dict[tuple[str, BudgetPeriod, str, str], int] = {}
        self.model_calls: list[tuple[str, BudgetPeriod, str, str]] = []

    async def of_model(
        self, tenant_id: str, kind: BudgetPeriod, period: str, *, model_id: str
    ) -> int:
        self.model_calls.append((tenant_id, kind, period, model_id))
        await asyncio.sleep(0)
        return self.model_recorded.get((tenant_id, kind, period, model_id), 0)


@pytest.fixture
def ledger() -> ModelLedger:
    return ModelLedger()


@pytest.fixture
async def quotas(new_backend: Callable[[], QuotaBackend], ledger: ModelLedger) -> QuotaManager:
    manager = QuotaManager(ledger, new_backend(), model_budget_usage=ledger.of_model)
    await manager.start()
    return manager


async def admit(
    quotas: QuotaManager,
    who: Tenant,
    model_id: str,
    model_quotas: Quotas | None,
    estimated_tokens: int = 10,
) -> Admission:
    return await quotas.admit(
        who, estimated_tokens=estimated_tokens, model_id=model_id, model_quotas=model_quotas
    )


async def refused(
    quotas: QuotaManager,
    who: Tenant,
    model_id: str,
    model_quotas: Quotas | None,
    estimated_tokens: int = 10,
) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await admit(quotas, who, model_id, model_quotas, estimated_tokens)
    assert caught.value.status == 429
    return caught.value


async def states(quotas: QuotaManager, *model_ids: str) -> list[QuotaState]:
    """The overall scope's state, then each model's."""
    return [await quotas.snapshot("t-1", model_id=model_id) for model_id in ("", *model_ids)]


def demoting(**limits: Any) -> Tenant:
    policy: OverQuotaPolicy = "demote"
    return tenant(policy, **limits)


# --- a model's limits bind that model alone ----------------------------------------------------


async def test_model_tokens_per_minute_refuses_that_model_only(
    quotas: QuotaManager, clock: FakeClock
) -> None:
    acme = tenant(tokens_per_minute=10_000)
    big = Quotas(tokens_per_minute=1000)
    await admit(quotas, acme, BIG, big, 600)
    clock.now += 10
    error = await refused(quotas, acme, BIG, big, 500)
    assert type(error) is RateLimited
    assert error.message == (
        f"rate limit reached: tokens_per_minute of model {BIG!r} is 1000; 600 are used or "
        "reserved and this request needs up to 500"
    )
    assert error.retry_after_s == 50.0  # the 600 leave the window at +60
    # Another model, with limits of its own or none, and the overall scope go on.
    await admit(quotas, acme, SMALL, Quotas(tokens_per_minute=1000), 900)
    await admit(quotas, acme, "other", None, 900)
    await quotas.admit(acme, estimated_tokens=900)
    assert await states(quotas, BIG, SMALL, "other") == [
        QuotaState(4, 4, 3300, 0, None),
        QuotaState(1, 1, 600, 0, None),
        QuotaState(1, 1, 900, 0, None),
        QuotaState(0, 0, 0, 0, None),  # no model quotas: no model scope
    ]
    clock.now = JAN_15 + 60
    assert not (await admit(quotas, acme, BIG, big, 1000)).demoted


@pytest.mark.parametrize(
    ("limits", "needs", "message"),
    [
        (
            {"max_concurrent_requests": 1},
            10,
            f"too many concurrent requests: max_concurrent_requests of model {BIG!r} is 1",
        ),
        (
            {"requests_per_minute": 1},
            10,
            f"rate limit reached: requests_per_minute of model {BIG!r} is 1",
        ),
        (
            {"tokens_per_minute": 100},
            101,
            "this request needs up to 101 tokens (prompt + max_tokens), more than "
            f"tokens_per_minute of model {BIG!r} (100) allows at all; lower max_tokens",
        ),
    ],
    ids=["concurrency", "rpm", "tpm-too-large"],
)
async def test_model_refusals_name_the_model(
    quotas: QuotaManager, limits: dict[str, Any], needs: int, message: str
) -> None:
    acme = tenant()
    big = Quotas(**limits)
    if needs <= 100:
        await admit(quotas, acme, BIG, big)
    error = await refused(quotas, acme, BIG, big, needs)
    assert error.message == message
    demoted = await admit(quotas, demoting(), BIG, big, needs)
    assert demoted.demoted_reason == message


async def test_overall_limit_still_binds_across_models(quotas: QuotaManager) -> None:
    acme = tenant(tokens_per_minute=1000)
    each = Quotas(tokens_per_minute=800)
    await admit(quotas, acme, BIG, each, 600)
    error = await refused(quotas, acme, SMALL, each, 500)
    assert error.message == (
        "rate limit reached: tokens_per_minute is 1000; 600 are used or reserved and this "
        "request needs up to 500"
    )
    await admit(quotas, acme, SMALL, each, 400)
    await refused(quotas, acme, "third", None, 1)  # a model without quotas: the overall limit
    assert [state.tokens_last_minute for state in await states(quotas, BIG, SMALL)] == [
        1000,
        600,
        400,
    ]


# --- one atomic step ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overall", "model", "breached_model"),
    [
        ({}, {"max_concurrent_requests": 1}, BIG),
        ({"max_concurrent_requests": 1}, {}, ""),
        ({}, {"tokens_per_minute": 15}, BIG),
        ({"tokens_per_minute": 15}, {}, ""),
        ({}, {"token_budget": 15}, BIG),
        ({"token_budget": 15}, {}, ""),
    ],
    ids=[
        "model-conc",
        "overall-conc",
        "model-tpm",
        "overall-tpm",
        "model-budget",
        "overall-budget",
    ],
)
async def test_a_breach_in_one_scope_reserves_nothing_in_the_other(
    quotas: QuotaManager,
    overall: dict[str, Any],
    model: dict[str, Any],
    breached_model: str,
) -> None:
    acme = tenant(**overall)
    big = Quotas(**model)
    await admit(quotas, acme, BIG, big)
    before = await states(quotas, BIG)
    error = await refused(quotas, acme, BIG, big)
    assert (f"of model {BIG!r}" in error.message) == bool(breached_model)
    assert await states(quotas, BIG) == before
    assert [state.concurrent for state in before] == [1, 1]


async def test_racing_admissions_never_overshoot_a_model_limit(quotas: QuotaManager) -> None:
    acme = tenant(tokens_per_minute=100_000)
    big = Quotas(tokens_per_minute=1000)
    results = await asyncio.gather(
        *(admit(quotas, acme, BIG, big, 100) for _ in range(50)), return_exceptions=True
    )
    admitted = [result for result in results if isinstance(result, Admission)]
    refusals = [result for result in results if isinstance(result, RateLimited)]
    assert (len(admitted), len(refusals)) == (10, 40)
    # The overall scope holds exactly the admitted ones: no refused one left anything there.
    overall, of_big = await states(quotas, BIG)
    assert overall == of_big == QuotaState(10, 10, 1000, 0, None)


# --- settling, budgets -------------------------------------------------------------------------


async def test_settle_corrects_both_scopes_once(quotas: QuotaManager, ledger: ModelLedger) -> None:
    ledger.recorded[("t-1", "month", "2025-01")] = 1000
    ledger.model_recorded[("t-1", "month", "2025-01", BIG)] = 200
    acme = tenant(token_budget=10_000)
    big = Quotas(token_budget=5000)
    admission = await admit(quotas, acme, BIG, big, 1000)
    assert (admission.model_id, admission.period, admission.model_period) == (
        BIG,
        "2025-01",
        "2025-01",
    )
    assert await states(quotas, BIG) == [
        QuotaState(1, 1, 1000, 2000, "2025-01"),
        QuotaState(1, 1, 1000, 1200, "2025-01"),
    ]
    quotas.settle(admission, actual_tokens=300)
    quotas.settle(admission, actual_tokens=900)
    assert await states(quotas, BIG) == [
        QuotaState(0, 1, 300, 1300, "2025-01"),
        QuotaState(0, 1, 300, 500, "2025-01"),
    ]
    assert ledger.calls == [("t-1", "month", "2025-01")]
    assert ledger.model_calls == [("t-1", "month", "2025-01", BIG)]


async def test_model_budget_is_loaded_per_model_and_refuses_naming_it(
    quotas: QuotaManager, ledger: ModelLedger, clock: FakeClock
) -> None:
    ledger.model_recorded[("t-1", "day", "2025-01-15", BIG)] = 900
    acme = tenant(token_budget=100_000)  # monthly, overall
    big = Quotas(token_budget=1000, budget_period="day")
    small = Quotas(token_budget=1000, budget_period="day")
    await asyncio.gather(*(admit(quotas, acme, BIG, big, 20) for _ in range(3)))
    error = await refused(quotas, acme, BIG, big, 50)
    assert type(error) is QuotaExhausted
    assert error.message == (
        f"token budget exhausted: token_budget of model {BIG!r} is 1000 per day; 960 are used "
        "or reserved in 2025-01-15 and this request needs up to 50"
    )
    assert error.retry_after_s == JAN_16 - JAN_15
    too_large = await refused(quotas, acme, SMALL, small, 1001)
    assert too_large.message == (
        "this request needs up to 1001 tokens (prompt + max_tokens), more than the whole "
        f"token_budget of 1000 per day of model {SMALL!r}; lower max_tokens"
    )
    admission = await admit(quotas, acme, SMALL, small, 500)
    assert (admission.period, admission.model_period) == ("2025-01", "2025-01-15")
    assert ledger.model_calls == [
        ("t-1", "day", "2025-01-15", BIG),
        ("t-1", "day", "2025-01-15", SMALL),
    ]
    assert ledger.calls == [("t-1", "month", "2025-01")]
    clock.now = JAN_16  # a new day for the models' budgets, the same month overall
    assert (await admit(quotas, acme, BIG, big, 50)).model_period == "2025-01-16"
    assert ledger.model_calls[2:] == [("t-1", "day", "2025-01-16", BIG)]
    assert ledger.calls == [("t-1", "month", "2025-01")]


async def test_model_budget_without_model_usage_fails_closed(
    new_backend: Callable[[], QuotaBackend], ledger: ModelLedger
) -> None:
    quotas = QuotaManager(ledger, new_backend())  # no model_budget_usage
    await quotas.start()
    acme = tenant(tokens_per_minute=1000)
    with pytest.raises(Unavailable) as caught:
        await admit(quotas, acme, BIG, Quotas(token_budget=1000))
    assert caught.value.message == (
        f"this tenant's token budget for model {BIG!r} cannot be checked right now"
    )
    assert (await quotas.snapshot("t-1")).concurrent == 0  # nothing reserved
    assert not (await admit(quotas, acme, BIG, Quotas(tokens_per_minute=100))).demoted


async def test_model_over_limit_demoted_is_charged_in_both_scopes(quotas: QuotaManager) -> None:
    acme = demoting()
    big = Quotas(tokens_per_minute=100)
    await admit(quotas, acme, BIG, big, 80)
    second = await admit(quotas, acme, BIG, big, 80)
    assert second.demoted
    assert second.demoted_reason is not None
    assert second.demoted_reason.startswith(
        f"rate limit reached: tokens_per_minute of model {BIG!r}"
    )
    assert [state.tokens_last_minute for state in await states(quotas, BIG)] == [160, 160]


async def test_forget_drops_model_scopes(quotas: QuotaManager, ledger: ModelLedger) -> None:
    acme = tenant()
    big = Quotas(max_concurrent_requests=1, token_budget=1000)
    old = await admit(quotas, acme, BIG, big, 100)
    quotas.forget("t-1")
    assert await states(quotas, BIG) == [QuotaState(0, 0, 0, 0, None)] * 2
    fresh = await admit(quotas, acme, BIG, big, 100)  # the old slot is gone, the budget reloaded
    assert not fresh.demoted
    assert len(ledger.model_calls) == 2
    quotas.settle(old, actual_tokens=100)  # harmless
    assert await states(quotas, BIG) == [
        QuotaState(1, 1, 100, 0, None),
        QuotaState(1, 1, 100, 100, "2025-01"),
    ]


async def test_model_ids_of_any_shape_have_scopes_of_their_own(quotas: QuotaManager) -> None:
    acme = tenant()
    one = Quotas(max_concurrent_requests=1)
    model_ids = ["org/m:v1", "org/m", "org%2Fm", "a{b}c", "a:b", "a", "模型 ✓"]
    for model_id in model_ids:
        await admit(quotas, acme, model_id, one)
    for model_id in model_ids:
        error = await refused(quotas, acme, model_id, one)
        assert error.message.endswith(f"of model {model_id!r} is 1")
    assert (await quotas.snapshot("t-1")).concurrent == len(model_ids)


def test_model_quotas_need_a_model() -> None:
    with pytest.raises(ValueError, match="model_id"):
        ReserveOrder("t-1", Quotas(), 1, False, model_quotas=Quotas())


# --- Redis: replicas, leases, keys -------------------------------------------------------------


@pytest.fixture
async def replicas(
    new_redis_backend: Callable[..., RedisQuotaBackend], ledger: ModelLedger
) -> list[QuotaManager]:
    """Two managers, each with its own connections, on one Redis and its clock: two replicas."""
    managers = [
        QuotaManager(ledger, new_redis_backend(), model_budget_usage=ledger.of_model)
        for _ in range(2)
    ]
    for manager in managers:
        await manager.start()
    return managers


async def test_replicas_share_a_model_concurrency_limit(replicas: list[QuotaManager]) -> None:
    acme = tenant(max_concurrent_requests=100)
    big = Quotas(max_concurrent_requests=4)
    asked = [replicas[i % 2] for i in range(40)]
    results = await asyncio.gather(
        *(admit(manager, acme, BIG, big) for manager in asked), return_exceptions=True
    )
    admitted = [
        (manager, result)
        for manager, result in zip(asked, results, strict=True)
        if isinstance(result, Admission)
    ]
    refusals = [result for result in results if isinstance(result, RateLimited)]
    assert (len(admitted), len(refusals)) == (4, 36)
    assert {error.message for error in refusals} == {
        f"too many concurrent requests: max_concurrent_requests of model {BIG!r} is 4"
    }
    for manager in replicas:
        assert [state.concurrent for state in await states(manager, BIG)] == [4, 4]
    assert not (await admit(replicas[1], acme, SMALL, big)).demoted  # another model goes on
    for manager, admission in admitted[:2]:
        manager.settle(admission, actual_tokens=5)
        await manager.snapshot("t-1")  # after this replica's own settles
    for manager in replicas:
        assert [state.concurrent for state in await states(manager, BIG)] == [3, 2]


async def test_model_leases_are_renewed_while_requests_run(
    new_redis_backend: Callable[..., RedisQuotaBackend], ledger: ModelLedger
) -> None:
    lease_s = 1.0
    holder, other = (QuotaManager(ledger, new_redis_backend(lease_s=lease_s)) for _ in range(2))
    await holder.start()
    await other.start()
    big = Quotas(max_concurrent_requests=1)
    long_one = await admit(holder, tenant(), BIG, big)
    await asyncio.sleep(2.5 * lease_s)  # renewed every lease / 3, in both scopes
    error = await refused(other, tenant(), BIG, big)
    assert f"of model {BIG!r}" in error.message
    holder.settle(long_one, actual_tokens=10)
    await holder.snapshot("t-1")
    assert not (await admit(other, tenant(), BIG, big)).demoted


async def test_lapsed_model_reservation_frees_its_slot_and_stays_charged(
    new_redis_backend: Callable[..., RedisQuotaBackend],
) -> None:
    """Nobody renews (a backend never started): the reservation lapses in both scopes, stays
    charged at its estimate in both, and a late settle changes neither."""
    backend = new_redis_backend(lease_s=0.3)
    order = ReserveOrder(
        "t-1",
        Quotas(),
        1000,
        False,
        model_id=BIG,
        model_quotas=Quotas(max_concurrent_requests=1),
    )
    first = await backend.reserve(order)
    assert isinstance(first, Reserved) and first.reservation is not None
    second = await backend.reserve(order)
    assert isinstance(second, Reserved) and second.reservation is None
    assert second.breach is not None
    assert (second.breach.limit, second.breach.scope) == (
        "max_concurrent_requests",
        ScopeName("model", BIG),
    )
    await asyncio.sleep(0.4)
    lapsed = [QuotaState(0, 1, 1000, 0, None)] * 2
    assert [
        await backend.snapshot("t-1", s) for s in (TENANT_SCOPE, ScopeName("model", BIG))
    ] == lapsed
    assert isinstance(first.reservation, RedisReservation)
    assert await backend.settle_now(first.reservation, 10) is False
    assert [
        await backend.snapshot("t-1", s) for s in (TENANT_SCOPE, ScopeName("model", BIG))
    ] == lapsed
    third = await backend.reserve(order)
    assert isinstance(third, Reserved) and third.breach is None


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_model_keys_stay_under_the_tenant_s_hash_tag(
    new_redis_backend: Callable[..., RedisQuotaBackend],
    ledger: ModelLedger,
    redis_client: Redis,
) -> None:
    quotas = QuotaManager(ledger, new_redis_backend(), model_budget_usage=ledger.of_model)
    await quotas.start()
    for model_id in ["org/m:v1", "a{b}c", "模型"]:
        await admit(quotas, tenant(), model_id, Quotas(token_budget=100), 1)
    keys = sorted(map(str, await redis_client.keys("*")))
    # Redis Cluster hashes the text between the first '{' and the next '}': all of one tenant.
    assert {re.findall(r"\{(.*?)\}", key)[0] for key in keys} == {"t-1"}
    assert not any("模型" in key or "org/m" in key or "a{b" in key for key in keys)
    assert "fairgate:quota:{t-1}:m:org%2Fm%3Av1:budget:month" in keys
    quotas.forget("t-1")
    await quotas.snapshot("t-1")  # after the forget landed
    assert await redis_client.keys("*") == []
