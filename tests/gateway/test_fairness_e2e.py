"""The fair policies keep their promises on the real stack: real worker processes (the tiny model,
two prefill workers and a decode worker), the gateway, tenants created with weights through the
admin API, and clients sending chat completions over plain HTTP (``bench.fairness_bench``, which
``fairgate``'s benchmark runs for longer).

- Backlogged tenants of weights 1, 2 and 4, each with the same number of requests in flight,
  get weight-normalised service (uncached prompt + 2 × completion tokens, over the weight) with
  Jain's index ≥ 0.97. Equal numbers in flight make a policy that ignores weights fail: one
  that serves each tenant the same requests gives 0.78 (the issue measured 0.80 under dlpm).
- The lift rule: a tenant that left (its clients gone for 8 s) and comes back gets no more
  than its share. Over 6 s from 2 s after its return, its normalised service is at most
  1.25 × the steady tenant's (equal weights, both able to fill the workers alone). Without the
  rule its counter would be 8 s of the whole capacity behind, and it would be served alone
  until it caught up, through the whole window: the steady tenant would get only what it
  already held on the workers (with VTC's lift taken out: 74×, one steady request served in
  the window). The 25% covers
  what is not the policy: service is attributed to completion times (a window counts the head
  start of the requests in flight at its start, a few requests' worth against the hundreds it
  holds), and the 2 s the window waits lets the returning tenant's first requests through the
  decode slots the steady tenant held. Nor may it come back starved (at least half the steady
  tenant's service), which a policy that charged it for its idle time would do.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.fairness_bench import FAIRNESS_ENV, fairness_gateway_args, lift_rule, weighted_fairness
from bench.tenant_load import StackAccess
from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack

MIN_JAIN = 0.97
# The deficit policies' bound on the service gap is in quanta (DLPM 2 (U + Q), D²LPM
# 2 |W| (U + Q) with |W| = 2 prefill workers here), not relative: the window must hold enough
# rounds of Q = 4096 for the bound to be small against what each tenant gets in it. 24 s holds
# about ten rounds for D²LPM on two cores (12 s gave Jain 0.967 for it, 0.990 for DLPM).
WEIGHTED_WINDOW_S = 24.0
LIFT_TOLERANCE = 0.25
MIN_RETURN_SHARE = 0.5  # of the steady tenant's normalised service


@pytest.fixture(scope="module", params=["vtc", "dlpm", "d2lpm"])
def fair_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stack]]:
    """(policy, its stack)."""
    policy = request.param
    state_dir = tmp_path_factory.mktemp(f"fairness-{policy}")
    started = start_test_stack(
        state_dir,
        engine="tiny",
        num_prefill_workers=2,
        gateway_args=fairness_gateway_args(state_dir, policy),
        env=FAIRNESS_ENV,
    )
    try:
        yield policy, started
    finally:
        started.stop()


def _access(stack: Stack) -> StackAccess:
    return StackAccess(stack.base_url, stack.admin_token)


async def test_backlogged_tenants_are_served_in_proportion_to_their_weights(
    fair_stack: tuple[str, Stack],
) -> None:
    policy, stack = fair_stack
    measured = await weighted_fairness(_access(stack), window_s=WEIGHTED_WINDOW_S)
    print(f"{policy}: weighted fairness: {measured}")
    served = measured["completed"]
    assert all(count > 0 for count in served.values()), measured
    assert measured["jain"] >= MIN_JAIN, measured


async def test_a_tenant_back_from_idle_gets_no_more_than_its_share(
    fair_stack: tuple[str, Stack],
) -> None:
    policy, stack = fair_stack
    measured = await lift_rule(_access(stack))
    print(f"{policy}: lift rule: {measured}")
    service = measured["normalized_service_after_return"]
    steady, onoff = service[measured["steady"]], service[measured["onoff"]]
    assert steady > 0, measured
    assert onoff <= (1 + LIFT_TOLERANCE) * steady, measured
    assert onoff >= MIN_RETURN_SHARE * steady, measured
