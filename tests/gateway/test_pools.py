"""Model pools (``gateway.pools`` through ``WorkerRegistry``, and the dispatcher's passes per
model): workers of two models make two pools, a worker unlike its model's pool is incompatible,
a pool stays known with its workers dead, and a request is only ever placed on a prefill and a
decode worker of its own model, even when a prefill worker of one model and a decode worker of
another are the only ones of their roles."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest

from gateway.dispatch import NO_WORKER_GRACE_S, Dispatcher
from gateway.errors import NoWorkerAvailable
from gateway.ledger import WorkerPair
from gateway.policies import POLICY_NAMES, make_per_model_policy, make_policy
from gateway.scheduler import QueuedRequest
from gateway.worker_transport import WorkerCalls
from gateway.workers import WorkerRegistry
from transfer.errors import WorkerUnreachable
from transfer.messages import KvLayoutInfo, TokenizerSpec, WorkerInfo, WorkerLoad, WorkerRole

BLOCK_SIZE = 16


def layout(model_id: str, dtype: str = "float32") -> KvLayoutInfo:
    return KvLayoutInfo(model_id, "gloo", dtype, BLOCK_SIZE, 30, 3, 64)


class CannedWorker:
    """A worker that answers its polls with ``info`` and a ready load with room."""

    def __init__(self, info: WorkerInfo) -> None:
        self.info_answer = info

    async def load(
        self, *, timeout_s: float | None = None, evictions_since: int | None = None
    ) -> WorkerLoad:
        info = self.info_answer
        return WorkerLoad(
            info.worker_id, info.role, True, num_free_blocks=1000, num_total_blocks=1000
        )

    async def info(self) -> WorkerInfo:
        return self.info_answer

    async def tokenizer(self, *, timeout_s: float | None = None) -> TokenizerSpec:
        raise WorkerUnreachable("not asked in these tests")


class CannedTransport:
    def __init__(self) -> None:
        self.workers: dict[str, CannedWorker] = {}

    def add(self, url: str, info: WorkerInfo) -> None:
        self.workers[url] = CannedWorker(info)

    def connect(self, url: str, role: WorkerRole) -> WorkerCalls:
        return self.workers[url]

    async def aclose(self) -> None:
        pass


def info(
    worker_id: str,
    role: WorkerRole,
    model_id: str,
    *,
    dtype: str = "float32",
    digest: str = "tok-a",
    block_size: int = BLOCK_SIZE,
    max_model_len: int = 2048,
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        instance_id="i1",
        role=role,
        model_id=model_id,
        block_size=block_size,
        num_total_blocks=1000,
        max_model_len=max_model_len,
        vocab_size=49152,
        tokenizer_digest=digest,
        kv_layout=msgspec.structs.replace(layout(model_id, dtype), block_size=block_size),
    )


def url(worker_id: str) -> str:
    return f"http://127.0.0.1:9/{worker_id}"


@contextlib.asynccontextmanager
async def started(*infos: WorkerInfo) -> AsyncIterator[WorkerRegistry]:
    """A registry of these workers, polled once (not started: no background polls)."""
    transport = CannedTransport()
    for worker in infos:
        transport.add(url(worker.worker_id), worker)
    by_role: dict[str, list[str]] = {"prefill": [], "decode": [], "colocated": []}
    for worker in infos:
        by_role[worker.role].append(url(worker.worker_id))
    registry = WorkerRegistry(
        by_role["prefill"], by_role["decode"], by_role["colocated"], transport=transport
    )
    await registry.poll_once()
    try:
        yield registry
    finally:
        await registry.stop()


async def test_two_models_make_two_pools_each_with_its_own_workers() -> None:
    async with started(
        info("pa", "prefill", "small"),
        info("da", "decode", "small"),
        info("pb", "prefill", "large", digest="tok-b", max_model_len=8192),
        info("db", "decode", "large", digest="tok-b", max_model_len=8192),
    ) as registry:
        assert registry.model_ids() == ["small", "large"]
        assert [h.state for h in registry.handles] == ["ready"] * 4
        assert registry.can_serve("small") and registry.can_serve("large")
        assert [h.worker_id for h in registry.ready("prefill", "large")] == ["pb"]
        assert [h.worker_id for h in registry.ready("decode", "small")] == ["da"]
        assert (registry.max_model_len("small"), registry.max_model_len("large")) == (2048, 8192)


@pytest.mark.parametrize(
    ("odd_one", "named"),
    [
        (info("d2", "decode", "small", dtype="bfloat16"), "dtype"),
        (info("d2", "decode", "small", digest="tok-other"), "tokenizer"),
        (info("d2", "decode", "large", block_size=32), "blocks of 32 tokens"),
    ],
)
async def test_a_worker_unlike_its_pool_is_incompatible_and_says_why(
    odd_one: WorkerInfo, named: str
) -> None:
    async with started(
        info("p1", "prefill", "small"), info("d1", "decode", "small"), odd_one
    ) as registry:
        odd = registry.handles[-1]
        assert odd.state == "incompatible"
        assert odd.last_error is not None and named in odd.last_error
        assert [h.state for h in registry.handles[:2]] == ["ready", "ready"]


async def test_a_prefill_of_one_model_and_a_decode_of_another_serve_neither() -> None:
    async with started(info("pa", "prefill", "small"), info("db", "decode", "large")) as registry:
        assert [h.state for h in registry.handles] == ["ready", "ready"]
        assert not registry.can_serve("small") and not registry.can_serve("large")
        assert not registry.can_serve()


async def test_a_pool_whose_workers_died_stays_known() -> None:
    async with started(info("c1", "colocated", "small")) as registry:
        [handle] = registry.handles
        registry.mark_dead(handle, WorkerUnreachable("gone"))
        assert registry.model_ids() == ["small"] and not registry.can_serve("small")
        assert registry.max_model_len("small") == 0
        assert registry.pools.get("small") is not None


def queued(request_id: str, model: str) -> QueuedRequest:
    return QueuedRequest(
        request_id=request_id,
        tenant_id="t",
        slo_class="standard",
        weight=1.0,
        arrival=0.0,
        num_prompt_tokens=32,
        max_tokens=8,
        model=model,
    )


@pytest.mark.parametrize("policy_name", POLICY_NAMES)
async def test_no_cross_model_pairing_and_an_unservable_pool_fails_only_its_own_requests(
    policy_name: str,
) -> None:
    """Ready: small's prefill worker, large's prefill and decode workers. A request for small
    has a prefill worker and a decode worker (large's), but never gets that pair: it ends with
    503 no_worker after the grace, while large's request is placed on large's two workers."""
    async with started(
        info("pa", "prefill", "small"),
        info("pb", "prefill", "large"),
        info("db", "decode", "large"),
    ) as registry:
        dispatcher = Dispatcher(make_per_model_policy(policy_name), registry)
        registry.on_change = dispatcher.wake
        small = asyncio.create_task(dispatcher.submit(dispatcher.open(queued("s", "small"))))
        large = asyncio.create_task(dispatcher.submit(dispatcher.open(queued("l", "large"))))
        pair: WorkerPair = await asyncio.wait_for(large, 5.0)
        assert pair.prefill is not None
        assert (pair.prefill.worker_id, pair.decode.worker_id) == ("pb", "db")
        with pytest.raises(NoWorkerAvailable, match="model 'small'"):
            await asyncio.wait_for(small, NO_WORKER_GRACE_S + 5.0)


async def test_a_policy_of_one_pool_given_two_models_requests_pairs_none_across() -> None:
    """The dispatcher's second line: a policy that is not per model (one queue for every model)
    decides on a request of one model in another model's pass; the dispatcher refuses that
    decision rather than pair the request with the other model's workers."""
    async with started(info("cb", "colocated", "large")) as registry:
        dispatcher = Dispatcher(make_policy("fcfs"), registry)
        registry.on_change = dispatcher.wake
        small = asyncio.create_task(dispatcher.submit(dispatcher.open(queued("s", "small"))))
        large = asyncio.create_task(dispatcher.submit(dispatcher.open(queued("l", "large"))))
        with pytest.raises(NoWorkerAvailable, match="model 'small'"):
            await asyncio.wait_for(small, 5.0)
        pair: WorkerPair = await asyncio.wait_for(large, 5.0)
        assert pair.decode.worker_id == "cb"


async def test_colocated_workers_of_one_model_may_differ_in_kv_layout() -> None:
    """They never exchange KV (a CPU one and a GPU one, say); a decode worker pairs with the
    pool's prefill workers, so its layout must match theirs."""
    async with started(
        info("c1", "colocated", "small"),
        info("c2", "colocated", "small", dtype="bfloat16"),
        info("p1", "prefill", "small", dtype="bfloat16"),
        info("d1", "decode", "small"),
    ) as registry:
        states = {h.url.rsplit("/", 1)[1]: h.state for h in registry.handles}
        assert states == {"c1": "ready", "c2": "ready", "p1": "ready", "d1": "incompatible"}
        [decode] = [h for h in registry.handles if h.role == "decode"]
        assert "dtype" in (decode.last_error or "")
