"""Several models' pools behind one policy (``gateway.policies.per_model``): placement stays in
each model's pool, one model's full pool does not hold a tenant's requests for another, and
fairness is per tenant across models, in the models' cost units."""

from __future__ import annotations

import itertools

import pytest

from gateway.config import SchedulerSection, SloClass
from gateway.policies import POLICY_NAMES, make_per_model_policy
from gateway.policies.per_model import PerModelPolicy
from gateway.scheduler import Placement, QueuedRequest, WorkerView

ONE_CLASS = [SloClass("standard", rank=1, ttft_target_s=1e9)]
FAIR = ("vtc", "dlpm", "d2lpm")
_ids = itertools.count()


def _policy(name: str) -> PerModelPolicy:
    return make_per_model_policy(name, SchedulerSection(), ONE_CLASS, block_size=16)


def _request(
    tenant_id: str, model: str, *, cost_factor: float = 1.0, num_prompt_tokens: int = 100
) -> QueuedRequest:
    return QueuedRequest(
        request_id=f"{tenant_id}-{model}-{next(_ids)}",
        tenant_id=tenant_id,
        slo_class="standard",
        weight=1.0,
        arrival=0.0,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=10,
        cache_salt=tenant_id.encode(),
        model=model,
        cost_factor=cost_factor,
    )


def _pool(model: str, slots: int = 10**6) -> tuple[list[WorkerView], list[WorkerView]]:
    """A prefill and a decode worker of ``model`` with KV room for ``slots`` requests (of the
    100-token prompts here)."""
    return (
        [WorkerView(f"p-{model}", inflight_tokens=0, max_inflight_tokens=10**6)],
        [WorkerView(f"d-{model}", free_kv_tokens=slots * 150)],
    )


def _placed(policy: PerModelPolicy, model: str, slots: int = 10**6) -> list[Placement]:
    prefill, decode = _pool(model, slots)
    decisions = policy.schedule(prefill, decode, 0.0, model=model)
    return [d for d in decisions if isinstance(d, Placement)]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_request_is_placed_only_in_its_own_models_pool(name: str) -> None:
    policy = _policy(name)
    small, large = _request("x", "small"), _request("x", "large")
    policy.enqueue(small, 0.0)
    policy.enqueue(large, 0.0)
    placed = _placed(policy, "large")
    assert [p.request.request_id for p in placed] == [large.request_id]
    assert placed[0].prefill_worker_id == "p-large" and placed[0].decode_worker_id == "d-large"
    assert policy.queued() == 1
    assert [p.request.request_id for p in _placed(policy, "small")] == [small.request_id]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_full_pool_does_not_hold_a_tenants_requests_for_another_model(name: str) -> None:
    policy = _policy(name)
    policy.enqueue(_request("x", "large"), 0.0)  # x's oldest request: its pool is full
    policy.enqueue(_request("x", "small"), 0.0)
    assert _placed(policy, "large", slots=0) == []
    assert len(_placed(policy, "small")) == 1


@pytest.mark.parametrize("name", FAIR)
def test_a_tenant_served_on_two_models_gets_no_more_than_its_share_of_one(name: str) -> None:
    """x is backlogged on both models, y only on "a" (equal weights): on "a", y goes first
    until x's service on "b" is matched (VTC), or until x is no further ahead than the
    borrowing limit (DLPM, whose deficits are each pool's), so their service over both models
    evens out."""
    policy = _policy(name)
    served = {"x": 0.0, "y": 0.0}
    for _ in range(300):
        policy.enqueue(_request("x", "a"), 0.0)
        policy.enqueue(_request("x", "b"), 0.0)
        policy.enqueue(_request("y", "a"), 0.0)
    for _ in range(300):  # one request per pool per round, each finishing before the next
        for model in ("a", "b"):
            for placement in _placed(policy, model, slots=1):
                request = placement.request
                policy.on_first_token(request, 0, 0.0)
                policy.on_finish(request, 10, 0.0)
                served[request.tenant_id] += 100 + 2 * 10
    gap = served["x"] - served["y"]
    assert gap <= SchedulerSection().max_borrow_tokens + 2 * 120, served
    assert served["x"] / served["y"] <= 1.15, served  # (3.0 without the shared books)


@pytest.mark.parametrize("name", FAIR)
def test_a_pool_uses_its_room_while_a_tenant_ahead_elsewhere_waits(name: str) -> None:
    """x is backlogged on both models, y only on "a", and each pool has room for 5 requests a
    pass: x held back on "a" (ahead by its service on "b") must not keep y from filling "a".
    (DLPM placed 1.2 a pass there while x's unspendable credit held y's refill.)"""
    policy = _policy(name)
    for _ in range(2000):
        policy.enqueue(_request("x", "a"), 0.0)
        policy.enqueue(_request("x", "b"), 0.0)
        policy.enqueue(_request("y", "a"), 0.0)
    num_placed = {"a": 0, "b": 0}
    for _ in range(200):
        for model in ("a", "b"):
            for placement in _placed(policy, model, slots=4):
                request = placement.request
                policy.on_first_token(request, 0, 0.0)
                policy.on_finish(request, 10, 0.0)
                num_placed[model] += 1
    assert num_placed == {"a": 5 * 200, "b": 5 * 200}


@pytest.mark.parametrize("name", FAIR)
def test_a_newcomer_shares_a_pool_with_the_tenant_alone_there_at_once(name: str) -> None:
    """t1 alone on "a" (room for 5 a pass) and t2 alone on "b" (room for 2): t1's counter runs
    ahead of t2's on capacity nobody else wanted. t3 joining "a" is lifted to "a"'s least
    counter, not to the least of every pool (t2's), or it would take "a" over until it caught
    up (1225 requests to t1's 25 in 250 passes, before the fix)."""
    policy = _policy(name)
    for _ in range(3000):
        policy.enqueue(_request("t1", "a"), 0.0)
        policy.enqueue(_request("t2", "b"), 0.0)

    def one_pass(served: dict[str, int]) -> None:
        for model, slots in (("a", 4), ("b", 1)):
            for placement in _placed(policy, model, slots=slots):
                request = placement.request
                policy.on_first_token(request, 0, 0.0)
                policy.on_finish(request, 10, 0.0)
                served[request.tenant_id] = served.get(request.tenant_id, 0) + 1

    for _ in range(300):
        one_pass({})
    for _ in range(3000):
        policy.enqueue(_request("t3", "a"), 0.0)
    served: dict[str, int] = {}
    for _ in range(100):
        one_pass(served)
    assert served["t1"] + served["t3"] == 500
    assert 0.9 <= served["t3"] / served["t1"] <= 1.1, served


@pytest.mark.parametrize("name", FAIR)
def test_a_tenant_whose_queue_a_pool_emptied_is_not_lifted_to_one_ahead_elsewhere(
    name: str,
) -> None:
    """y, with requests in flight on "cheap", sends its next one after the pool took all it had
    queued; x is ahead by 7200 from its service on "big". y is lifted at most to within the
    borrowing limit of x, not to x's counter: that would release x on "cheap", where it is
    held back for its lead (the benchmark's DLPM Jain fell to 0.92 from it)."""
    policy = _policy(name)
    for _ in range(100):
        policy.enqueue(_request("x", "big"), 0.0)
        policy.enqueue(_request("x", "cheap"), 0.0)
    policy.enqueue(_request("y", "cheap"), 0.0)
    policy.enqueue(_request("y", "cheap"), 0.0)
    for _ in range(60):  # x: 60 requests of 120 units on "big"
        for placement in _placed(policy, "big", slots=1):
            policy.on_first_token(placement.request, 0, 0.0)
            policy.on_finish(placement.request, 10, 0.0)
    assert [p.request.tenant_id for p in _placed(policy, "cheap", slots=2)] == ["y", "y"]
    policy.enqueue(_request("y", "cheap"), 0.0)  # while its two run
    lead = policy.counter("x") - policy.counter("y")
    assert lead >= SchedulerSection().max_borrow_tokens, (policy.counter("x"), lead)


@pytest.mark.parametrize("name", FAIR)
def test_service_is_counted_in_the_models_cost_units(name: str) -> None:
    policy = _policy(name)
    request = _request("x", "large", cost_factor=4.0, num_prompt_tokens=100)
    policy.enqueue(request, 0.0)
    assert len(_placed(policy, "large")) == 1
    policy.on_first_token(request, 0, 0.0)
    policy.on_finish(request, 10, 0.0)
    policy.enqueue(_request("y", "small", num_prompt_tokens=100), 0.0)  # (a second model)
    _placed(policy, "small")
    assert policy.counter("x") == 4.0 * (1.0 * 100 + 2.0 * 10)  # w_in = 1, w_out = 2


@pytest.mark.parametrize("name", FAIR)
def test_a_tenant_moving_to_the_expensive_model_waits_for_the_cheap_ones_share(name: str) -> None:
    """Equal weights, one pool shared: x's requests cost 4 units a token, y's 1 (say, two
    versions of a model on the same workers): y gets about 4 requests for each of x's."""
    policy = _policy(name)
    counts = {"x": 0, "y": 0}
    for _ in range(400):
        policy.enqueue(_request("x", "m", cost_factor=4.0), 0.0)
        policy.enqueue(_request("y", "m", cost_factor=1.0), 0.0)
    for _ in range(400):
        for placement in _placed(policy, "m", slots=1):
            request = placement.request
            policy.on_first_token(request, 0, 0.0)
            policy.on_finish(request, 10, 0.0)
            counts[request.tenant_id] += 1
    assert 3.5 <= counts["y"] / counts["x"] <= 4.5, counts


def test_backlogs_report_each_models_queue() -> None:
    policy = _policy("vtc")
    policy.enqueue(_request("x", "a", num_prompt_tokens=300), 0.0)
    policy.enqueue(_request("y", "a", num_prompt_tokens=200), 0.0)
    policy.enqueue(_request("x", "b", num_prompt_tokens=50), 0.0)
    _placed(policy, "b", slots=0)  # (b's throughput: the pool's measured speed, none here)
    backlogs = {b.model: b for b in policy.backlogs()}
    assert (backlogs["a"].num_queued, backlogs["a"].num_queued_tokens) == (2, 500)
    assert (backlogs["b"].num_queued, backlogs["b"].num_queued_tokens) == (1, 50)
    default_tok_s = SchedulerSection().default_prefill_tok_s
    assert backlogs["a"].est_wait_s == pytest.approx(500 / default_tok_s)


@pytest.mark.parametrize("name", FAIR)
def test_service_deltas_name_their_model_and_reach_its_policy(name: str) -> None:
    """Across replicas: a delta carries its model in its gate, and the other replica's book
    counts it once however many models it serves."""
    a, b = _policy(name), _policy(name)
    a.take_service_deltas()
    b.take_service_deltas()
    for policy in (a, b):
        policy.enqueue(_request("x", "m1"), 0.0)
        policy.enqueue(_request("x", "m2"), 0.0)  # x known to both models' policies
    _placed(a, "m1")
    deltas = a.take_service_deltas()
    assert {gate.split("\t")[0] for _, gate, _ in deltas} == {"m1"}
    before = b.counter("x")
    b.apply_remote_service(deltas)
    assert b.counter("x") - before == pytest.approx(sum(deltas.values()))
