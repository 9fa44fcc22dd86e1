"""Weighted fairness and the lift rule on the real stack (tiny model): the measurements behind
``tests/gateway/test_fairness_e2e.py``, runnable for longer as a benchmark
(``run_fairness_bench``).

- ``weighted_fairness``: tenants of unequal weights (1, 2, 4 by default), each keeping the same
  number of chat requests in flight (a closed loop), more than the workers admit at once, so
  that the gateway's queue, and with it the policy, decides who is served. After a warm-up, each
  tenant's service over a window (``bench.tenant_load``: uncached prompt + 2 × completion
  tokens, attributed to completion times), divided by its weight, and Jain's index of those.
  Equal numbers in flight make an order-blind scheduler show: FCFS would serve each tenant about
  the same number of requests, Jain ≈ 0.78 of weight-normalised service for weights 1, 2, 4.
- ``lift_rule``: two tenants of equal weight, both backlogged; one stops sending for
  ``off_s`` and comes back. Its service in the ``window_s`` after its return, against the steady
  one's. A policy that let an idle tenant bank the service it did not use would serve the
  returning tenant alone until its counter caught up: about as long as it was idle, the whole
  window (``window_s`` ≤ the time it is idle).

Both report each tenant's ``fairgate_queue_depth`` sampled over the window: a tenant with an
empty queue in the gateway is not competing there (see ``bench.tenant_load``).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from bench.report import log, print_result
from bench.tenant_load import (
    LoadRun,
    StackAccess,
    TenantLoad,
    jain_index,
    run_closed_loop,
    sample_queue_depths,
    service_by_tenant,
)
from deploy.stack import Stack, StackConfig, start_stack
from gateway.config import DEFAULT_SLO_CLASSES

__all__ = [
    "FAIRNESS_ENV",
    "fairness_gateway_args",
    "lift_rule",
    "run_fairness_bench",
    "start_fairness_stack",
    "weighted_fairness",
]

# The gateway's own overload guard (``gateway.overload``) refuses, while its event loop lags,
# the tenants holding more than their weighted share of the requests in the gateway. On a small
# machine shared by the load generator and the whole stack the loop lags from CPU contention
# alone, and those refusals would empty a tenant's queue: the figure would then measure the
# guard and the machine, not the policy's order. So the guard is off for these runs.
FAIRNESS_ENV = {"FAIRGATE_GATEWAY_MAX_LOOP_LAG_S": "10"}

# In flight per tenant: with three tenants, 144 requests against a decode worker that batches
# at most 64 (the engine's max_num_seqs) and prefill workers held to a few tenths of a second
# of work: every tenant keeps a queue in the gateway, even the weight-4 tenant served 4/7 of all.
CONCURRENCY = 48
# The lift rule needs each of its two tenants able to fill the workers alone (the decode
# worker's 64 sequences and what the prefill workers hold): then a returning tenant that banked
# its idle time would take every slot that frees until it had caught up, and the steady one
# would get only what it already held on the workers. With fewer in flight than the workers
# hold, neither tenant's order matters much, and the test could not tell.
LIFT_CONCURRENCY = 80
QUEUE_WAIT_S = 600.0  # see fairness_gateway_args
NUM_WORDS = 30  # about 40 prompt tokens with the chat template (16 of them cached: its prefix)
MAX_TOKENS = 32


def fairness_gateway_args(state_dir: Path, policy: str) -> list[str]:
    """The gateway's flags for these runs: ``policy``, and a configuration file (written to
    ``state_dir``) with the default SLO classes but for their queue-wait refusal, which waits
    ``QUEUE_WAIT_S``. The refusal (429 queue_full while a tenant's oldest request has waited
    longer than a quarter of its TTFT target, 2.5 s for ``standard``) is the gateway's
    admission control, not its order: on a busy 2-core machine the weight-1 tenant's fair share
    is slow enough that its requests wait longer than that, its new ones are refused, its queue
    runs dry, and it loses service the policy would have given it (vtc's Jain: 0.967 in a run
    with the refusal, 0.998 in the next without it, the weight-1 tenant refused 236 times)."""
    lines: list[str] = []
    for slo in DEFAULT_SLO_CLASSES:
        lines.append("[[slo_classes]]")
        fields = msgspec.to_builtins(msgspec.structs.replace(slo, max_queue_wait_s=QUEUE_WAIT_S))
        # JSON's strings, numbers and booleans are TOML's too
        lines += [
            f"{key} = {json.dumps(value)}" for key, value in fields.items() if value is not None
        ]
    path = state_dir / "fairness-gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return ["--log-level", "warning", "--policy", policy, "--config", str(path)]


def start_fairness_stack(state_dir: Path, policy: str, num_prefill_workers: int = 2) -> Stack:
    """The stack the measurements run on: tiny model, one decode worker, ``policy``."""
    return start_stack(
        StackConfig(
            engine="tiny",
            port=0,
            state_dir=state_dir,
            num_prefill_workers=num_prefill_workers,
            worker_args=["--log-level", "warning"],
            gateway_args=fairness_gateway_args(state_dir, policy),
            env=FAIRNESS_ENV,
            ready_timeout_s=120.0,
        )
    )


def _depth_summary(depths: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        tenant: {
            "min": min(values),
            "mean": round(sum(values) / len(values), 1),
            "queued_fraction": round(sum(v > 0 for v in values) / len(values), 3),
        }
        for tenant, values in depths.items()
        if values
    }


def _counts(run: LoadRun, start_s: float, end_s: float) -> dict[str, int]:
    counts = dict.fromkeys(run.refused, 0)
    for completion in run.completions:
        if start_s <= completion.finished_s < end_s:
            counts[completion.tenant] += 1
    return counts


async def weighted_fairness(
    access: StackAccess,
    *,
    weights: Sequence[float] = (1.0, 2.0, 4.0),
    concurrency: int = CONCURRENCY,
    warmup_s: float = 4.0,
    window_s: float = 12.0,
    prefix: str = "weighted",
    seed: int = 0,
    pin_to: Sequence[str] = (),
) -> dict[str, Any]:
    """Backlogged tenants of ``weights`` (see the module docstring). ``prefix`` names them
    (``{prefix}-w{weight}``; new tenants each run). ``pin_to``: gateway replicas' URLs, the
    i-th tenant sending only to the (i mod n)-th (empty: every tenant to ``access``)."""
    loads = [
        TenantLoad(
            f"{prefix}-w{w:g}", w, concurrency, base_url=pin_to[i % len(pin_to)] if pin_to else ""
        )
        for i, w in enumerate(weights)
    ]
    end_s = warmup_s + window_s
    depths: dict[str, list[float]] = {}
    names = [load.name for load in loads]
    run = await run_closed_loop(
        access,
        loads,
        end_s,
        num_words=NUM_WORDS,
        max_tokens=MAX_TOKENS,
        seed=seed,
        during=lambda now: sample_queue_depths(access, names, now, warmup_s, end_s, depths),
    )
    normalized = service_by_tenant(
        run.completions, warmup_s, end_s, weights={load.name: load.weight for load in loads}
    )
    return {
        "weights": {load.name: load.weight for load in loads},
        **({"sent_to": {load.name: load.base_url for load in loads}} if pin_to else {}),
        "concurrency": concurrency,
        "window_s": [warmup_s, end_s],
        "normalized_service": {t: round(s, 1) for t, s in normalized.items()},
        "jain": round(jain_index(list(normalized.values())), 4),
        "completed": _counts(run, warmup_s, end_s),
        "refused": run.refused,
        "refusal_codes": dict(run.refusal_codes),
        "queue_depth": _depth_summary(depths),
    }


async def lift_rule(
    access: StackAccess,
    *,
    concurrency: int = LIFT_CONCURRENCY,
    on_s: float = 5.0,
    off_s: float = 8.0,
    settle_s: float = 2.0,
    window_s: float = 6.0,
    prefix: str = "lift",
    seed: int = 0,
) -> dict[str, Any]:
    """A steady tenant and an on/off one of equal weight (module docstring): the on/off one is
    active for ``on_s``, leaves (its requests in flight are cancelled) for ``off_s``, then is
    active again; both tenants' service over [return + ``settle_s``, + ``window_s``).

    Why the window starts ``settle_s`` late: service is attributed to completions, and the
    returning tenant's first requests complete only after their time on the workers, while the
    steady one's were already there; the first second or two would count the steady tenant's
    head start, not the policy's choice. A policy without the lift serves the returning tenant
    alone for about ``off_s`` after it is back (its counter is ``off_s`` of the whole
    capacity behind), so the window should end by then: ``settle_s + window_s ≤ off_s``."""
    if settle_s + window_s > off_s:
        raise ValueError("the window must end within off_s of the return (see the docstring)")
    back_s = on_s + off_s
    start_s, end_s = back_s + settle_s, back_s + settle_s + window_s
    steady = TenantLoad(f"{prefix}-steady", 1.0, concurrency)
    onoff = TenantLoad(f"{prefix}-onoff", 1.0, concurrency, active=((0.0, on_s), (back_s, end_s)))
    depths: dict[str, list[float]] = {}
    names = [steady.name, onoff.name]
    run = await run_closed_loop(
        access,
        [steady, onoff],
        end_s,
        num_words=NUM_WORDS,
        max_tokens=MAX_TOKENS,
        seed=seed,
        during=lambda now: sample_queue_depths(access, names, now, start_s, end_s, depths),
    )
    weights = {steady.name: steady.weight, onoff.name: onoff.weight}
    after = service_by_tenant(run.completions, start_s, end_s, weights=weights)
    before = [c for c in run.completions if c.tenant == onoff.name and c.finished_s < back_s]
    return {
        "steady": steady.name,
        "onoff": onoff.name,
        "concurrency": concurrency,
        "back_s": back_s,
        "served_before_leaving": len(before),
        "window_s": [start_s, end_s],
        "normalized_service_after_return": {t: round(s, 1) for t, s in after.items()},
        "onoff_over_steady": round(after[onoff.name] / after[steady.name], 3)
        if after[steady.name]
        else None,
        "completed_after_return": _counts(run, start_s, end_s),
        "refused": run.refused,
        "queue_depth": _depth_summary(depths),
    }


def run_fairness_bench(
    *,
    policies: Sequence[str] = ("vtc", "dlpm", "d2lpm"),
    num_prefill_workers: int = 2,
    concurrency: int = CONCURRENCY,
    lift_concurrency: int = LIFT_CONCURRENCY,
    warmup_s: float = 10.0,
    window_s: float = 60.0,
    off_s: float = 30.0,
    seed: int = 0,
    output: str | None = None,
) -> int:
    """Both measurements per policy, each on a fresh stack, with longer windows than the
    tests'; the last stdout line is the JSON result."""
    result: dict[str, Any] = {
        "engine": "tiny",
        "num_prefill_workers": num_prefill_workers,
        "policies": {},
    }
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="fairgate-fairness-") as state_dir:
            stack = start_fairness_stack(Path(state_dir), policy, num_prefill_workers)
            try:
                access = StackAccess(stack.base_url, stack.admin_token)
                weighted = asyncio.run(
                    weighted_fairness(
                        access,
                        concurrency=concurrency,
                        warmup_s=warmup_s,
                        window_s=window_s,
                        seed=seed,
                    )
                )
                lift = asyncio.run(
                    lift_rule(
                        access,
                        concurrency=lift_concurrency,
                        on_s=warmup_s,
                        off_s=off_s,
                        window_s=off_s - 2.0,
                        seed=seed,
                    )
                )
            finally:
                stack.stop()
        log(
            f"{policy}: weighted jain {weighted['jain']}, lift on/off over steady "
            f"{lift['onoff_over_steady']}"
        )
        result["policies"][policy] = {"weighted": weighted, "lift": lift}
    print_result(result, output)
    return 0
