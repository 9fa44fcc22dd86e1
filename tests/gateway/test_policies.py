"""The fair policies (``scheduling.md`` §2-§5): decisions from queue and worker views, and the
fairness bounds over a crude deterministic backend (``_Backend``, below; the real simulator is
``bench.sim``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies import (
    POLICY_NAMES,
    D2lpmPolicy,
    DlpmPolicy,
    FcfsPolicy,
    RrLpmPolicy,
    VtcPolicy,
    make_policy,
)
from gateway.scheduler import (
    Decision,
    Placement,
    QueuedRequest,
    Rejection,
    SchedulingPolicy,
    Shed,
    TenantState,
    WorkerView,
)


def _settings(
    slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES, block_size: int = 16, **section: Any
) -> dict[str, Any]:
    """A policy's constructor arguments: the ``[scheduler]`` section with ``section`` set."""
    return {
        "settings": SchedulerSection(**section),
        "slo_classes": slo_classes,
        "block_size": block_size,
    }


ONE_CLASS = [SloClass("standard", rank=1, ttft_target_s=1e9)]
FAIR_POLICIES = ("vtc", "dlpm", "d2lpm")
_ids = itertools.count()


def _request(
    tenant_id: str,
    num_prompt_tokens: int = 100,
    *,
    arrival: float = 0.0,
    slo_class: str = "standard",
    weight: float = 1.0,
    prompt_token_ids: list[int] | None = None,
    max_tokens: int = 16,
    request_id: str | None = None,
    rank: int = 0,
) -> QueuedRequest:
    return QueuedRequest(
        request_id=request_id or f"{tenant_id}-{next(_ids)}",
        tenant_id=tenant_id,
        slo_class=slo_class,
        weight=weight,
        arrival=arrival,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=max_tokens,
        prompt_token_ids=prompt_token_ids or [],
        cache_salt=tenant_id.encode(),
        rank=rank,
    )


def _prefill(worker_id: str = "p0", inflight: int = 0, cap: int = 10**6) -> WorkerView:
    return WorkerView(worker_id, inflight_tokens=inflight, max_inflight_tokens=cap)


def _decode(worker_id: str = "d0", free: int = 10**9) -> WorkerView:
    return WorkerView(worker_id, free_kv_tokens=free)


def _placed(decisions: Sequence[Decision]) -> list[str]:
    return [d.request.request_id for d in decisions if isinstance(d, Placement)]


def _tenant(policy: SchedulingPolicy, tenant_id: str) -> TenantState:
    state = next(t for t in policy.tenants() if t.tenant_id == tenant_id)
    assert policy.counter(tenant_id) == state.counter  # the lookup the dispatcher makes
    return state


def _one_at_a_time(policy: SchedulingPolicy, now: float = 0.0) -> list[str]:
    """One schedule with room for exactly one request: one decode batch slot."""
    decode = WorkerView("d0", free_kv_tokens=10**9, free_slots=1)
    return _placed(policy.schedule([_prefill()], [decode], now))


# ---- a crude backend ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Job:
    request: QueuedRequest
    decode_id: str
    num_to_prefill: int
    num_cached: int
    num_output: int
    num_generated: int = 0


@dataclass
class _Backend:
    """Discrete steps of ``dt`` seconds: each prefill worker computes ``prefill_tokens_per_step``
    of its FIFO; each decoding request gets one token per step; decode KV is reserved for prompt
    plus output at placement. Tenants are kept backlogged with ``backlog`` queued requests
    each, made by ``make_request``. ``service`` is what each tenant received (``w_in`` per
    computed prompt token at placement, ``w_out`` per generated token), unweighted."""

    policy: SchedulingPolicy
    tenants: dict[str, float]  # tenant -> weight
    output_tokens: dict[str, int]
    prompt_tokens: dict[str, int]
    num_prefill: int = 1
    prefill_tokens_per_step: int = 256
    max_inflight_tokens: int = 512
    decode_kv_tokens: int = 4096
    backlog: int = 4
    dt: float = 0.01
    w_in: float = 1.0
    w_out: float = 2.0
    now: float = 0.0
    service: dict[str, float] = field(default_factory=dict)
    max_gap: float = 0.0
    _prefill_jobs: dict[str, list[_Job]] = field(default_factory=dict)
    _decoding: list[_Job] = field(default_factory=list)
    _reserved_kv: int = 0
    _queued: dict[str, int] = field(default_factory=dict)

    def run(self, num_steps: int) -> None:
        for _ in range(num_steps):
            self._top_up()
            self._place()
            self._prefill_step()
            self._decode_step()
            values = [self.service.get(t, 0.0) for t in self.tenants]
            self.max_gap = max(self.max_gap, max(values) - min(values))
            self.now += self.dt

    def _top_up(self) -> None:
        for tenant_id, weight in self.tenants.items():
            while self._queued.get(tenant_id, 0) < self.backlog:
                request = _request(
                    tenant_id,
                    self.prompt_tokens[tenant_id],
                    arrival=self.now,
                    weight=weight,
                    max_tokens=self.output_tokens[tenant_id],
                )
                self.policy.enqueue(request, self.now)
                self._queued[tenant_id] = self._queued.get(tenant_id, 0) + 1

    def _place(self) -> None:
        prefill = [
            WorkerView(
                f"p{i}",
                inflight_tokens=sum(j.num_to_prefill for j in self._prefill_jobs.get(f"p{i}", [])),
                max_inflight_tokens=self.max_inflight_tokens,
            )
            for i in range(self.num_prefill)
        ]
        decode = [WorkerView("d0", free_kv_tokens=self.decode_kv_tokens - self._reserved_kv)]
        for decision in self.policy.schedule(prefill, decode, self.now):
            assert isinstance(decision, Placement)
            request = decision.request
            self._queued[request.tenant_id] -= 1
            num_to_prefill = request.num_prompt_tokens - decision.num_cached_tokens
            self._add_service(request, self.w_in * num_to_prefill)
            job = _Job(
                request, decision.decode_worker_id, num_to_prefill, decision.num_cached_tokens,
                request.max_tokens,
            )  # fmt: skip
            assert decision.prefill_worker_id is not None
            self._prefill_jobs.setdefault(decision.prefill_worker_id, []).append(job)
            self._reserved_kv += request.num_prompt_tokens + request.max_tokens

    def _prefill_step(self) -> None:
        for jobs in self._prefill_jobs.values():
            budget = self.prefill_tokens_per_step
            while jobs and budget > 0:
                job = jobs[0]
                done = min(budget, job.num_to_prefill)
                job.num_to_prefill -= done
                budget -= done
                if job.num_to_prefill == 0:
                    jobs.pop(0)
                    self.policy.on_first_token(job.request, job.num_cached, self.now)
                    self._generate(job)
                    self._decoding.append(job)

    def _decode_step(self) -> None:
        for job in list(self._decoding):
            if job.num_generated >= job.num_output:
                self._decoding.remove(job)
                self.policy.on_finish(job.request, job.num_generated, self.now)
                self._reserved_kv -= job.request.num_prompt_tokens + job.request.max_tokens
            else:
                self._generate(job)

    def _generate(self, job: _Job) -> None:
        job.num_generated += 1
        self.policy.on_tokens(job.request, 1, self.now)
        self._add_service(job.request, self.w_out)

    def _add_service(self, request: QueuedRequest, cost: float) -> None:
        self.service[request.tenant_id] = self.service.get(request.tenant_id, 0.0) + cost


# ---- make_policy -------------------------------------------------------------------------------


def test_make_policy_builds_each_policy_and_names_the_known_ones_otherwise() -> None:
    kinds = {
        "fcfs": FcfsPolicy,
        "vtc": VtcPolicy,
        "dlpm": DlpmPolicy,
        "d2lpm": D2lpmPolicy,
        "rr_lpm": RrLpmPolicy,
    }
    for name in POLICY_NAMES:
        policy = make_policy(name, **_settings())
        assert isinstance(policy, kinds[name]) and policy.name == name
    with pytest.raises(ValueError, match="known: fcfs, vtc, dlpm, d2lpm, rr_lpm"):
        make_policy("lottery")


# ---- VTC ---------------------------------------------------------------------------------------


def test_vtc_serves_the_tenant_with_the_least_counter() -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS))
    policy.enqueue(_request("a", 500, request_id="a1"), 0.0)
    policy.enqueue(_request("a", 500, request_id="a2"), 0.0)
    policy.enqueue(_request("b", 100, request_id="b1"), 0.0)
    policy.enqueue(_request("b", 100, request_id="b2"), 0.0)
    order = [id_ for _ in range(4) for id_ in _one_at_a_time(policy)]
    # a1 first (tie, earlier head), then b until b's counter passes a's 500.
    assert order == ["a1", "b1", "b2", "a2"]


def test_vtc_lifts_a_joining_tenant_to_the_least_backlogged_counter() -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS))
    for _ in range(3):
        policy.enqueue(_request("a", 100), 0.0)
    for _ in range(2):
        assert len(_one_at_a_time(policy)) == 1
    assert _tenant(policy, "a").counter == 200
    policy.enqueue(_request("b", 10), 1.0)  # b was never seen: lifted to a's 200, not 0
    assert _tenant(policy, "b").counter == 200


def test_vtc_lifts_to_the_last_leaver_when_every_queue_is_empty() -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS))
    a1 = _request("a", 300, request_id="a1")
    c1 = _request("c", 50, request_id="c1")
    policy.enqueue(a1, 0.0)
    policy.enqueue(c1, 0.0)
    assert _one_at_a_time(policy) == ["a1"]  # the tie goes to the first tenant name
    assert _one_at_a_time(policy) == ["c1"]  # every queue is empty now; c left last
    policy.on_tokens(a1, 10, 1.0)  # a: 320
    policy.on_tokens(c1, 5, 1.0)  # c: 60, after it left (its current counter is the lift)
    policy.enqueue(_request("b", 10), 2.0)
    assert _tenant(policy, "b").counter == 60  # not the least (0) nor a's 320


def test_vtc_a_returning_tenant_keeps_a_counter_above_the_lift() -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS))
    policy.enqueue(_request("a", 1000), 0.0)
    assert len(_one_at_a_time(policy)) == 1
    policy.enqueue(_request("b", 10), 1.0)  # all queues empty: b lifted to a's 1000
    policy.enqueue(_request("a", 10), 1.0)  # a rejoins above nothing lower: keeps 1000
    assert _tenant(policy, "a").counter == 1000 and _tenant(policy, "b").counter == 1000


@pytest.mark.parametrize("name", FAIR_POLICIES)
def test_two_backlogged_tenants_stay_within_the_bound_where_fcfs_does_not(name: str) -> None:
    # a's requests cost 4x b's: FCFS serves requests alike, so a's service runs away.
    prompt_tokens, output_tokens = {"a": 200, "b": 50}, {"a": 100, "b": 25}
    settings = _settings(slo_classes=ONE_CLASS, quantum_tokens=4096)
    decode_kv_tokens = 1200
    u = 1.0 * 200 + 2.0 * decode_kv_tokens  # U = w_in L_input + w_out M
    # VTC: 2U (§2); DLPM: 2 (U + Q_u) (§3); D²LPM with one worker is DLPM.
    bound = 2 * u if name == "vtc" else 2 * (u + settings["settings"].quantum_tokens)
    gaps = {}
    for policy_name in (name, "fcfs"):
        policy = make_policy(policy_name, **settings)
        # Queues deeper than a quantum's worth: a tenant whose queue empties leaves the
        # backlog, and DLPM rightly resets its deficit when it returns.
        backend = _Backend(
            policy,
            {"a": 1.0, "b": 1.0},
            output_tokens,
            prompt_tokens,
            decode_kv_tokens=decode_kv_tokens,
            backlog=32,
        )
        backend.run(3000)
        gaps[policy_name] = backend.max_gap
    assert gaps[name] <= bound < gaps["fcfs"]


@pytest.mark.parametrize("name", ["vtc", "dlpm"])
def test_passing_a_request_that_does_not_fit_is_bounded_or_small_requests_take_every_gap(
    name: str,
) -> None:
    # The prefill cap is the bottleneck: b's short prompts fit whenever a little room frees,
    # a's long ones only once a worker has drained.
    prompt_tokens, output_tokens = {"a": 200, "b": 50}, {"a": 100, "b": 25}
    gaps = {}
    # DLPM's deficits alone already stop b once its credit is spent: only VTC without a limit.
    for max_borrow_tokens in (4096.0, float("inf")) if name == "vtc" else (4096.0,):
        settings = _settings(slo_classes=ONE_CLASS, max_borrow_tokens=max_borrow_tokens)
        backend = _Backend(
            make_policy(name, **settings),
            {"a": 1.0, "b": 1.0},
            num_prefill=2,
            prefill_tokens_per_step=64,
            max_inflight_tokens=256,
            backlog=32,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
        )
        backend.run(3000)
        gaps[max_borrow_tokens] = backend.max_gap
    u = 1.0 * 200 + 2.0 * 4096  # M: the backend's decode KV
    bound = (2 * u if name == "vtc" else 2 * (u + 4096)) + 4096
    assert gaps[4096.0] <= bound
    if name == "vtc":
        assert gaps[float("inf")] > 5 * bound


@pytest.mark.parametrize("max_borrow_tokens", [250.0, float("inf")])
def test_vtc_lets_others_pass_a_head_that_does_not_fit_up_to_the_borrow_limit(
    max_borrow_tokens: float,
) -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS, max_borrow_tokens=max_borrow_tokens))
    policy.enqueue(_request("a", 100), 0.0)
    assert len(_one_at_a_time(policy)) == 1  # in flight: room will come back
    policy.enqueue(_request("a", 5000, request_id="a-big"), 1.0)
    for _ in range(5):
        policy.enqueue(_request("b", 100), 1.0)  # b: lifted to a's 100
    busy = [_prefill(inflight=100, cap=1000)]
    placed = _placed(policy.schedule(busy, [_decode()], 1.0))
    # b may get 250 ahead of a's 100: at 100, 200 and 300 it goes, at 400 it waits.
    assert len(placed) == (3 if max_borrow_tokens == 250.0 else 5)
    assert "a-big" not in placed


def test_a_waiting_higher_class_request_keeps_the_room_unless_nothing_is_in_flight() -> None:
    policy = VtcPolicy(**_slo_settings())
    policy.enqueue(_request("a", 5000, slo_class="interactive", request_id="big"), 0.0)
    policy.enqueue(_request("b", 100, slo_class="standard", request_id="small"), 0.0)
    # Nothing of this policy's in flight (the 100 tokens are not its): holding back would idle.
    busy = _prefill(inflight=100, cap=1000)
    assert _placed(policy.schedule([busy], [_decode()], 0.1)) == ["small"]
    policy.enqueue(_request("b", 100, slo_class="standard", request_id="small-2"), 0.2)
    # An interactive prompt is in flight there too now: big cannot pass the cap, and small-2
    # waits behind it.
    full = _prefill(inflight=300, cap=1000)
    full.max_inflight_rank = 3
    assert policy.schedule([full], [_decode()], 0.2) == []
    placed = _placed(policy.schedule([_prefill()], [_decode()], 0.3))
    assert placed == ["big", "small-2"]


def test_a_higher_class_passes_the_cap_of_a_worker_running_only_lower_classes() -> None:
    """The worker runs the most important chunk first, so the cap (which keeps work queued in
    the gateway, in the policy's order) has nothing to protect from a request that outranks
    everything there; once one is in flight, its class obeys the cap again."""
    policy = VtcPolicy(**_slo_settings())
    for index in range(2):
        interactive = _request("i", 500, slo_class="interactive", request_id=f"i{index}", rank=3)
        policy.enqueue(interactive, 0.0)
    policy.enqueue(_request("b", 100, slo_class="standard", request_id="s", rank=2), 0.0)
    worker = _prefill(inflight=2000, cap=1000)
    worker.max_inflight_rank = 1  # batch prompts
    assert _placed(policy.schedule([worker], [_decode()], 0.1)) == ["i0"]
    assert worker.max_inflight_rank == 3
    assert _placed(policy.schedule([worker], [_decode()], 0.2)) == []


# ---- weighted shares ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*FAIR_POLICIES, "rr_lpm"])
def test_weights_1_2_3_4_get_service_shares_within_10_percent(name: str) -> None:
    weights = {"t1": 1.0, "t2": 2.0, "t3": 3.0, "t4": 4.0}
    policy = make_policy(name, **_settings(slo_classes=ONE_CLASS, quantum_tokens=1024))
    backend = _Backend(
        policy,
        weights,
        prompt_tokens=dict.fromkeys(weights, 100),
        output_tokens=dict.fromkeys(weights, 50),
        num_prefill=2,
        backlog=32,  # deeper than a quantum's worth: a queue that empties resets a deficit
    )
    backend.run(3000)
    total = sum(backend.service.values())
    errors = [
        abs(backend.service[t] / total - weight / 10.0) / (weight / 10.0)
        for t, weight in weights.items()
    ]
    if name == "rr_lpm":  # the unweighted baseline: the check can fail
        assert max(errors) > 0.1
    else:
        assert max(errors) <= 0.1, (name, backend.service)


def test_a_weight_change_applies_to_later_charges() -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS))
    first = _request("a", 100)
    policy.enqueue(first, 0.0)
    assert len(_one_at_a_time(policy)) == 1
    policy.update_tenant("a", 4.0)
    policy.on_tokens(first, 10, 0.0)
    assert _tenant(policy, "a").counter == 100 + 2 * 10 / 4


# ---- charges -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAIR_POLICIES)
def test_on_finish_charges_only_the_unreported_tokens_once(name: str) -> None:
    policy = make_policy(name, **_settings(slo_classes=ONE_CLASS))
    request = _request("a", 100)
    policy.enqueue(request, 0.0)
    assert len(_one_at_a_time(policy)) == 1
    policy.on_first_token(request, 0, 0.1)
    policy.on_tokens(request, 3, 0.1)
    policy.on_tokens(request, 2, 0.2)
    policy.on_finish(request, 10, 0.3)  # 5 were never reported
    assert _tenant(policy, "a").counter == 100 + 2 * 10
    policy.on_finish(request, 10, 0.4)  # a second finish, late tokens: nothing more
    policy.on_tokens(request, 5, 0.4)
    assert _tenant(policy, "a").counter == 100 + 2 * 10


def test_on_finish_with_fewer_tokens_than_reported_refunds_nothing() -> None:
    policy = VtcPolicy(**_settings(slo_classes=ONE_CLASS))
    request = _request("a", 100)
    policy.enqueue(request, 0.0)
    assert len(_one_at_a_time(policy)) == 1
    policy.on_tokens(request, 5, 0.1)
    policy.on_finish(request, 3, 0.2)
    assert _tenant(policy, "a").counter == 100 + 2 * 5


@pytest.mark.parametrize("name", [*FAIR_POLICIES, "rr_lpm"])
def test_a_requeued_request_goes_ahead_and_is_not_charged_twice(name: str) -> None:
    policy = make_policy(name, **_settings(slo_classes=ONE_CLASS))
    first = _request("a", 100, arrival=0.0)
    policy.enqueue(first, 0.0)
    assert _one_at_a_time(policy) == [first.request_id]
    counter = _tenant(policy, "a").counter
    later = _request("a", 100, arrival=1.0)
    policy.enqueue(later, 1.0)
    policy.on_finish(first, 0, 1.5)  # could not start: the gateway ends it, then requeues
    policy.requeue(first, 1.5)
    assert _one_at_a_time(policy, now=2.0) == [first.request_id]
    assert _tenant(policy, "a").counter == counter


@pytest.mark.parametrize("name", [*FAIR_POLICIES, "rr_lpm"])
def test_remove_returns_the_request_and_forgets_it(name: str) -> None:
    policy = make_policy(name, **_settings(slo_classes=ONE_CLASS))
    request = _request("a")
    policy.enqueue(request, 0.0)
    assert policy.remove(request.request_id) is request
    assert policy.remove(request.request_id) is None
    assert policy.queued() == 0
    assert _one_at_a_time(policy) == []


# ---- DLPM --------------------------------------------------------------------------------------


def test_dlpm_refills_only_when_no_queued_tenant_has_credit() -> None:
    policy = DlpmPolicy(**_settings(slo_classes=ONE_CLASS, quantum_tokens=100))
    for i in range(4):
        policy.enqueue(_request("a", 60, arrival=i, request_id=f"a{i}"), float(i))
    for i in range(3):
        policy.enqueue(_request("b", 60, arrival=10 + i, request_id=f"b{i}"), 10.0 + i)
    order = []
    deficits = []
    for _ in range(5):
        order += _one_at_a_time(policy, now=20.0)
        deficits.append((_tenant(policy, "a").deficit, _tenant(policy, "b").deficit))
    # Each dispatch charges its 60 prompt tokens and its 16 output tokens in advance (92).
    # a0 triggers the first refill (nobody had credit): a=100, b=100; a spends to -84 after a1.
    # a2 is then held back because b still has credit: no refill until b has spent it too.
    assert order == ["a0", "a1", "b0", "b1", "a2"]
    assert deficits == [(8, 100), (-84, 100), (-84, 8), (-84, -84), (-76, 16)]


def test_dlpm_prepays_the_output_and_refunds_what_was_not_generated() -> None:
    policy = DlpmPolicy(**_settings(slo_classes=ONE_CLASS, quantum_tokens=1000))
    request = _request("a", 60, max_tokens=16)
    policy.enqueue(request, 0.0)
    assert _one_at_a_time(policy) == [request.request_id]
    assert _tenant(policy, "a").deficit == 1000 - 60 - 2 * 16
    policy.on_first_token(request, 0, 1.0)
    policy.on_tokens(request, 5, 1.0)  # prepaid: no more charge
    assert _tenant(policy, "a").deficit == 1000 - 92
    keep = _request("a", 10, max_tokens=1)  # keeps the tenant active to read its deficit
    policy.enqueue(keep, 1.0)
    policy.on_finish(request, 5, 2.0)  # 11 tokens not generated: refunded
    assert _tenant(policy, "a").deficit == 1000 - 60 - 2 * 5


def test_dlpm_serves_the_longest_prefix_match_first() -> None:
    policy = DlpmPolicy(**_settings(slo_classes=ONE_CLASS, block_size=4))
    document = list(range(64))
    warm = _request("a", 68, prompt_token_ids=[*document, 1, 2, 3, 4], arrival=0.0)
    policy.enqueue(warm, 0.0)
    assert _one_at_a_time(policy) == [warm.request_id]
    cold = _request("a", 20, prompt_token_ids=list(range(500, 520)), arrival=1.0)
    hot = _request("a", 68, prompt_token_ids=[*document, 9, 9, 9, 9], arrival=2.0)
    policy.enqueue(cold, 1.0)
    policy.enqueue(hot, 2.0)
    one_slot = WorkerView("d0", free_kv_tokens=10**9, free_slots=1)
    decisions = policy.schedule([_prefill(cap=1)], [one_slot], 3.0)
    assert _placed(decisions) == [hot.request_id]
    assert isinstance(decisions[0], Placement) and decisions[0].num_cached_tokens == 64


def test_dlpm_is_work_conserving_when_the_tenant_with_credit_cannot_be_placed() -> None:
    policy = DlpmPolicy(**_settings(slo_classes=ONE_CLASS, quantum_tokens=100))
    policy.enqueue(_request("a", 60, arrival=0.0, request_id="a0"), 0.0)
    policy.enqueue(_request("b", 60, arrival=1.0, request_id="b0"), 1.0)
    policy.enqueue(_request("a", 60, arrival=2.0, request_id="a1"), 2.0)
    policy.enqueue(_request("b", 5000, arrival=3.0, request_id="b-big"), 3.0)
    assert [_one_at_a_time(policy)[0] for _ in range(3)] == ["a0", "b0", "a1"]
    # a is out of credit (-20), b has 40 left, but b's request does not fit next to 60 tokens.
    assert policy.schedule([_prefill(inflight=60, cap=1000)], [_decode()], 4.0) == []
    policy.enqueue(_request("a", 60, arrival=5.0, request_id="a2"), 5.0)
    placed = _placed(policy.schedule([_prefill(inflight=60, cap=1000)], [_decode()], 5.0))
    assert placed == ["a2"]


@pytest.mark.parametrize("name", ["dlpm", "d2lpm"])
def test_credit_held_only_in_flight_holds_the_others_back_by_a_bounded_debt(name: str) -> None:
    # b's last request outlives its clients (a cancelled request still ending on a worker):
    # b keeps its credit, nothing of b's is queued, and a alone is served meanwhile. Then b
    # comes back. a's debt for the time it was served alone must stay within the borrowing
    # limit: before the bound, a went 200 requests into debt and b was served alone for all
    # of them after its return (the lift rule's failure on the real stack, 46x).
    policy = make_policy(
        name, **_settings(slo_classes=ONE_CLASS, quantum_tokens=1000, max_borrow_tokens=1000)
    )
    lingering = _request("b", 60, request_id="b-lingering")
    policy.enqueue(lingering, 0.0)
    assert _one_at_a_time(policy) == ["b-lingering"]  # b: 1000 - 92 of credit, kept
    queued = [_request("a", 60, request_id="a0")]  # one queued throughout: a stays active
    policy.enqueue(queued[0], 0.0)
    for i in range(1, 201):
        queued.append(_request("a", 60, request_id=f"a{i}"))
        policy.enqueue(queued[-1], float(i))
        request = queued.pop(0)
        assert _one_at_a_time(policy, now=float(i)) == [request.request_id]
        policy.on_first_token(request, 0, float(i))
        policy.on_finish(request, 16, float(i))
    for i in range(30):  # both backlogged throughout the 30 placements
        policy.enqueue(_request("a", 60, request_id=f"a-back{i}"), 300.0)
        policy.enqueue(_request("b", 60, request_id=f"b-back{i}"), 300.0)
    order = [_one_at_a_time(policy, now=300.0)[0][0] for _ in range(30)]
    # b's credit (908) and a's debt (at most the limit and one request, 1092) are worth 22
    # requests of 92: b's head start is at most that, then they alternate.
    assert order.count("a") >= (30 - 22) // 2, order


# ---- D²LPM -------------------------------------------------------------------------------------


def _shared_prefix(tenant_id: str, n: int) -> QueuedRequest:
    document = list(range(1024))
    return _request(tenant_id, 1040, prompt_token_ids=[*document, *range(n, n + 16)])


def test_d2lpm_sticks_to_the_worker_holding_the_prefix_until_its_quantum_runs_out() -> None:
    policy = D2lpmPolicy(
        **_settings(slo_classes=ONE_CLASS, worker_quantum_tokens=1100, quantum_tokens=10**9)
    )
    for n in range(8):  # one more than is placed: the tenant stays backlogged throughout
        policy.enqueue(_shared_prefix("a", 10_000 + n), float(n))
    workers = []
    for _ in range(7):
        # Idle prefill workers, KV room for one request: only locality and the (tenant,
        # worker) deficit decide.
        decisions = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode(free=1041)], 7.0)
        (placement,) = decisions
        assert isinstance(placement, Placement)
        workers.append((placement.prefill_worker_id, placement.num_cached_tokens))
    # q[a][p0] = 1100 pays for the uncached tokens (§1) of one whole prompt (1040) and four
    # that hit (16 each); the 6th finds credit only at p1 (refilled with p0), where the prefix
    # is not yet: after that p1 holds it too.
    assert workers == [
        ("p0", 0), ("p0", 1024), ("p0", 1024), ("p0", 1024), ("p0", 1024), ("p1", 0), ("p1", 1024),
    ]  # fmt: skip


def test_d2lpm_router_deficits_restart_when_a_tenant_leaves_the_backlog() -> None:
    policy = D2lpmPolicy(
        **_settings(slo_classes=ONE_CLASS, worker_quantum_tokens=4096, quantum_tokens=10**9)
    )
    workers = []
    for n in range(6):  # each request is placed before the next arrives: never backlogged
        policy.enqueue(_shared_prefix("a", 10_000 + n), float(n))
        (placement,) = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], float(n))
        assert isinstance(placement, Placement)
        workers.append(placement.prefill_worker_id)
    # The debt at p0 does not follow it from one visit to the next: it keeps its locality.
    assert workers == ["p0"] * 6


def test_d2lpm_waits_for_the_worker_holding_the_prefix_rather_than_recompute_it() -> None:
    policy = D2lpmPolicy(**_settings(slo_classes=ONE_CLASS))
    policy.enqueue(_shared_prefix("a", 0), 0.0)
    (first,) = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 0.0)
    assert isinstance(first, Placement) and first.prefill_worker_id == "p0"
    policy.enqueue(_shared_prefix("a", 1), 1.0)
    policy.enqueue(_shared_prefix("a", 2), 1.0)  # backlogged: the router's deficits stay
    # p0 has no room, but it is no hot spot: 1040 tokens to compute, under the margin.
    full = [_prefill("p0", inflight=1040, cap=1040), _prefill("p1")]
    assert policy.schedule(full, [_decode()], 1.0) == []
    policy.on_first_token(first.request, 0, 1.5)
    room_for_one = [_decode(free=1041)]
    (second,) = policy.schedule([_prefill("p0"), _prefill("p1")], room_for_one, 2.0)
    assert isinstance(second, Placement)
    assert (second.prefill_worker_id, second.num_cached_tokens) == ("p0", 1024)


def test_d2lpm_routes_by_load_alone_on_a_hot_spot() -> None:
    settings = _settings(slo_classes=ONE_CLASS, hot_spot_ratio=1.5, hot_spot_margin_tokens=2048)
    policy = D2lpmPolicy(**settings)
    policy.enqueue(_shared_prefix("a", 0), 0.0)
    policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 0.0)  # p0 has the prefix
    placements = []
    for inflight in (1500, 5000):  # p0 busier by 1500 (under the margin), then by 5000
        policy.enqueue(_shared_prefix("a", inflight), 1.0)
        prefill = [_prefill("p0", inflight=inflight), _prefill("p1", inflight=0)]
        (placement,) = policy.schedule(prefill, [_decode()], 1.0)
        assert isinstance(placement, Placement)
        placements.append(placement.prefill_worker_id)
    assert placements == ["p0", "p1"]


def test_d2lpm_hot_spot_is_a_load_gap_larger_than_what_the_prefix_saves() -> None:
    # A busy worker holding the prefix is left for an idle one only when its extra load is
    # more than the margin plus the prefix the request would recompute elsewhere: a worker
    # busy with one long uncached prompt is not a hot spot for a request it holds 1024
    # tokens of (measured: without the prefix in the margin, prefix_heavy's hit rate fell
    # from 0.95 to 0.90 and its well-behaved tenants' p99 TTFT tripled).
    policy = D2lpmPolicy(**_settings(slo_classes=ONE_CLASS, hot_spot_margin_tokens=2048))
    policy.enqueue(_shared_prefix("a", 0), 0.0)
    (first,) = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 0.0)
    assert isinstance(first, Placement) and first.prefill_worker_id == "p0"
    policy.on_first_token(first.request, 0, 0.5)
    waiting = _shared_prefix("a", 1)
    policy.enqueue(waiting, 1.0)
    policy.enqueue(_shared_prefix("a", 2), 1.0)  # backlogged: the router's deficits stay
    # p0 is full with 2600 tokens to compute: over the margin (2048), under margin + 1024.
    busy = [_prefill("p0", inflight=2600, cap=2600), _prefill("p1")]
    assert policy.schedule(busy, [_decode()], 1.0) == []
    # With 3200 to compute it is a hot spot: p1 computes the prefix again rather than wait.
    hot = [_prefill("p0", inflight=3200, cap=3200), _prefill("p1")]
    placements = _placements(policy.schedule(hot, [_decode()], 1.5))
    assert placements[0] == (waiting.request_id, "p1", 0)


def test_d2lpm_load_counts_only_the_tokens_left_to_compute() -> None:
    # A margin small enough that the prompts' whole length would make p0 a hot spot: 2080
    # tokens in flight before the third placement, over 512 + the 1024 the prefix saves.
    policy = D2lpmPolicy(**_settings(slo_classes=ONE_CLASS, hot_spot_margin_tokens=512))
    policy.enqueue(_shared_prefix("a", 0), 0.0)
    (first,) = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 0.0)
    policy.on_first_token(first.request, 0, 0.5)
    for n in range(1, 4):
        policy.enqueue(_shared_prefix("a", n), 1.0)
    placements = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 1.0)
    # p0's prompts in flight hold 1024 cached tokens each: 32 tokens to compute before the
    # third is no hot spot.
    assert [
        (p.prefill_worker_id, p.num_cached_tokens) for p in placements if isinstance(p, Placement)
    ] == [("p0", 1024)] * 3


# ---- rr_lpm ------------------------------------------------------------------------------------


def _placements(decisions: Sequence[Decision]) -> list[tuple[str, str | None, int]]:
    return [
        (d.request.request_id, d.prefill_worker_id, d.num_cached_tokens)
        for d in decisions
        if isinstance(d, Placement)
    ]


def test_rr_lpm_serves_the_longest_match_first_whoever_sent_it_and_however_old_the_rest() -> None:
    policy = RrLpmPolicy(**_settings(slo_classes=ONE_CLASS, block_size=4))
    document = list(range(64))
    warm = _request("a", 68, prompt_token_ids=[*document, 1, 2, 3, 4], arrival=0.0)
    policy.enqueue(warm, 0.0)
    assert _one_at_a_time(policy) == [warm.request_id]
    older = _request("b", 68, prompt_token_ids=list(range(500, 568)), arrival=1.0)
    policy.enqueue(older, 1.0)
    hits = [
        _request("a", 68, prompt_token_ids=[*document, n, n, n, n], arrival=2.0 + n)
        for n in range(3)
    ]
    for hit in hits:
        policy.enqueue(hit, hit.arrival)
    # No fair turn for b: a's cached prompts all go first (round-robin over tenants would have
    # served b's older request second).
    placed = [_placements(policy.schedule([_prefill(cap=1)], [_decode()], 9.0)) for _ in range(4)]
    assert placed == [[(h.request_id, "p0", 64)] for h in hits] + [[(older.request_id, "p0", 0)]]


def test_rr_lpm_routes_round_robin_whatever_the_workers_hold() -> None:
    policy = RrLpmPolicy(**_settings(slo_classes=ONE_CLASS))
    requests = [_shared_prefix("a", 10_000 + n) for n in range(4)]
    for n, request in enumerate(requests):
        policy.enqueue(request, float(n))
    decisions = policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 4.0)
    # Alternately p0 and p1 (D²LPM would keep them on p0, which holds the document after the
    # first); each worker serves its own in LPM order, so its second request hits.
    a0, a1, a2, a3 = (r.request_id for r in requests)
    assert _placements(decisions) == [
        (a0, "p0", 0), (a2, "p0", 1024), (a1, "p1", 0), (a3, "p1", 1024),
    ]  # fmt: skip


def test_rr_lpm_a_request_waits_for_its_worker_even_when_another_has_room() -> None:
    policy = RrLpmPolicy(**_settings(slo_classes=ONE_CLASS))
    first = _request("a", 100, arrival=0.0)
    second = _request("a", 100, arrival=1.0)
    policy.enqueue(first, 0.0)
    policy.enqueue(second, 1.0)
    # p0 has room under its cap, but not for 100 tokens: first (routed there) waits; that it
    # did not fit p0 says nothing about p1, where second goes.
    busy = [_prefill("p0", inflight=100, cap=150), _prefill("p1")]
    assert _placements(policy.schedule(busy, [_decode()], 2.0)) == [(second.request_id, "p1", 0)]
    assert _placements(policy.schedule([_prefill("p0"), _prefill("p1")], [_decode()], 3.0)) == [
        (first.request_id, "p0", 0)
    ]


def test_rr_lpm_routes_again_the_requests_of_a_worker_that_went_away() -> None:
    policy = RrLpmPolicy(**_settings(slo_classes=ONE_CLASS))
    requests = [_request("a", 100, arrival=float(n)) for n in range(2)]
    for request in requests:
        policy.enqueue(request, request.arrival)
    full = [_prefill("p0", inflight=10, cap=10), _prefill("p1", inflight=10, cap=10)]
    assert policy.schedule(full, [_decode()], 2.0) == []  # routed: one to each
    decisions = policy.schedule([_prefill("p0")], [_decode()], 3.0)  # p1 is gone
    assert _placements(decisions) == [(r.request_id, "p0", 0) for r in requests]


@pytest.mark.parametrize("name", ["dlpm", "d2lpm", "rr_lpm"])
def test_the_prefix_index_is_per_tenant_and_corrected_by_evictions(name: str) -> None:
    policy = make_policy(name, **_settings(slo_classes=ONE_CLASS, block_size=16))
    prompt = list(range(200))
    first = _request("a", 200, prompt_token_ids=prompt)
    policy.enqueue(first, 0.0)
    policy.schedule([_prefill("p0")], [_decode()], 0.0)

    def cached(tenant_id: str) -> int:
        policy.enqueue(_request(tenant_id, 200, prompt_token_ids=prompt), 1.0)
        (placement,) = policy.schedule([_prefill("p0")], [_decode()], 1.0)
        assert isinstance(placement, Placement)
        return placement.num_cached_tokens

    assert cached("b") == 0  # the same prompt from another tenant: never a's blocks
    assert cached("a") == 192
    from engine.block_manager import block_hashes

    policy.on_evicted("p0", block_hashes(prompt, 16, b"a")[4:])
    assert cached("a") == 64


def test_colocated_workers_match_prefixes_by_decode_worker() -> None:
    policy = DlpmPolicy(**_settings(slo_classes=ONE_CLASS, block_size=16))
    prompt = list(range(100))
    policy.enqueue(_request("a", 100, prompt_token_ids=prompt), 0.0)
    (first,) = policy.schedule([], [_decode("c0", 10**6), _decode("c1", 10**6 + 1)], 0.0)
    policy.enqueue(_request("a", 100, prompt_token_ids=prompt), 1.0)
    # c0 has less free KV now, but it holds the prefix.
    (second,) = policy.schedule([], [_decode("c0", 10**6), _decode("c1", 10**6 + 1)], 1.0)
    assert isinstance(first, Placement) and isinstance(second, Placement)
    assert first.prefill_worker_id is None and first.decode_worker_id == "c1"
    assert (second.decode_worker_id, second.num_cached_tokens) == ("c1", 96)


# ---- SLO classes -------------------------------------------------------------------------------

CLASSES = [
    SloClass("interactive", rank=3, ttft_target_s=2.0, tpot_target_s=0.25),
    SloClass("standard", rank=2, ttft_target_s=10.0),
    SloClass("batch", rank=1, ttft_target_s=30.0, sheddable=True),
]


def _slo_settings() -> dict[str, Any]:
    return _settings(slo_classes=CLASSES, default_prefill_tok_s=1000.0)


@pytest.mark.parametrize("name", [*FAIR_POLICIES, "rr_lpm"])
def test_a_higher_class_is_served_first(name: str) -> None:
    policy = make_policy(name, **_slo_settings())
    policy.enqueue(_request("a", 100, slo_class="batch", request_id="low"), 0.0)
    policy.enqueue(_request("b", 100, slo_class="standard", request_id="mid"), 0.1)
    policy.enqueue(_request("a", 100, slo_class="interactive", request_id="high"), 0.2)
    policy.enqueue(_request("c", 100, slo_class="unknown", request_id="unknown"), 0.0)
    order = [id_ for _ in range(4) for id_ in _one_at_a_time(policy, now=0.3)]
    assert order[:3] == ["high", "mid", "low"]  # unknown: the lowest class, after "low"
    assert order[3] == "unknown"


@pytest.mark.parametrize("name", [*FAIR_POLICIES, "rr_lpm"])
def test_a_lower_class_request_at_risk_goes_first(name: str) -> None:
    policy = make_policy(name, **_slo_settings())
    standard = _request("b", 1000, slo_class="standard", arrival=0.0, request_id="standard")
    policy.enqueue(standard, 0.0)
    for _ in range(8):  # 8 s of interactive work at 1000 tokens/s
        policy.enqueue(_request("a", 1000, slo_class="interactive", arrival=0.5), 0.5)
    # At 1 s the standard one can wait (1 + 8 + 1 <= 10): interactive goes first.
    assert _one_at_a_time(policy, now=1.0) != ["standard"]
    # At 2.5 s: 2.5 + 7 + 1 > 10 but 2.5 + 1 <= 10: at risk, and still salvageable.
    assert _one_at_a_time(policy, now=2.5) == ["standard"]


def test_a_request_late_anyway_does_not_jump_the_queue() -> None:
    policy = VtcPolicy(**_slo_settings())
    policy.enqueue(_request("b", 1000, slo_class="standard", arrival=0.0, request_id="late"), 0.0)
    policy.enqueue(_request("a", 1000, slo_class="interactive", arrival=9.5), 9.5)
    assert _one_at_a_time(policy, now=9.5) != ["late"]  # 9.5 + 1 > 10 even if served now


def test_a_sheddable_request_that_cannot_make_its_deadline_is_shed_at_admission() -> None:
    policy = VtcPolicy(**_slo_settings())
    for _ in range(25):  # 25 s of queued work ahead at the default 1000 tokens/s
        policy.enqueue(_request("a", 1000, slo_class="interactive"), 0.0)
    policy.enqueue(_request("b", 1000, slo_class="batch", request_id="fits"), 0.0)  # 27 s
    with pytest.raises(Shed, match="batch"):
        policy.enqueue(_request("b", 5000, slo_class="batch"), 0.0)  # 26 + 5 > 30 s
    assert policy.queued() == 26


@pytest.mark.parametrize("name", [*FAIR_POLICIES, "rr_lpm"])
def test_a_queued_sheddable_request_is_rejected_once_it_cannot_make_it(name: str) -> None:
    policy = make_policy(name, **_slo_settings())
    policy.enqueue(_request("b", 2000, slo_class="batch", request_id="doomed"), 0.0)
    policy.enqueue(_request("a", 100, slo_class="interactive", request_id="busy"), 0.0)
    full = [_prefill(inflight=10, cap=10)]
    assert policy.schedule(full, [_decode()], 27.0) == []  # 27 + 2 <= 30: may still make it
    decisions = policy.schedule(full, [_decode()], 28.5)
    assert [(type(d), d.request.request_id) for d in decisions] == [(Rejection, "doomed")]
    assert policy.queued() == 1


def test_demoted_requests_are_served_in_the_lowest_class() -> None:
    policy = VtcPolicy(**_slo_settings())
    demoted = _request("a", 100, slo_class="interactive", request_id="demoted")
    demoted.demoted = True
    policy.enqueue(demoted, 0.0)
    policy.enqueue(_request("b", 100, slo_class="standard", request_id="standard"), 0.1)
    assert _one_at_a_time(policy, now=0.2) == ["standard"]


# ---- bounded state -----------------------------------------------------------------------------


def test_idle_tenants_are_forgotten_only_when_the_lift_would_restore_them() -> None:
    settings = _settings(slo_classes=ONE_CLASS, forget_idle_after_s=10.0)
    policy = VtcPolicy(**settings)

    def serve(tenant_id: str, num_prompt_tokens: int, now: float) -> None:
        request = _request(tenant_id, num_prompt_tokens)
        policy.enqueue(request, now)
        assert _one_at_a_time(policy, now) == [request.request_id]
        policy.on_finish(request, 0, now)

    heavy = _request("heavy", 1000)
    light = _request("light", 10)
    policy.enqueue(heavy, 0.0)
    policy.enqueue(light, 0.0)
    assert _one_at_a_time(policy) + _one_at_a_time(policy) == [
        heavy.request_id,
        light.request_id,
    ]
    policy.on_finish(heavy, 0, 1.0)
    policy.on_finish(light, 0, 1.0)
    policy.schedule([], [_decode()], 100.0)
    # light (10, the last to leave) is the lift itself: forgetting it changes nothing. heavy
    # (1000) is above it: forgotten, it would come back with credit it has used up.
    assert [t.tenant_id for t in policy.tenants()] == ["heavy"]
    serve("light", 10, 101.0)
    assert _tenant(policy, "light").counter == 20
    serve("heavy", 10, 102.0)
    assert _tenant(policy, "heavy").counter == 1010


@pytest.mark.parametrize("name", ["dlpm", "d2lpm", "rr_lpm"])
def test_requests_queued_before_the_workers_block_size_is_known_are_hashed_again(
    name: str,
) -> None:
    """The block size comes from the workers' info; a request queued before it was known is
    hashed again in the workers' blocks, so its prefix is found where they cached it."""
    policy = make_policy(name, **_settings(slo_classes=ONE_CLASS, block_size=16))
    document = list(range(64))
    warm = _request("a", 68, prompt_token_ids=[*document, 1, 2, 3, 4])
    hot = _request("a", 68, prompt_token_ids=[*document, 9, 9, 9, 9], arrival=1.0)
    policy.enqueue(warm, 0.0)
    policy.set_block_size(4)
    (first,) = policy.schedule([_prefill()], [_decode()], 0.0)
    assert isinstance(first, Placement) and first.request is warm
    policy.on_first_token(warm, 0, 0.5)
    policy.enqueue(hot, 1.0)
    (second,) = policy.schedule([_prefill()], [_decode()], 1.0)
    assert isinstance(second, Placement) and second.num_cached_tokens == 64
    with pytest.raises(ValueError, match="block size changed"):
        policy.set_block_size(16)


def test_d2lpm_a_worker_that_comes_up_between_refills_is_placed_on_not_a_key_error() -> None:
    # A prefill worker restarted under a new id, while the tenant still has router credit at
    # the others (so no refill adds it): every pass raised KeyError and nothing was placed
    # until the queue timed out (the soak bench, a prefill worker killed and restarted).
    policy = D2lpmPolicy(**_settings(slo_classes=ONE_CLASS))
    for n in range(3):
        policy.enqueue(_shared_prefix("a", n), 0.0)
    two = [_prefill("p0"), _prefill("p1")]
    assert len(_placed(policy.schedule(two, [_decode(free=1041)], 0.0))) == 1
    restarted = [_prefill("p0", inflight=10**6, cap=10**6), _prefill("p1-new")]
    placed = policy.schedule(restarted, [_decode(free=1041)], 1.0)
    assert [p.prefill_worker_id for p in placed if isinstance(p, Placement)] == ["p1-new"]


@pytest.mark.parametrize("name", ["dlpm", "d2lpm"])
def test_credit_held_in_flight_buys_a_bounded_lead_when_the_others_queue_is_empty_too(
    name: str,
) -> None:
    # As above, but when b comes back, all of a's requests are in flight (the workers took
    # everything it sent), and b's backlog arrives first: the lead is bounded against the
    # other active tenants, queued or not (a got 0 of 120 placements without that).
    policy = make_policy(
        name, **_settings(slo_classes=ONE_CLASS, quantum_tokens=1000, max_borrow_tokens=1000)
    )
    policy.enqueue(_request("b", 60, request_id="b-lingering"), 0.0)
    assert _one_at_a_time(policy) == ["b-lingering"]
    queued = [_request("a", 60, request_id="a0")]
    policy.enqueue(queued[0], 0.0)
    for i in range(1, 201):
        queued.append(_request("a", 60, request_id=f"a{i}"))
        policy.enqueue(queued[-1], float(i))
        request = queued.pop(0)
        assert _one_at_a_time(policy, now=float(i)) == [request.request_id]
        policy.on_first_token(request, 0, float(i))
        policy.on_finish(request, 16, float(i))
    assert _one_at_a_time(policy, now=299.0) == [queued[0].request_id]  # a: all in flight
    for i in range(120):
        policy.enqueue(_request("b", 60, request_id=f"b-back{i}"), 300.0)
        policy.enqueue(_request("a", 60, request_id=f"a-back{i}"), 300.0)
    order = [_one_at_a_time(policy, now=300.0)[0][0] for _ in range(120)]
    assert order.count("a") >= 30, "".join(order)
