"""``bench.fidelity_bench`` and the load it drives (``bench.tenant_load``), on what runs fast:
the service and share arithmetic, the simulator's side on a small trace, and a small trace
replayed on a real stack (null engine) at its arrival times, with the cluster read from the
workers. The long run (real stack with the tiny model against the simulator) is the benchmark's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from bench.fidelity_bench import (
    TINY_MODEL_PATH,
    cluster_of,
    max_share_diff_pp,
    replay_trace,
    service_shares,
    sim_completions,
)
from bench.latency_model import LatencyModel
from bench.sched_bench import run_policy
from bench.sim import ClusterSpec, TenantSpec, Trace, TraceRequest
from bench.tenant_load import Completion, StackAccess, jain_index, service_by_tenant
from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack
from transfer.messages import WorkerInfo


def _completion(
    tenant: str, finished_s: float, prompt: int, cached: int, output: int
) -> Completion:
    return Completion(tenant, 0.0, finished_s, prompt, cached, output)


def test_service_counts_uncached_prompt_and_twice_the_output_by_completion_time() -> None:
    completions = [
        _completion("a", 0.5, 40, 16, 32),  # before the window
        _completion("a", 1.0, 40, 16, 32),  # 24 + 64 = 88
        _completion("b", 1.5, 40, 0, 10),  # 40 + 20 = 60
        _completion("b", 2.0, 40, 0, 10),  # at the window's end: the next window's
    ]
    assert service_by_tenant(completions, 1.0, 2.0) == {"a": 88.0, "b": 60.0}
    normalized = service_by_tenant(completions, 1.0, 2.0, weights={"a": 2.0, "b": 1.0, "c": 4.0})
    assert normalized == {"a": 44.0, "b": 60.0, "c": 0.0}


def test_jain_index_is_one_when_equal_and_one_over_n_when_one_gets_all() -> None:
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    # the dlpm run: 138 : 133 : 160 requests for weights 1, 2, 4
    assert jain_index([138 / 1, 133 / 2, 160 / 4]) == pytest.approx(0.79, abs=0.01)
    with pytest.raises(ValueError):
        jain_index([0.0, 0.0])


def test_shares_and_their_largest_difference_in_points() -> None:
    shares = service_shares({"a": 30.0, "b": 10.0})
    assert shares == {"a": 0.75, "b": 0.25}
    assert service_shares({"a": 0.0}) == {"a": 0.0}
    assert max_share_diff_pp(shares, {"a": 0.70, "b": 0.30}) == pytest.approx(5.0)
    # a tenant one side never served counts as a share of 0 there
    assert max_share_diff_pp({"a": 0.9, "b": 0.1}, {"a": 1.0}) == pytest.approx(10.0)


def _small_trace() -> Trace:
    """Two tenants (weights 1 and 3), a request each every 0.25 s for 2 s, 32-token prompts;
    the trace lasts 3 s, so that every request has time to end on the null engine."""
    requests = [
        TraceRequest(
            f"{tenant}-{i}",
            tenant,
            "standard",
            0.25 * i + offset,
            [1000 + 37 * i + k for k in range(32)],
            8,
        )
        for tenant, offset in (("light", 0.0), ("heavy", 0.1))
        for i in range(8)
    ]
    requests.sort(key=lambda r: r.arrival)
    return Trace("small", [TenantSpec("light", 1.0), TenantSpec("heavy", 3.0)], requests, 3.0)


def test_the_simulators_completions_carry_its_records() -> None:
    trace = _small_trace()
    model = LatencyModel.load(TINY_MODEL_PATH)
    result, _ = run_policy("vtc", trace, ClusterSpec(num_decode_workers=1), model)
    completions = sim_completions(result)
    completed = [r for r in result.records if r.outcome == "completed"]
    assert len(completions) == len(completed) == len(trace.requests)  # a light load: all done
    for completion, record in zip(completions, completed, strict=True):
        assert completion.tenant == record.tenant_id
        assert completion.finished_s == record.finish_s
        assert completion.completion_tokens == record.num_output_tokens == 8
        assert completion.prompt_tokens == 32


@pytest.fixture(scope="module")
def null_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(tmp_path_factory.mktemp("replay"), num_prefill_workers=2)
    try:
        yield started
    finally:
        started.stop()


def test_the_cluster_is_read_from_the_workers(null_stack: Stack) -> None:
    cluster = cluster_of(null_stack)
    assert (cluster.num_prefill_workers, cluster.num_decode_workers) == (2, 1)
    decode = next(w for w in null_stack.workers if w.spec.role == "decode")
    info = msgspec.msgpack.decode(httpx.get(decode.http_url + "/v1/info").content, type=WorkerInfo)
    assert cluster.block_size == info.block_size
    assert cluster.decode_kv_tokens == info.num_total_blocks * info.block_size
    assert cluster.decode_max_seqs == info.max_num_seqs


def test_a_trace_is_replayed_at_its_arrival_times_with_its_tenants_and_prompts(
    null_stack: Stack,
) -> None:
    trace = _small_trace()
    access = StackAccess(null_stack.base_url, null_stack.admin_token)
    run = asyncio.run(replay_trace(access, trace))
    assert run.refused == {"light": 0, "heavy": 0}
    assert len(run.completions) == len(trace.requests)
    sent = sorted(run.completions, key=lambda c: c.sent_s)
    for completion, request in zip(sent, trace.requests, strict=True):
        assert completion.tenant == request.tenant_id
        # open loop: sent at its arrival time (the loop's own timers, on a shared machine)
        assert request.arrival <= completion.sent_s < request.arrival + 0.2
        assert completion.prompt_tokens == len(request.prompt_token_ids)
        assert completion.completion_tokens == request.max_tokens
    admin = {"authorization": f"Bearer {null_stack.admin_token}"}
    for tenant in trace.tenants:
        answer = httpx.get(
            f"{null_stack.base_url}/admin/v1/tenants/{tenant.tenant_id}", headers=admin
        )
        assert answer.json()["weight"] == tenant.weight
