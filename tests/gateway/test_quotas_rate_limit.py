"""The rate-limit state behind OpenAI's ``x-ratelimit-*`` headers, over each backend (in memory; a
real Redis server), on a fake clock: on every admission (``Admission.rate_limit``), on every
refusal by a limit (``RateLimited.rate_limit``) and from ``QuotaManager.peek``, which reserves
nothing. Remaining requests go down by one per admission, remaining tokens by the estimate and
back up by the difference at settle; the reset counts down and the window is back to its full
limit when it has passed; across scopes, the tightest one (per kind) wins the headers.

With Redis alone: an admission with its rate-limit state is still one script call, and a peek is
one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from gateway.errors import QuotaExhausted, RateLimited
from gateway.quotas import QuotaManager, RateLimitState
from gateway.quotas_backend import NO_RATE_LIMIT, QuotaBackend
from gateway.quotas_redis import RedisQuotaBackend
from gateway.tenants import Quotas, Tenant
from tests.gateway.test_quotas import FakeClock, FakeLedger, tenant
from tests.gateway.test_quotas import clock as clock
from tests.gateway.test_quotas import ledger as ledger
from tests.gateway.test_quotas import new_backend as new_backend
from tests.gateway.test_quotas import new_redis_backend as new_redis_backend
from tests.gateway.test_quotas import quotas as quotas
from tests.redis_server import redis_server as redis_server
from tests.redis_server import redis_url as redis_url


def state(
    requests: tuple[int, int, float] | None, tokens: tuple[int, int, float] | None
) -> RateLimitState:
    """(limit, remaining, reset_s) of requests and of tokens; None: no such limit."""
    return RateLimitState(
        *((None, None, None) if requests is None else requests),
        *((None, None, None) if tokens is None else tokens),
    )


async def test_remaining_counts_down_and_resets_with_the_window(
    quotas: QuotaManager, clock: FakeClock
) -> None:
    acme = tenant(requests_per_minute=3, tokens_per_minute=1000)
    assert await quotas.peek(acme) == state((3, 3, 0.0), (1000, 1000, 0.0))  # nothing yet
    first = await quotas.admit(acme, estimated_tokens=100)
    assert first.rate_limit == state((3, 2, 60.0), (1000, 900, 60.0))
    clock.now += 10
    second = await quotas.admit(acme, estimated_tokens=200)
    assert second.rate_limit == state((3, 1, 60.0), (1000, 700, 60.0))
    clock.now += 5
    # The reset counts down from the newest admission; settling gives back the difference.
    quotas.settle(first, actual_tokens=40)
    assert await quotas.peek(acme) == state((3, 1, 55.0), (1000, 760, 55.0))
    third = await quotas.admit(acme, estimated_tokens=60)
    assert third.rate_limit == state((3, 0, 60.0), (1000, 700, 60.0))
    clock.now += 30
    error = await refused(quotas, acme)
    assert error.rate_limit == state((3, 0, 30.0), (1000, 700, 30.0))
    # The first admission (t = 0) has left the window at t = 60; the last (t = 15) at t = 75.
    clock.now += 15
    assert await quotas.peek(acme) == state((3, 1, 15.0), (1000, 740, 15.0))
    clock.now += 15
    assert await quotas.peek(acme) == state((3, 3, 0.0), (1000, 1000, 0.0))
    quotas.settle(second, actual_tokens=200)
    quotas.settle(third, actual_tokens=60)
    assert await quotas.peek(acme) == state((3, 3, 0.0), (1000, 1000, 0.0))


async def test_peek_reserves_nothing(quotas: QuotaManager, clock: FakeClock) -> None:
    acme = tenant(requests_per_minute=5, tokens_per_minute=1000, max_concurrent_requests=1)
    await quotas.admit(acme, estimated_tokens=100)
    for _ in range(3):
        assert await quotas.peek(acme) == state((5, 4, 60.0), (1000, 900, 60.0))
    snapshot = await quotas.snapshot("t-1")
    assert (snapshot.concurrent, snapshot.requests_last_minute) == (1, 1)
    assert await quotas.peek(tenant()) == NO_RATE_LIMIT  # no limits at all
    # The same tenant's window under a lower limit than it holds: remaining is never below 0.
    lowered = tenant(tokens_per_minute=10)
    assert await quotas.peek(lowered, key_id="k", key_quotas=Quotas()) == state(None, (10, 0, 60.0))
    snapshot = await quotas.snapshot("t-1")
    assert (snapshot.concurrent, snapshot.requests_last_minute) == (1, 1)
    assert (await quotas.snapshot("t-1", key_id="k")).requests_last_minute == 0


async def refused(quotas: QuotaManager, who: Tenant, estimated_tokens: int = 10) -> RateLimited:
    with pytest.raises(RateLimited) as caught:
        await quotas.admit(who, estimated_tokens=estimated_tokens)
    return caught.value


async def test_refusals_carry_the_state_and_demotions_never_go_below_zero(
    new_backend: Callable[[], QuotaBackend], ledger: FakeLedger, clock: FakeClock
) -> None:
    quotas = QuotaManager(ledger, new_backend())
    await quotas.start()
    acme = tenant(tokens_per_minute=100, token_budget=100)
    await quotas.admit(acme, estimated_tokens=80)
    error = await refused(quotas, acme, 30)
    assert type(error) is RateLimited
    assert error.rate_limit == state(None, (100, 20, 60.0))  # nothing reserved by the refusal
    clock.now += 60  # the window is empty again; the budget is not
    exhausted = await refused(quotas, acme, 30)
    assert type(exhausted) is QuotaExhausted
    assert exhausted.rate_limit == state(None, (100, 100, 0.0))
    demoted = await quotas.admit(tenant("demote", tokens_per_minute=100), estimated_tokens=500)
    assert demoted.demoted
    assert demoted.rate_limit == state(None, (100, 0, 60.0))


async def test_the_tightest_scope_wins_each_header(quotas: QuotaManager, clock: FakeClock) -> None:
    """Requests: the key's limit is the tightest; tokens: the model's. Then the tenant's own
    window fills from other keys until it is the tightest for requests."""
    acme = tenant(requests_per_minute=10, tokens_per_minute=10_000)
    model = Quotas(requests_per_minute=8, tokens_per_minute=500)
    key = Quotas(requests_per_minute=3, tokens_per_minute=5000)

    async def admit(key_id: str, tokens: int) -> RateLimitState:
        admission = await quotas.admit(
            acme,
            estimated_tokens=tokens,
            model_id="big",
            model_quotas=model,
            key_id=key_id,
            key_quotas=key,
            key_label=key_id,
        )
        return admission.rate_limit

    assert await admit("k-1", 100) == state((3, 2, 60.0), (500, 400, 60.0))
    clock.now += 1
    for key_id in ["k-2", "k-3", "k-4", "k-5"]:
        await admit(key_id, 10)
    # Left after this one: k-1 1, the model 2 (8 - 6), the tenant 4: k-1 wins the requests.
    assert await admit("k-1", 10) == state((3, 1, 60.0), (500, 350, 60.0))
    for key_id in ["k-2", "k-3"]:
        await admit(key_id, 10)
    # The model's window is full (8 of 8; the tenant has 2 left, k-5 2): it wins, and refuses.
    clock.now += 1
    with pytest.raises(RateLimited) as caught:
        await admit("k-5", 10)
    assert caught.value.message == "rate limit reached: requests_per_minute of model 'big' is 8"
    assert caught.value.rate_limit == state((8, 0, 59.0), (500, 330, 59.0))
    # Without the model's scope, a key whose token limit is below the tenant's wins the tokens.
    tight = await quotas.peek(acme, key_id="k-9", key_quotas=Quotas(tokens_per_minute=50))
    assert tight == state((10, 2, 59.0), (50, 50, 0.0))


# --- Redis: one round trip ---------------------------------------------------------------------


async def script_calls(client: Redis) -> int:
    """The scripts Redis has been asked to run (a script cannot run another)."""
    stats = await client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha")
    )


async def test_admission_and_peek_are_one_script_call_each(
    new_redis_backend: Callable[..., RedisQuotaBackend],
    ledger: FakeLedger,
    redis_url: str,
) -> None:
    quotas = QuotaManager(ledger, new_redis_backend())
    await quotas.start()
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        acme = tenant(requests_per_minute=10, tokens_per_minute=1000)
        key = Quotas(requests_per_minute=5)
        for _ in range(2):  # the first call of each script loads it
            await quotas.admit(acme, estimated_tokens=10, key_id="k", key_quotas=key)
            await quotas.peek(acme, key_id="k", key_quotas=key)
        before = await script_calls(client)
        admission = await quotas.admit(acme, estimated_tokens=10, key_id="k", key_quotas=key)
        assert await script_calls(client) == before + 1
        assert admission.rate_limit.remaining_requests == 2
        assert (await quotas.peek(acme, key_id="k", key_quotas=key)).remaining_requests == 2
        assert await script_calls(client) == before + 2
    finally:
        await client.aclose()
