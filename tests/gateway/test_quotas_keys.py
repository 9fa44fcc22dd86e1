"""Quotas per API key: ``QuotaManager.admit`` with ``key_quotas`` charges the key's own scope
together with the tenant's overall scope and (with ``model_quotas``) the model's, over each
backend (in memory; a real Redis server), on a fake clock: a key's limit refuses that key alone and
names it by its label, never by anything secret; the checks run tenant, model, key and the first
breach wins; a breach in any scope reserves nothing in the others; settling corrects every scope;
a key's budget is loaded from the store's usage of that key (and fails closed without it);
demotion and forgetting cover key scopes; a model and a key of the same id do not share a scope.

With Redis alone: key leases (with a model's, in one reservation) are renewed while requests run;
key scopes live under the tenant's hash tag in a ``k:`` namespace of their own, listed in a set,
and ``forget`` leaves no key behind."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.errors import QuotaExhausted, RateLimited, Unavailable
from gateway.quotas import Admission, QuotaManager, QuotaState
from gateway.quotas_backend import QuotaBackend, ReserveOrder
from gateway.quotas_redis import RedisQuotaBackend
from gateway.tenants import BudgetPeriod, OverQuotaPolicy, Quotas, Tenant
from tests.gateway.test_quotas import JAN_15, JAN_16, FakeClock, FakeLedger, tenant
from tests.gateway.test_quotas import clock as clock
from tests.gateway.test_quotas import new_backend as new_backend
from tests.gateway.test_quotas import new_redis_backend as new_redis_backend
from tests.redis_server import redis_server as redis_server
from tests.redis_server import redis_url as redis_url

KEY = "key-0001"
LABEL = "fg-Ab3d…"  # the key's display prefix: what refusals name it by
OTHER_KEY = "key-0002"
BIG = "org/big-model:v1"


class KeyLedger(FakeLedger):
    """``FakeLedger`` (overall usage), and usage per (tenant, kind, period, key)."""

    def __init__(self) -> None:
        super().__init__()
        self.key_recorded: dict[tuple[str, BudgetPeriod, str, str], int] = {}
        self.key_calls: list[tuple[str, BudgetPeriod, str, str]] = []

    async def of_key(self, tenant_id: str, kind: BudgetPeriod, period: str, *, key_id: str) -> int:
        self.key_calls.append((tenant_id, kind, period, key_id))
        await asyncio.sleep(0)
        return self.key_recorded.get((tenant_id, kind, period, key_id), 0)

    async def of_model(
        self, tenant_id: str, kind: BudgetPeriod, period: str, *, model_id: str
    ) -> int:
        await asyncio.sleep(0)
        return 0


@pytest.fixture
def ledger() -> KeyLedger:
    return KeyLedger()


def manager(backend: QuotaBackend, ledger: KeyLedger) -> QuotaManager:
    return QuotaManager(
        ledger, backend, model_budget_usage=ledger.of_model, key_budget_usage=ledger.of_key
    )


@pytest.fixture
async def quotas(new_backend: Callable[[], QuotaBackend], ledger: KeyLedger) -> QuotaManager:
    made = manager(new_backend(), ledger)
    await made.start()
    return made


async def admit(
    quotas: QuotaManager,
    who: Tenant,
    key_quotas: Quotas | None,
    estimated_tokens: int = 10,
    *,
    key_id: str = KEY,
    model_quotas: Quotas | None = None,
) -> Admission:
    return await quotas.admit(
        who,
        estimated_tokens=estimated_tokens,
        model_id=BIG if model_quotas is not None else "",
        model_quotas=model_quotas,
        key_id=key_id,
        key_quotas=key_quotas,
        key_label=LABEL if key_id == KEY else "",
    )


async def refused(
    quotas: QuotaManager,
    who: Tenant,
    key_quotas: Quotas | None,
    estimated_tokens: int = 10,
    *,
    key_id: str = KEY,
    model_quotas: Quotas | None = None,
) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await admit(
            quotas, who, key_quotas, estimated_tokens, key_id=key_id, model_quotas=model_quotas
        )
    assert caught.value.status == 429
    return caught.value


async def states(quotas: QuotaManager, *, with_model: bool = False) -> list[QuotaState]:
    """The overall scope's state, (the model's,) then the key's."""
    found = [await quotas.snapshot("t-1")]
    if with_model:
        found.append(await quotas.snapshot("t-1", model_id=BIG))
    return [*found, await quotas.snapshot("t-1", key_id=KEY)]


def demoting(**limits: Any) -> Tenant:
    policy: OverQuotaPolicy = "demote"
    return tenant(policy, **limits)


# --- a key's limits bind that key alone --------------------------------------------------------


async def test_key_tokens_per_minute_refuses_that_key_naming_it(
    quotas: QuotaManager, clock: FakeClock
) -> None:
    acme = tenant(tokens_per_minute=10_000)
    mine = Quotas(tokens_per_minute=1000)
    await admit(quotas, acme, mine, 600)
    clock.now += 10
    error = await refused(quotas, acme, mine, 500)
    assert type(error) is RateLimited
    assert error.message == (
        f"rate limit reached: tokens_per_minute of API key {LABEL} is 1000; 600 are used or "
        "reserved and this request needs up to 500"
    )
    assert error.retry_after_s == pytest.approx(50.0)
    assert KEY not in error.message  # the label, not the id
    # Another key of the tenant's, with the same limits, and the tenant without a key go on.
    await admit(quotas, acme, mine, 500, key_id=OTHER_KEY)
    await admit(quotas, acme, None, 500, key_id="")
    assert [state.tokens_last_minute for state in await states(quotas)] == [1600, 600]


@pytest.mark.parametrize(
    ("limits", "needs", "message"),
    [
        (
            {"max_concurrent_requests": 1},
            10,
            f"too many concurrent requests: max_concurrent_requests of API key {LABEL} is 1",
        ),
        (
            {"requests_per_minute": 1},
            10,
            f"rate limit reached: requests_per_minute of API key {LABEL} is 1",
        ),
        (
            {"tokens_per_minute": 100},
            101,
            "this request needs up to 101 tokens (prompt + max_tokens), more than "
            f"tokens_per_minute of API key {LABEL} (100) allows at all; lower max_tokens",
        ),
    ],
    ids=["concurrency", "rpm", "tpm-too-large"],
)
async def test_key_refusals_name_the_key(
    quotas: QuotaManager, limits: dict[str, Any], needs: int, message: str
) -> None:
    acme = tenant()
    mine = Quotas(**limits)
    if needs <= 100:
        await admit(quotas, acme, mine)
    error = await refused(quotas, acme, mine, needs)
    assert error.message == message
    demoted = await admit(quotas, demoting(), mine, needs)
    assert demoted.demoted_reason == message


async def test_a_key_without_a_label_is_named_by_its_id(quotas: QuotaManager) -> None:
    one = Quotas(max_concurrent_requests=1)
    await admit(quotas, tenant(), one, key_id=OTHER_KEY)
    error = await refused(quotas, tenant(), one, key_id=OTHER_KEY)
    assert error.message.endswith(f"of API key {OTHER_KEY} is 1")


# --- one atomic step, in order -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overall", "model", "key", "named"),
    [
        ({}, {}, {"max_concurrent_requests": 1}, f"of API key {LABEL}"),
        ({}, {}, {"tokens_per_minute": 15}, f"of API key {LABEL}"),
        ({}, {}, {"token_budget": 15}, f"of API key {LABEL}"),
        # Several scopes broken at once: tenant, then model, then key; the first one wins.
        ({"max_concurrent_requests": 1}, {}, {"max_concurrent_requests": 1}, "is 1"),
        ({}, {"tokens_per_minute": 15}, {"max_concurrent_requests": 1}, f"of model {BIG!r}"),
        ({"token_budget": 15}, {}, {"requests_per_minute": 1}, "token_budget is 15"),
    ],
    ids=["key-conc", "key-tpm", "key-budget", "tenant-first", "model-first", "tenant-budget"],
)
async def test_a_breach_in_one_scope_reserves_nothing_in_the_others(
    quotas: QuotaManager,
    overall: dict[str, Any],
    model: dict[str, Any],
    key: dict[str, Any],
    named: str,
) -> None:
    acme = tenant(**overall)
    big, mine = Quotas(**model), Quotas(**key)
    await admit(quotas, acme, mine, model_quotas=big)
    before = await states(quotas, with_model=True)
    error = await refused(quotas, acme, mine, model_quotas=big)
    assert named in error.message
    if "API key" not in named:
        assert "API key" not in error.message
    assert await states(quotas, with_model=True) == before
    assert [state.concurrent for state in before] == [1, 1, 1]


async def test_racing_admissions_never_overshoot_a_key_limit(quotas: QuotaManager) -> None:
    acme = tenant(tokens_per_minute=100_000)
    mine = Quotas(tokens_per_minute=1000)
    results = await asyncio.gather(
        *(admit(quotas, acme, mine, 100) for _ in range(50)), return_exceptions=True
    )
    admitted = [result for result in results if isinstance(result, Admission)]
    assert len(admitted) == 10
    assert {result.message for result in results if isinstance(result, RateLimited)} == {
        f"rate limit reached: tokens_per_minute of API key {LABEL} is 1000; 1000 are used or "
        "reserved and this request needs up to 100"
    }
    overall, of_key = await states(quotas)
    assert overall == of_key == QuotaState(10, 10, 1000, 0, None)


# --- settling, budgets -------------------------------------------------------------------------


async def test_settle_corrects_every_scope_once(quotas: QuotaManager, ledger: KeyLedger) -> None:
    ledger.recorded[("t-1", "month", "2025-01")] = 1000
    ledger.key_recorded[("t-1", "month", "2025-01", KEY)] = 200
    acme = tenant(token_budget=10_000)
    mine = Quotas(token_budget=5000)
    admission = await admit(quotas, acme, mine, 1000, model_quotas=Quotas())
    assert (admission.key_id, admission.period, admission.key_period) == (
        KEY,
        "2025-01",
        "2025-01",
    )
    assert admission.model_period is None
    assert await states(quotas, with_model=True) == [
        QuotaState(1, 1, 1000, 2000, "2025-01"),
        QuotaState(1, 1, 1000, 0, None),
        QuotaState(1, 1, 1000, 1200, "2025-01"),
    ]
    quotas.settle(admission, actual_tokens=300)
    quotas.settle(admission, actual_tokens=900)
    assert await states(quotas, with_model=True) == [
        QuotaState(0, 1, 300, 1300, "2025-01"),
        QuotaState(0, 1, 300, 0, None),
        QuotaState(0, 1, 300, 500, "2025-01"),
    ]
    assert ledger.key_calls == [("t-1", "month", "2025-01", KEY)]


async def test_key_budget_loads_from_the_key_s_usage_and_refuses_naming_it(
    quotas: QuotaManager, ledger: KeyLedger, clock: FakeClock
) -> None:
    ledger.key_recorded[("t-1", "day", "2025-01-15", KEY)] = 900
    acme = tenant(token_budget=100_000)  # monthly, overall
    mine = Quotas(token_budget=1000, budget_period="day")
    await asyncio.gather(*(admit(quotas, acme, mine, 20) for _ in range(3)))
    error = await refused(quotas, acme, mine, 50)
    assert type(error) is QuotaExhausted
    assert error.message == (
        f"token budget exhausted: token_budget of API key {LABEL} is 1000 per day; 960 are "
        "used or reserved in 2025-01-15 and this request needs up to 50"
    )
    assert error.retry_after_s == JAN_16 - JAN_15
    # Another key starts from its own usage (none recorded).
    assert (await admit(quotas, acme, mine, 500, key_id=OTHER_KEY)).key_period == "2025-01-15"
    assert ledger.key_calls == [
        ("t-1", "day", "2025-01-15", KEY),
        ("t-1", "day", "2025-01-15", OTHER_KEY),
    ]
    assert ledger.calls == [("t-1", "month", "2025-01")]
    clock.now = JAN_16
    assert (await admit(quotas, acme, mine, 50)).key_period == "2025-01-16"
    assert ledger.key_calls[2:] == [("t-1", "day", "2025-01-16", KEY)]


async def test_key_budget_without_key_usage_fails_closed(
    new_backend: Callable[[], QuotaBackend], ledger: KeyLedger
) -> None:
    quotas = QuotaManager(ledger, new_backend())  # no key_budget_usage
    await quotas.start()
    acme = tenant(tokens_per_minute=1000)
    with pytest.raises(Unavailable) as caught:
        await admit(quotas, acme, Quotas(token_budget=1000))
    assert caught.value.message == (
        "this tenant's token budget for this API key cannot be checked right now"
    )
    assert (await quotas.snapshot("t-1")).concurrent == 0  # nothing reserved
    assert not (await admit(quotas, acme, Quotas(tokens_per_minute=100))).demoted


async def test_key_over_limit_demoted_is_charged_everywhere(quotas: QuotaManager) -> None:
    acme = demoting()
    mine = Quotas(tokens_per_minute=100)
    await admit(quotas, acme, mine, 80)
    second = await admit(quotas, acme, mine, 80)
    assert second.demoted
    assert second.demoted_reason is not None
    assert second.demoted_reason.startswith(
        f"rate limit reached: tokens_per_minute of API key {LABEL}"
    )
    assert [state.tokens_last_minute for state in await states(quotas)] == [160, 160]


async def test_forget_drops_key_scopes(quotas: QuotaManager, ledger: KeyLedger) -> None:
    acme = tenant()
    mine = Quotas(max_concurrent_requests=1, token_budget=1000)
    old = await admit(quotas, acme, mine, 100)
    quotas.forget("t-1")
    assert await states(quotas) == [QuotaState(0, 0, 0, 0, None)] * 2
    fresh = await admit(quotas, acme, mine, 100)  # the old slot is gone, the budget reloaded
    assert not fresh.demoted
    assert len(ledger.key_calls) == 2
    quotas.settle(old, actual_tokens=100)  # harmless
    assert await states(quotas) == [
        QuotaState(1, 1, 100, 0, None),
        QuotaState(1, 1, 100, 100, "2025-01"),
    ]


async def test_a_model_and_a_key_of_the_same_id_have_scopes_of_their_own(
    quotas: QuotaManager,
) -> None:
    one = Quotas(max_concurrent_requests=1)
    for same_id in ["x", "org/m:v1"]:
        await quotas.admit(tenant(), estimated_tokens=1, model_id=same_id, model_quotas=one)
        await quotas.admit(tenant(), estimated_tokens=1, key_id=same_id, key_quotas=one)
        assert (await quotas.snapshot("t-1", model_id=same_id)).concurrent == 1
        assert (await quotas.snapshot("t-1", key_id=same_id)).concurrent == 1
    with pytest.raises(ValueError, match="one scope"):
        await quotas.snapshot("t-1", model_id="x", key_id="x")


def test_key_quotas_need_a_key() -> None:
    with pytest.raises(ValueError, match="key_id"):
        ReserveOrder("t-1", Quotas(), 1, False, key_quotas=Quotas())


# --- Redis: leases, keys -----------------------------------------------------------------------


async def test_key_and_model_leases_are_renewed_while_requests_run(
    new_redis_backend: Callable[..., RedisQuotaBackend], ledger: KeyLedger
) -> None:
    """One reservation in three scopes, renewed in all of them; a second one with another key
    alone in between, so the renewal carries reservations with different scopes."""
    lease_s = 1.0
    holder, other = (manager(new_redis_backend(lease_s=lease_s), ledger) for _ in range(2))
    await holder.start()
    await other.start()
    one = Quotas(max_concurrent_requests=1)
    long_one = await admit(holder, tenant(), one, model_quotas=one)
    keyed = await admit(holder, tenant(), one, key_id=OTHER_KEY)
    await asyncio.sleep(2.5 * lease_s)  # renewed every lease / 3, in every scope
    assert f"of model {BIG!r}" in (await refused(other, tenant(), None, model_quotas=one)).message
    for key_id, label in [(KEY, LABEL), (OTHER_KEY, OTHER_KEY)]:
        error = await refused(other, tenant(), one, key_id=key_id)
        assert f"of API key {label}" in error.message
    holder.settle(long_one, actual_tokens=10)
    holder.settle(keyed, actual_tokens=10)
    await holder.snapshot("t-1")
    assert not (await admit(other, tenant(), one, model_quotas=one)).demoted
    assert not (await admit(other, tenant(), one, key_id=OTHER_KEY)).demoted


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def test_key_scopes_in_redis_have_their_own_namespace_and_are_forgotten(
    new_redis_backend: Callable[..., RedisQuotaBackend],
    ledger: KeyLedger,
    redis_client: Redis,
) -> None:
    quotas = manager(new_redis_backend(), ledger)
    await quotas.start()
    budget = Quotas(token_budget=100)
    for key_id in ["key:1", "a{b}c"]:
        await admit(quotas, tenant(), budget, 1, key_id=key_id, model_quotas=budget)
    keys = sorted(map(str, await redis_client.keys("*")))
    assert {re.findall(r"\{(.*?)\}", key)[0] for key in keys} == {"t-1"}
    assert "fairgate:quota:{t-1}:k:key%3A1:budget:month" in keys
    assert "fairgate:quota:{t-1}:k:a%7Bb%7Dc:leases" in keys
    assert "fairgate:quota:{t-1}:m:org%2Fbig-model%3Av1:budget:month" in keys  # as before
    assert "fairgate:quota:{t-1}:leases" in keys
    assert await redis_client.smembers("fairgate:quota:{t-1}:keys") == {"key:1", "a{b}c"}
    assert await redis_client.smembers("fairgate:quota:{t-1}:models") == {BIG}
    quotas.forget("t-1")
    await quotas.snapshot("t-1")  # after the forget landed
    assert await redis_client.keys("*") == []
