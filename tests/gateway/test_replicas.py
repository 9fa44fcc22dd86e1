"""Two gateway replicas on PostgreSQL and Redis, in front of one prefill and one decode worker
(tiny model), with haproxy spreading requests over them at random (``deploy.balancer``): what a
tenant gets must not depend on how many replicas there are.

- A tenant limited to 4 concurrent requests never has more than 4 running across both replicas
  (clients that keep retrying a refusal; what each client saw running, first chunk to last,
  lies within its request's admission, so their overlap is a lower bound the limit must hold).
- A tenant limited to 60 requests a minute gets exactly 60 admitted in a burst of 80.
- Tenants of weights 1, 2 and 4 get weight-normalised service with Jain's index ≥ 0.95, spread
  over both replicas; so do tenants of weights 1 and 4 each sending to one replica only.
- The usage ledger (one PostgreSQL for both) equals what the clients were told, exactly.
- A replica killed with SIGKILL: its clients get a connection error, not a hang; the other goes
  on serving; the reservations the dead one held expire with their lease (3 s here).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from bench.fairness_bench import weighted_fairness
from bench.tenant_load import StackAccess
from deploy.balancer import Balancer, start_balancer
from deploy.stack import Stack
from gateway.quotas_redis import DEFAULT_KEY_PREFIX
from tests.gateway.conftest import start_test_stack
from tests.postgres import PostgresServer
from tests.postgres import postgres_server as postgres_server
from tests.redis_server import RedisServer
from tests.redis_server import redis_server as redis_server

LEASE_S = 3.0
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    """The Redis database the replicas share."""
    return redis_server.fresh_database()


@pytest.fixture(scope="module")
def replicas(
    postgres_server: PostgresServer,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stack, Balancer]]:
    database = postgres_server.create_database()
    state_dir = tmp_path_factory.mktemp("replicas")
    env = {
        "FAIRGATE_STORE_URL": postgres_server.url(database),
        "FAIRGATE_REPLICAS_REDIS_URL": redis_url,
        "FAIRGATE_REPLICAS_RESERVATION_LEASE_S": str(LEASE_S),
    }
    stack = start_test_stack(
        state_dir / "state", engine="tiny", num_gateways=2, env=env, log_dir=state_dir / "logs"
    )
    try:
        balancer = start_balancer([gateway.http_url for gateway in stack.gateways])
        try:
            yield stack, balancer
        finally:
            balancer.stop()
    finally:
        stack.stop()


async def _tenant(
    base_url: str, stack: Stack, name: str, *, weight: float = 1.0, **quotas: Any
) -> str:
    """A tenant (with ``quotas``) and its key."""
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=admin, timeout=30.0) as client:
        body = {"name": name, "weight": weight, "quotas": quotas}
        created = await client.post("/admin/v1/tenants", json=body)
        assert created.status_code == 201, created.text
        key = await client.post(f"/admin/v1/tenants/{name}/keys", json={"name": "k"})
        secret: str = key.json()["secret"]
    return secret


def _body(index: int, *, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "tiny-random-llama",
        "prompt": [3 + (index * 7 + i) % 400 for i in range(24)],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def _tenant_id(base_url: str, stack: Stack, name: str) -> str:
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=admin, timeout=30.0) as client:
        answer = await client.get(f"/admin/v1/tenants/{name}")
        answer.raise_for_status()
        tenant_id: str = answer.json()["tenant_id"]
    return tenant_id


async def _ledger(base_url: str, stack: Stack, tenant: str) -> tuple[int, int, int]:
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=admin, timeout=30.0) as client:
        rows = (await client.get(f"/admin/v1/tenants/{tenant}/usage")).json()["data"]
    return (
        sum(r["requests"] for r in rows),
        sum(r["prompt_tokens"] for r in rows),
        sum(r["completion_tokens"] for r in rows),
    )


async def test_a_concurrency_limit_holds_across_both_replicas(
    replicas: tuple[Stack, Balancer], redis_url: str
) -> None:
    """Both replicas' admissions share one count of the tenant's running requests: watched
    where it is kept (the tenant's leases in Redis, one per request from admission to its
    settle, after its last byte went out), it never goes over the limit and reaches it. (The
    clients' own view cannot tell: under load a client reads a stream's end later than a
    request admitted after it begins, so their intervals overlap more than the requests'.)"""
    stack, balancer = replicas
    key = await _tenant(balancer.url, stack, "four-at-once", max_concurrent_requests=4)
    tenant_id = await _tenant_id(balancer.url, stack, "four-at-once")
    leases = f"{DEFAULT_KEY_PREFIX}{{{tenant_id}}}:leases"
    num_served = 0
    usages: list[dict[str, int]] = []
    num_refused = 0
    deadline = time.monotonic() + 8.0
    peak = 0
    clients_done = asyncio.Event()

    async def watch_leases() -> None:
        nonlocal peak
        redis = Redis.from_url(redis_url)
        try:
            while not clients_done.is_set():
                peak = max(peak, await redis.zcard(leases))
                await asyncio.sleep(0.002)
        finally:
            await redis.aclose()

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal num_refused, num_served
        for attempt in itertools.count():
            if time.monotonic() > deadline:
                return
            body = _body(index * 1000 + attempt, stream=True)
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code == 429:
                    num_refused += 1
                    await response.aread()
                    await asyncio.sleep(0.02)
                    continue
                assert response.status_code == 200, await response.aread()
                num_events = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    num_events += 1
                    event = json.loads(line.removeprefix("data: "))
                    if event.get("usage"):
                        usages.append(event["usage"])
                assert num_events > 0
                num_served += 1

    headers = {"authorization": f"Bearer {key}"}
    watcher = asyncio.create_task(watch_leases())
    try:
        async with httpx.AsyncClient(
            base_url=balancer.url, headers=headers, timeout=60.0
        ) as client:
            await asyncio.gather(*(client_loop(i, client) for i in range(12)))
    finally:
        clients_done.set()
        await watcher
    print(
        f"\nconcurrency 4 over 2 replicas: peak {peak}, {num_served} served, {num_refused} refused"
    )
    assert peak <= 4 and num_served >= 8 and num_refused > 0
    assert peak == 4  # the limit is reached, not merely respected by a trickle
    told = (
        len(usages),
        sum(u["prompt_tokens"] for u in usages),
        sum(u["completion_tokens"] for u in usages),
    )
    # Each replica writes its usage in batches (every 0.5 s): until both have, the ledger is
    # short; never over.
    deadline = time.monotonic() + 10.0
    while (ledger := await _ledger(balancer.url, stack, "four-at-once")) != told:
        assert all(a <= b for a, b in zip(ledger, told, strict=True)), (ledger, told)
        assert time.monotonic() < deadline, (ledger, told)
        await asyncio.sleep(0.2)


async def test_a_rate_limit_admits_exactly_its_rate_across_both_replicas(
    replicas: tuple[Stack, Balancer],
) -> None:
    stack, balancer = replicas
    key = await _tenant(balancer.url, stack, "sixty-a-minute", requests_per_minute=60)
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=balancer.url, headers=headers, timeout=60.0) as client:
        bodies = [_body(i) | {"max_tokens": 2} for i in range(80)]
        answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    statuses = [a.status_code for a in answers]
    print(f"\nrpm 60 over 2 replicas: {statuses.count(200)} of 80 admitted")
    assert statuses.count(200) == 60 and statuses.count(429) == 20, statuses


async def test_weights_hold_across_both_replicas(replicas: tuple[Stack, Balancer]) -> None:
    stack, balancer = replicas
    measured = await weighted_fairness(StackAccess(balancer.url, stack.admin_token), window_s=20.0)
    print(f"\nweighted fairness over 2 replicas: {measured}")
    assert measured["jain"] >= 0.95, measured


async def test_weights_hold_with_each_tenant_on_its_own_replica(
    replicas: tuple[Stack, Balancer],
) -> None:
    """Clients whose keep-alive connections stay on one replica (balancing per connection, as a
    Kubernetes Service does): each replica's policy sees only its own tenants, and the weights
    hold only through the service the replicas share (``gateway.policies.service_book``):
    weight 1 on one replica, 4 on the other (each replica taking what it can of the workers
    would serve them alike: normalised 4 : 1, Jain 0.74)."""
    stack, _ = replicas
    measured = await weighted_fairness(
        StackAccess(stack.gateways[1].http_url, stack.admin_token),
        weights=(1.0, 4.0),
        window_s=20.0,
        prefix="pinned",
        pin_to=[gateway.http_url for gateway in stack.gateways],
    )
    print(f"\nweighted fairness, each tenant on one replica: {measured}")
    assert measured["jain"] >= 0.95, measured


async def test_a_replica_killed_leaves_the_other_serving_and_its_reservations_expire(
    replicas: tuple[Stack, Balancer], tmp_path: Path
) -> None:
    stack, balancer = replicas
    key = await _tenant(balancer.url, stack, "orphaned", max_concurrent_requests=2)
    headers = {"authorization": f"Bearer {key}"}
    doomed, survivor = stack.gateways[1], stack.gateways[0]
    long_body = _body(0, stream=True) | {"max_tokens": 2000}  # (the context is 2048)
    started = asyncio.Event()
    num_started = 0

    async def held_on_doomed() -> BaseException | None:
        nonlocal num_started
        async with httpx.AsyncClient(
            base_url=doomed.http_url, headers=headers, timeout=30.0
        ) as client:
            try:
                async with client.stream("POST", "/v1/completions", json=long_body) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        num_started += 1
                        if num_started >= 2 * 3:
                            started.set()
            except httpx.HTTPError as exc:
                return exc
        return None

    holders = [asyncio.create_task(held_on_doomed()) for _ in range(2)]
    await asyncio.wait_for(started.wait(), 60.0)
    async with httpx.AsyncClient(
        base_url=survivor.http_url, headers=headers, timeout=30.0
    ) as client:
        refused = await client.post("/v1/completions", json=_body(1) | {"max_tokens": 2})
        assert refused.status_code == 429  # both slots are held on the other replica
        doomed.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*holders), 10.0)
        assert all(isinstance(outcome, httpx.HTTPError) for outcome in outcomes), outcomes
        while True:
            answer = await client.post("/v1/completions", json=_body(2) | {"max_tokens": 2})
            if answer.status_code == 200:
                break
            assert answer.status_code == 429, answer.text
            assert time.monotonic() - killed_at < LEASE_S + 2.0, "the dead replica's slots stayed"
            await asyncio.sleep(0.1)
    freed_after_s = time.monotonic() - killed_at
    print(f"\nkill -9 of a replica: its 2 reservations freed after {freed_after_s:.2f} s")
    async with httpx.AsyncClient(base_url=balancer.url, headers=headers, timeout=30.0) as client:
        for index in range(6):  # the balancer has taken the dead replica out
            answer = await client.post(
                "/v1/completions", json=_body(10 + index) | {"max_tokens": 2}
            )
            assert answer.status_code == 200, answer.text
