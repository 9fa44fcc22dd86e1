"""FCFS and least-loaded placement: pure decisions from queue and worker views."""

from __future__ import annotations

from gateway.policies import FcfsPolicy
from gateway.scheduler import QueuedRequest, WorkerView, place


def _request(
    request_id: str, num_prompt_tokens: int = 100, *, demoted: bool = False
) -> QueuedRequest:
    return QueuedRequest(
        request_id=request_id,
        tenant_id="t",
        slo_class="standard",
        weight=1.0,
        arrival=0.0,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=16,
        demoted=demoted,
    )


def _prefill(worker_id: str, inflight: int = 0, cap: int = 1000) -> WorkerView:
    return WorkerView(worker_id, inflight_tokens=inflight, max_inflight_tokens=cap)


def _decode(worker_id: str, free: int) -> WorkerView:
    return WorkerView(worker_id, free_kv_tokens=free)


def test_place_picks_least_loaded_prefill_and_roomiest_decode() -> None:
    prefill = [_prefill("p0", inflight=500), _prefill("p1", inflight=100)]
    decode = [_decode("d0", 300), _decode("d1", 5000)]
    placement = place(_request("a"), prefill, decode)
    assert placement is not None
    assert (placement.prefill_worker_id, placement.decode_worker_id) == ("p1", "d1")
    assert prefill[1].inflight_tokens == 200  # the views are updated for the next decision
    assert decode[1].free_kv_tokens == 5000 - 101


def test_place_respects_the_prefill_cap_but_an_idle_worker_takes_any_prompt() -> None:
    assert place(_request("a", 600), [_prefill("p0", inflight=500)], [_decode("d", 10**6)]) is None
    placement = place(_request("b", 5000), [_prefill("p0", inflight=0)], [_decode("d", 10**6)])
    assert placement is not None and placement.prefill_worker_id == "p0"


def test_place_needs_kv_room_for_the_prompt() -> None:
    assert place(_request("a", 100), [_prefill("p")], [_decode("d", 100)]) is None
    assert place(_request("a", 100), [_prefill("p")], [_decode("d", 101)]) is not None


def test_place_counts_a_decode_worker_s_batch_slots() -> None:
    """A reservation takes a batch slot as much as it takes blocks: two slots left take two
    requests, however much KV is free."""
    decode = [WorkerView("d", free_kv_tokens=10**6, free_slots=2)]
    prefill = [_prefill("p", cap=10**6)]
    assert place(_request("a"), prefill, decode) is not None
    assert place(_request("b"), prefill, decode) is not None
    assert (decode[0].free_slots, decode[0].free_kv_tokens) == (0, 0)
    assert place(_request("c"), prefill, decode) is None


def test_colocated_placement_has_no_prefill_worker() -> None:
    placement = place(_request("a"), [], [_decode("c", 1000)])
    assert placement is not None
    assert placement.prefill_worker_id is None and placement.decode_worker_id == "c"


def test_fcfs_serves_in_arrival_order_and_the_head_blocks() -> None:
    policy = FcfsPolicy()
    for request_id, size in (("a", 100), ("b", 901), ("c", 10)):
        policy.enqueue(_request(request_id, size), now=0.0)
    placements = policy.schedule([_prefill("p", cap=1000)], [_decode("d", 10**6)], now=0.0)
    # a (100) fits, b (901) would exceed the cap with a in flight: c waits behind b.
    assert [p.request.request_id for p in placements] == ["a"]
    assert policy.queued() == 2
    # Once a's prefill is done (a fresh, idle view), b and c fit together.
    placements = policy.schedule([_prefill("p", cap=1000)], [_decode("d", 10**6)], now=1.0)
    assert [p.request.request_id for p in placements] == ["b", "c"]
    assert policy.queued() == 0


def test_fcfs_demoted_requests_wait_for_an_empty_queue() -> None:
    policy = FcfsPolicy()
    policy.enqueue(_request("low", demoted=True), now=0.0)
    policy.enqueue(_request("a"), now=1.0)
    policy.enqueue(_request("b"), now=2.0)
    placements = policy.schedule([_prefill("p", cap=10**6)], [_decode("d", 10**6)], now=3.0)
    assert [p.request.request_id for p in placements] == ["a", "b", "low"]


def test_fcfs_requeue_goes_to_the_head_and_remove_takes_out() -> None:
    policy = FcfsPolicy()
    policy.enqueue(_request("a"), now=0.0)
    policy.requeue(_request("first"), now=1.0)
    removed = policy.remove("a")
    assert removed is not None and removed.request_id == "a"
    assert policy.remove("a") is None
    placements = policy.schedule([_prefill("p")], [_decode("d", 10**6)], now=2.0)
    assert [p.request.request_id for p in placements] == ["first"]
    assert policy.queued() == 0
