"""``gateway.admin_fairness``: the receipts' window and each policy's bound, from the workers a
real registry knows (the route itself: ``test_fairness_receipts_e2e.py``)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from gateway.admin_fairness import gap_bound, parse_window, window_pattern
from gateway.config import SchedulerSection
from gateway.errors import ClientError
from gateway.model_costs import CostBook
from gateway.workers import WorkerRegistry
from tests.gateway.scripted_transport import ScriptedTransport, ScriptedWorker
from tests.gateway.test_dispatch import make_ready

# make_ready's workers: context 4096, 1000 KV blocks of 16 tokens.
U = 1.0 * 4095 + 2.0 * 16_000


@pytest.fixture
async def registry() -> AsyncIterator[WorkerRegistry]:
    workers = WorkerRegistry(
        ["http://127.0.0.1:9/p0", "http://127.0.0.1:9/p1"], ["http://127.0.0.1:9/d"]
    )
    for handle, role in zip(workers.handles, ("prefill", "prefill", "decode"), strict=True):
        make_ready(handle, role)
        assert handle.info is not None
        workers.pools.admit(handle.info)
    try:
        yield workers
    finally:
        await workers.stop()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, 300.0), ("300s", 300.0), ("5m", 300.0), ("1h", 3600.0), ("3600s", 3600.0), ("1s", 1.0)],
)
def test_a_window_is_seconds_minutes_or_hours(text: str | None, seconds: float) -> None:
    assert parse_window(text, 3600.0) == seconds


@pytest.mark.parametrize(
    "text", ["61m", "3601s", "2h", "0s", "0300s", "5", "1.5m", "5 m", "1d", "-1h", "", "m", "5m\n"]
)
def test_any_other_window_is_a_400_naming_it(text: str) -> None:
    with pytest.raises(ClientError) as raised:
        parse_window(text, 3600.0)
    assert raised.value.status == 400
    assert raised.value.param == "window"


def test_the_documents_pattern_takes_exactly_the_windows_served() -> None:
    pattern = re.compile(window_pattern(600.0))
    for unit, unit_s in (("s", 1), ("m", 60), ("h", 3600)):
        for n in range(0, 700):
            is_served = 0 < n * unit_s <= 600
            assert (pattern.fullmatch(f"{n}{unit}") is not None) is is_served, (n, unit)
            if is_served:
                assert parse_window(f"{n}{unit}", 600.0) == n * unit_s


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("vtc", 2 * U),
        ("dlpm", 2 * (U + 4096)),
        ("d2lpm", 2 * 2 * (U + 4096)),  # two ready prefill workers
    ],
)
async def test_the_bound_takes_the_context_length_and_the_decode_kv_cache(
    registry: WorkerRegistry, policy: str, expected: float
) -> None:
    bound = gap_bound(policy, SchedulerSection(), registry, CostBook())
    assert bound.u_cost_units == U
    assert bound.between(1.0, 2.0) == expected
    assert "context length 4096 − 1" in bound.formula
    assert "16000 tokens" in bound.formula


async def test_a_models_cost_factor_scales_u(registry: WorkerRegistry) -> None:
    costs = CostBook()
    costs.set_admin("test-model", 2.0)
    bound = gap_bound("vtc", SchedulerSection(w_in=1.0, w_out=3.0), registry, costs)
    assert bound.u_cost_units == 2.0 * (4095 + 3.0 * 16_000)


@pytest.mark.parametrize("policy", ["fcfs", "rr_lpm"])
async def test_fcfs_and_rr_lpm_have_no_bound(registry: WorkerRegistry, policy: str) -> None:
    bound = gap_bound(policy, SchedulerSection(), registry, CostBook())
    assert bound.u_cost_units is None
    assert bound.between(1.0, 1.0) is None
    assert "promises no bound" in bound.formula


async def test_without_workers_the_bound_is_not_known() -> None:
    registry = WorkerRegistry([], [])
    try:
        bound = gap_bound("dlpm", SchedulerSection(), registry, CostBook())
    finally:
        await registry.stop()
    assert bound.u_cost_units is None
    assert "not known yet" in bound.formula


async def test_d2lpm_over_colocated_workers_counts_them_as_its_w() -> None:
    """r2_d2lpm_w.py: with no prefill workers the colocated ones prefill (``Dispatcher``), and
    D²LPM keeps a deficit per each: |W| is the four of them, not one."""
    urls = [f"http://worker-{'x' * i}:8201" for i in range(1, 5)]  # ids differ by URL length
    workers = [ScriptedWorker(url, "m") for url in urls]
    registry = WorkerRegistry([], [], colocated_urls=urls, transport=ScriptedTransport(*workers))
    try:
        await registry.poll_once()
        assert len(registry.ready("colocated", "m")) == 4
        bound = gap_bound("d2lpm", SchedulerSection(), registry, CostBook())
    finally:
        await registry.stop()
    assert bound.num_workers == 4
    assert "|W| = 4 colocated workers" in bound.formula
    assert bound.u_cost_units is not None
    assert bound.between(1.0, 1.0) == 2 * 4 * (bound.u_cost_units + 4096)


@pytest.mark.parametrize(
    ("policy", "prompt"), [("vtc", "all prompt tokens"), ("dlpm", "prompt tokens its prefill")]
)
async def test_the_bound_names_the_service_it_bounds(
    registry: WorkerRegistry, policy: str, prompt: str
) -> None:
    bound = gap_bound(policy, SchedulerSection(), registry, CostBook())
    assert prompt in bound.measure
    assert bound.measure in bound.formula
