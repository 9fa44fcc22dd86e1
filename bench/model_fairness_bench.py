"""Fairness across models (issue 20) on the real stack: two models behind one gateway, each with
its own pool (SmolLM2, the reference and the expensive one, and the tiny random model, the
cheap one), two tenants of equal weight, both backlogged. Each tenant's service is §1's
(``bench.tenant_load``: uncached prompt + 2 × completion tokens, attributed to completion
times) on each model, **normalised** by the model's cost factor (``gateway.model_costs``:
what a token of it costs in tokens of the reference model), and Jain's index of the tenants'
normalised service (``run_model_fairness_bench``).

- ``disjoint`` (scenario A): tenant P only on the reference model, tenant Q only on the cheap
  one. The pools are disjoint, so no policy arbitrates anything: each tenant gets all of its
  pool. Equal normalised service here says that the measured factors match the pools' relative
  throughput under this load (the factors are calibrated), not that a scheduler is fair.
- ``shared`` (scenario B): P sends to both models, Q only to the cheap one (P with half of Q's
  requests in flight there). The cheap pool is arbitrated by the policy's counters, which each
  tenant's service on every model feeds (``gateway.policies.service_book``): P's service on
  the expensive pool counts against it on the cheap one, so Q should get more of the cheap
  pool.
  Equality needs the cheap pool to have enough for Q to catch up: when P's service on the
  expensive pool alone exceeds what the whole cheap pool gives Q, no work-conserving scheduler
  can equalise (``pool_share`` tells).

Normalised service is reported twice: with the factors the gateway shows at the end (what the
issue asks), and with the factor in force when each request was sent (sampled from ``/metrics``
every ``SAMPLE_INTERVAL_S``; a request's factor is fixed at its admission, so this is what the
gateway charged). They differ when the measured factors drift during the window.
``--factors pinned`` pins the factors through the admin API (``PATCH /admin/v1/models/{model}``)
at the end of the warm-up: each at its measured value then, so that the window is charged one
factor per model, or the cheap model's at ``cheap_factor``; they are measured again after it. A
cheap factor above what the pools' speeds give makes the shared scenario arbitrate: Q's service
on the cheap pool then outgrows P's on the expensive one, and P's share of the cheap pool is
the policy's choice (with the measured factor here, Q needs the whole cheap pool to keep up).

Whether both tenants stayed backlogged: the gateway's queue of each (tenant, model) lane,
sampled over the window (``lane_depths``: from the per-tenant and per-model queue depths).
A lane whose queue empties for a moment is not backlogged then, and its tenant, joining again,
is lifted (``ServiceBook.lift``) to the least counter of the tenants backlogged on any model:
``counter_jumps`` lists the rises of a tenant's fair counter between two samples too large to be
service (``JUMP_UNITS``), and ``gateway_counter_growth`` against the normalised service shows
what they add up to.

Where the cost goes: each pool's CPU seconds over the window (``/proc``; the load generator's
and the gateway's too) per unit of its raw service, as a ratio to the reference pool's
(``cpu_factor``). In the disjoint scenario the ratio of normalised services is the measured
factor over that CPU factor times the ratio of the pools' CPU seconds: the first part is the
gateway's calibration, the second the share of the machine the operating system gave each pool.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.fairness_bench import FAIRNESS_ENV, MAX_TOKENS, NUM_WORDS, fairness_gateway_args
from bench.report import log, print_result
from bench.tenant_load import (
    Completion,
    LoadRun,
    StackAccess,
    TenantLoad,
    jain_index,
    run_closed_loop,
)
from deploy.stack import Stack, StackConfig, start_stack
from gateway.model_costs import CostBook, ModelSpeed
from transfer.client import WorkerClient

__all__ = [
    "SCENARIOS",
    "FactorMode",
    "GatewaySample",
    "Scenario",
    "counter_jumps",
    "factor_at",
    "factor_changes",
    "lane_depths",
    "normalized_service",
    "parse_gateway_sample",
    "pool_costs",
    "raw_service",
    "run_model_fairness_bench",
    "scenario_loads",
    "scenarios_of",
]

FactorMode = Literal["measured", "pinned"]
Scenario = Literal["disjoint", "shared"]
SCENARIOS: tuple[Scenario, ...] = ("disjoint", "shared")
REFERENCE_ENGINE = "default"  # the gateway's own model: the unit of the cost factors
CHEAP_ENGINE = "tiny"
# In flight per lane, enough to keep a queue in the gateway in front of each pool. The tiny
# pool holds up to about 90 requests of one tenant (its decode worker's 64 sequences, those
# being prefilled and those whose KV is on its way): with 96 in flight a tenant alone there had
# its queue empty at moments (1 in 50 samples), and was lifted on its return. SmolLM2's pool
# holds about 25 on this machine; each of its requests lasts ~50 s with 96 in flight.
CONCURRENCY = 160  # the cheap model's lanes (P's in the shared scenario: half)
REFERENCE_CONCURRENCY = 48  # the reference model's lanes
SAMPLE_INTERVAL_S = 0.5
# A rise of a tenant's fair counter between two samples larger than this is a lift, not service:
# neither pool serves 1000 normalised units in a second here (SmolLM2's: ~200/s, the tiny
# one's: ~300/s), and under DLPM a lift across models is more than ``max_borrow_tokens`` (4096).
JUMP_UNITS = 1000.0
NOTES: dict[Scenario, str] = {
    "disjoint": (
        "disjoint pools: each tenant alone on its model's pool, nothing to arbitrate; equal "
        "normalised service means the cost factors match the pools' relative throughput "
        "(the factors are calibrated), not that a policy is fair"
    ),
    "shared": (
        "P on both models, Q on the cheap model only: the cheap pool is arbitrated by the "
        "shared counters, P's service on the expensive model counting against it there; where "
        "Q takes the whole cheap pool (pool_share) and is still behind, the cheap pool's "
        "normalised capacity is less than the expensive one's and nothing is left to arbitrate"
    ),
}


@dataclass(frozen=True, slots=True)
class GatewaySample:
    """One scrape of the gateway's ``/metrics`` at ``t_s`` (the loop's clock): requests queued
    by tenant and by model, each model's cost factor, each tenant's fair counter."""

    t_s: float
    tenant_depths: dict[str, float] = field(default_factory=dict)
    model_depths: dict[str, float] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StackProcess:
    """One process of the stack under test, or the load generator: ``label`` names it in the
    report (``gateway``, ``prefill@MODEL``, ...); a worker has its ``model`` and ``url``."""

    label: str
    pid: int
    model: str = ""
    url: str = ""


def cpu_seconds(stat: str) -> float:
    """User + system CPU seconds of a process from its ``/proc/PID/stat`` line."""
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _cpu_now(processes: Sequence[StackProcess]) -> dict[str, float]:
    now: dict[str, float] = {}
    for process in processes:
        try:
            now[process.label] = cpu_seconds(Path(f"/proc/{process.pid}/stat").read_text())
        except OSError:  # (gone: a worker that died; the run reports the rest)
            continue
    return now


def parse_gateway_sample(text: str, t_s: float) -> GatewaySample:
    """The series ``GatewaySample`` holds, from a ``/metrics`` page."""
    sample = GatewaySample(t_s)
    by_family: dict[str, tuple[str, dict[str, float]]] = {
        "fairgate_queue_depth": ("tenant", sample.tenant_depths),
        "fairgate_fair_counter": ("tenant", sample.counters),
        "fairgate_model_queue_depth": ("model", sample.model_depths),
        "fairgate_model_cost_factor": ("model", sample.factors),
    }
    for family in text_string_to_metric_families(text):
        if family.name not in by_family:
            continue
        label, into = by_family[family.name]
        for metric in family.samples:
            into[metric.labels[label]] = metric.value
    return sample


def lane_depths(
    sample: GatewaySample, lanes: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], float]:
    """The requests queued in each (tenant, model) lane, from the per-tenant and per-model
    depths (the gateway has no per-lane series): a tenant with one lane left unknown has all
    of its depth there, a model with one tenant left unknown all of its. Lanes it cannot tell
    apart this way (two tenants each on the same two models) are left out."""
    depths: dict[tuple[str, str], float] = {}
    unknown = list(dict.fromkeys(lanes))
    tenant_left = {t: sample.tenant_depths.get(t, 0.0) for t, _ in unknown}
    model_left = {m: sample.model_depths.get(m, 0.0) for _, m in unknown}
    while unknown:
        for lane in unknown:
            tenant, model = lane
            if sum(t == tenant for t, _ in unknown) == 1:
                depth = tenant_left[tenant]
            elif sum(m == model for _, m in unknown) == 1:
                depth = model_left[model]
            else:
                continue
            depths[lane] = max(0.0, depth)  # (two scrapes' worth of skew: never below 0)
            tenant_left[tenant] -= depth
            model_left[model] -= depth
            unknown.remove(lane)
            break
        else:
            break
    return depths


def factor_at(samples: Sequence[GatewaySample], model: str, t_s: float) -> float:
    """The model's cost factor in the last sample at or before ``t_s`` (the first sample's
    before any)."""
    factor: float | None = None
    for sample in samples:
        if sample.t_s > t_s and factor is not None:
            break
        if model in sample.factors:
            factor = sample.factors[model]
    if factor is None:
        raise ValueError(f"no sample has a cost factor for {model!r}")
    return factor


def raw_service(
    completions: Sequence[Completion], start_s: float, end_s: float
) -> dict[str, dict[str, float]]:
    """By tenant and model, the service (§1, unnormalised) of the requests that completed in
    [start_s, end_s)."""
    service: dict[str, dict[str, float]] = {}
    for completion in completions:
        if start_s <= completion.finished_s < end_s:
            of_tenant = service.setdefault(completion.tenant, {})
            model = completion.model
            of_tenant[model] = of_tenant.get(model, 0.0) + completion.service()
    return service


def normalized_service(
    completions: Sequence[Completion],
    start_s: float,
    end_s: float,
    factor_of: Callable[[Completion], float],
    weights: Mapping[str, float],
) -> dict[str, float]:
    """By tenant (each of ``weights``, 0 without completions), Σ service × ``factor_of`` the
    request ÷ the tenant's weight over the requests that completed in [start_s, end_s)."""
    service = dict.fromkeys(weights, 0.0)
    for c in completions:
        if start_s <= c.finished_s < end_s:
            service[c.tenant] += c.service() * factor_of(c) / weights[c.tenant]
    return service


def scenarios_of(names: Sequence[str]) -> list[Scenario]:
    """The scenarios named (``--scenarios``); ValueError naming the known ones otherwise."""
    known: dict[str, Scenario] = {scenario: scenario for scenario in SCENARIOS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"no scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return [known[name] for name in names]


def scenario_loads(
    scenario: Scenario,
    reference_model: str,
    cheap_model: str,
    *,
    concurrency: int = CONCURRENCY,
    reference_concurrency: int = REFERENCE_CONCURRENCY,
    prefix: str = "",
) -> list[TenantLoad]:
    """Tenants P and Q (weight 1 each; ``{prefix}P``, ``{prefix}Q``) as the module docstring's
    scenario has them, ``reference_concurrency`` in flight on the reference model and
    ``concurrency`` on the cheap one (P: half of it); P's split is one load per model of the
    same name."""
    p, q = f"{prefix}P", f"{prefix}Q"
    if scenario == "disjoint":
        return [
            TenantLoad(p, 1.0, reference_concurrency, model=reference_model),
            TenantLoad(q, 1.0, concurrency, model=cheap_model),
        ]
    return [
        TenantLoad(p, 1.0, reference_concurrency, model=reference_model),
        TenantLoad(p, 1.0, max(1, concurrency // 2), model=cheap_model),
        TenantLoad(q, 1.0, concurrency, model=cheap_model),
    ]


# ---- the stack ---------------------------------------------------------------------------------


def start_models_stack(state_dir: Path, policy: str) -> Stack:
    """SmolLM2 (the reference) and the tiny model, a prefill and a decode worker each, and the
    gateway as ``bench.fairness_bench`` runs it (no overload guard, no queue-wait refusal)."""
    return start_stack(
        StackConfig(
            engine=REFERENCE_ENGINE,
            models=(REFERENCE_ENGINE, CHEAP_ENGINE),
            port=0,
            state_dir=state_dir,
            worker_args=["--log-level", "warning"],
            gateway_args=fairness_gateway_args(state_dir, policy),
            env=FAIRNESS_ENV,
            ready_timeout_s=300.0,
        )
    )


async def model_costs(access: StackAccess) -> dict[str, dict[str, Any]]:
    """Each model's cost factor, its source and measured seconds per token
    (``GET /admin/v1/models``)."""
    async with httpx.AsyncClient(base_url=access.base_url, timeout=30.0) as client:
        response = await client.get(
            "/admin/v1/models", headers={"authorization": f"Bearer {access.admin_token}"}
        )
        response.raise_for_status()
    return {
        m["model"]: {
            "factor": m["cost_factor"],
            "source": m["cost_source"],
            "seconds_per_token": m["seconds_per_token"],
        }
        for m in response.json()["data"]
    }


async def set_factors(access: StackAccess, factors: Mapping[str, float | None]) -> None:
    """Pin each model's factor (None: back to measured) through the admin API."""
    async with httpx.AsyncClient(base_url=access.base_url, timeout=30.0) as client:
        for model, factor in factors.items():
            response = await client.patch(
                f"/admin/v1/models/{model}",
                json={"cost_factor": factor},
                headers={"authorization": f"Bearer {access.admin_token}"},
            )
            response.raise_for_status()


async def worker_costs(
    workers: Sequence[StackProcess], reference_model: str
) -> dict[str, dict[str, Any]]:
    """By model, its workers' measured speeds now (``GET /v1/load``) and what
    ``gateway.model_costs`` makes of this one snapshot: the seconds of worker time per token
    and the factor before the gateway's smoothing, clamping and rounding. ``through_zero``: a
    decode step fit with no intercept (``engine.engine_thread.DecodeSpeed``, until the contexts
    it saw spread enough), which puts the whole step, fixed costs included, into the per-token
    slope that the factor extrapolates to its reference batch's 16 × 512 tokens."""
    speeds: dict[str, list[ModelSpeed]] = {}
    shown: dict[str, list[dict[str, Any]]] = {}
    for worker in workers:
        async with WorkerClient(worker.url) as client:
            load = await client.load(timeout_s=10.0)
        speeds.setdefault(worker.model, []).append(ModelSpeed.of(load))
        shown.setdefault(worker.model, []).append(
            {
                "role": load.role,
                "prefill_tok_s": round(load.prefill_tok_s, 1),
                "decode_base_s": load.decode_base_s,
                "decode_token_s": load.decode_token_s,
                "through_zero": load.decode_base_s == 0 and load.decode_token_s > 0,
            }
        )
    book = CostBook(reference_model)
    for model, of_model in speeds.items():
        book.measure(model, of_model)
    reference = book.cost(reference_model).seconds_per_token
    report: dict[str, dict[str, Any]] = {}
    for model in speeds:
        seconds = book.cost(model).seconds_per_token
        report[model] = {
            "workers": shown[model],
            "seconds_per_token": seconds,
            "factor_unsmoothed": None if seconds is None or not reference else seconds / reference,
        }
    return report


def factor_changes(samples: Sequence[GatewaySample]) -> dict[str, list[tuple[float, float]]]:
    """By model, (time, factor) at the first sample and at each sample whose factor differs
    from the one before."""
    changes: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        for model, factor in sample.factors.items():
            seen = changes.setdefault(model, [])
            if not seen or seen[-1][1] != factor:
                seen.append((round(sample.t_s, 1), factor))
    return changes


def counter_jumps(
    samples: Sequence[GatewaySample], tenants: Sequence[str], *, min_units: float = JUMP_UNITS
) -> dict[str, list[tuple[float, float]]]:
    """By tenant, (time, rise) of each rise of its fair counter between two samples of more than
    ``min_units`` (module docstring: a lift); a tenant's first appearance is not a rise."""
    jumps: dict[str, list[tuple[float, float]]] = {tenant: [] for tenant in tenants}
    for before, after in itertools.pairwise(samples):
        for tenant in tenants:
            if tenant in before.counters and tenant in after.counters:
                rise = after.counters[tenant] - before.counters[tenant]
                if rise > min_units:
                    jumps[tenant].append((round(after.t_s, 1), round(rise, 1)))
    return jumps


def pool_costs(
    cpu_s: Mapping[str, float], raw_by_model: Mapping[str, float], reference_model: str
) -> dict[str, dict[str, float | None]]:
    """By model, the CPU seconds its workers used (``cpu_s`` labelled ``ROLE@MODEL``), its raw
    service, and the CPU seconds per unit of it as a ratio to the reference model's
    (``cpu_factor``: what the cost factor would be if worker CPU time were the cost)."""
    pools: dict[str, dict[str, float | None]] = {}
    for label, seconds in cpu_s.items():
        _, _, model = label.partition("@")
        if model:
            pool = pools.setdefault(model, {"cpu_s": 0.0})
            pool["cpu_s"] = (pool["cpu_s"] or 0.0) + seconds

    def per_unit(model: str) -> float | None:
        service = raw_by_model.get(model, 0.0)
        return (pools[model]["cpu_s"] or 0.0) / service if service else None

    reference = per_unit(reference_model) if reference_model in pools else None
    for model, pool in pools.items():
        own = per_unit(model)
        pool["cpu_factor"] = None if own is None or not reference else round(own / reference, 4)
        pool["raw_service"] = raw_by_model.get(model, 0.0)
    for pool in pools.values():
        pool["cpu_s"] = round(pool["cpu_s"] or 0.0, 1)
    return pools


async def sample_gateway(
    access: StackAccess,
    now: Callable[[], float],
    end_s: float,
    into: list[GatewaySample],
    *,
    interval_s: float = SAMPLE_INTERVAL_S,
) -> None:
    """Append a ``GatewaySample`` to ``into`` every ``interval_s`` until ``end_s``."""
    headers = {"authorization": f"Bearer {access.admin_token}"}
    async with httpx.AsyncClient(base_url=access.base_url, timeout=10.0) as client:
        while (t_s := now()) < end_s:
            response = await client.get("/metrics", headers=headers)
            response.raise_for_status()
            into.append(parse_gateway_sample(response.text, t_s))
            await asyncio.sleep(interval_s)


# ---- one scenario ------------------------------------------------------------------------------


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "mean": round(sum(values) / len(values), 1),
        "queued_fraction": round(sum(v > 0 for v in values) / len(values), 3),
    }


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {key: round(value, 1) for key, value in values.items()}


def _window_report(
    run: LoadRun,
    samples: Sequence[GatewaySample],
    loads: Sequence[TenantLoad],
    end_factors: Mapping[str, float],
    start_s: float,
    end_s: float,
) -> dict[str, Any]:
    """The figures of the window [start_s, end_s) (module docstring)."""
    weights = {load.name: load.weight for load in loads}
    raw = raw_service(run.completions, start_s, end_s)
    normalized = normalized_service(
        run.completions, start_s, end_s, lambda c: end_factors[c.model], weights
    )
    at_admission = normalized_service(
        run.completions, start_s, end_s, lambda c: factor_at(samples, c.model, c.sent_s), weights
    )
    requests: dict[str, dict[str, int]] = {}
    by_model: dict[str, float] = {}
    for completion in run.completions:
        if start_s <= completion.finished_s < end_s:
            counts = requests.setdefault(completion.tenant, {})
            counts[completion.model] = counts.get(completion.model, 0) + 1
            by_model[completion.model] = by_model.get(completion.model, 0.0) + completion.service()
    window = [s for s in samples if start_s <= s.t_s < end_s]
    lanes = list(dict.fromkeys((load.name, load.model) for load in loads))
    per_lane = [lane_depths(s, lanes) for s in window]
    lane_summary = {
        f"{t}@{m}": _summary(of_lane)
        for t, m in lanes
        if (of_lane := [d[(t, m)] for d in per_lane if (t, m) in d])
    }
    return {
        "raw_service": {tenant: _rounded(of_tenant) for tenant, of_tenant in raw.items()},
        "normalized_service": _rounded(normalized),
        "jain": round(jain_index(list(normalized.values())), 4),
        "normalized_service_at_admission": _rounded(at_admission),
        "jain_at_admission": round(jain_index(list(at_admission.values())), 4),
        # what the gateway's own counters (the shared book, normalised) grew by: service,
        # the cached prefix VTC charges too, and lifts (``counter_jumps``)
        "gateway_counter_growth": {
            t: round(window[-1].counters.get(t, 0.0) - window[0].counters.get(t, 0.0), 1)
            for t in weights
        }
        if len(window) > 1
        else {},
        "counter_jumps": counter_jumps(window, list(weights)),
        "raw_service_by_model": _rounded(by_model),
        "pool_share": {
            model: {
                tenant: round(of_tenant.get(model, 0.0) / total, 3)
                for tenant, of_tenant in raw.items()
            }
            for model, total in by_model.items()
        },
        "requests": requests,
        "factors_in_window": {
            model: sorted({s.factors[model] for s in window if model in s.factors})
            for model in end_factors
        },
        "refused": run.refused,
        "refusal_codes": dict(run.refusal_codes),
        "queue_depth": {
            "lanes": lane_summary,
            "models": {
                model: _summary([s.model_depths.get(model, 0.0) for s in window])
                for model in end_factors
            }
            if window
            else {},
        },
        "backlogged": bool(lane_summary)
        and all(lane["queued_fraction"] == 1.0 for lane in lane_summary.values()),
    }


async def run_scenario(
    access: StackAccess,
    scenario: Scenario,
    reference_model: str,
    cheap_model: str,
    *,
    concurrency: int = CONCURRENCY,
    reference_concurrency: int = REFERENCE_CONCURRENCY,
    warmup_s: float = 15.0,
    window_s: float = 60.0,
    factors: FactorMode = "measured",
    cheap_factor: float | None = None,
    seed: int = 0,
    processes: Sequence[StackProcess] = (),
) -> dict[str, Any]:
    """One scenario (module docstring) on a running stack, with new tenants. ``processes``:
    the stack's, whose CPU time over the window is reported, and whose workers' speeds are
    read at the end (``worker_costs``); the load generator (this process) is added."""
    processes = [*processes, StackProcess("load generator", os.getpid())]
    loads = scenario_loads(
        scenario,
        reference_model,
        cheap_model,
        concurrency=concurrency,
        reference_concurrency=reference_concurrency,
        prefix=f"{scenario}-",
    )
    end_s = warmup_s + window_s
    samples: list[GatewaySample] = []
    cpu_at_start: dict[str, float] = {}
    pinned: dict[str, float] = {}
    failures: list[Exception] = []  # the side task's: the loop itself drops them

    async def beside(now: Callable[[], float]) -> None:
        sampler = asyncio.create_task(sample_gateway(access, now, end_s, samples))
        try:
            await asyncio.sleep(max(0.0, warmup_s - now()))
            cpu_at_start.update(_cpu_now(processes))
            if factors == "pinned":
                costs = await model_costs(access)
                pinned.update({model: float(cost["factor"]) for model, cost in costs.items()})
                if cheap_factor is not None:
                    pinned[cheap_model] = cheap_factor
                # (the reference's 1.0 is right, measured or not; another's 1.0 is a placeholder)
                unmeasured = [
                    m
                    for m, c in costs.items()
                    if c["source"] == "unmeasured"
                    and m != reference_model
                    and not (m == cheap_model and cheap_factor is not None)
                ]
                if unmeasured:
                    pinned.clear()
                    raise RuntimeError(f"no factor measured yet for {', '.join(unmeasured)}")
                await set_factors(access, pinned)
            await sampler
        except Exception as exc:
            failures.append(exc)
            raise
        finally:
            sampler.cancel()

    started = time.perf_counter()
    try:
        run = await run_closed_loop(
            access,
            loads,
            end_s,
            num_words=NUM_WORDS,
            max_tokens=MAX_TOKENS,
            seed=seed,
            during=beside,
        )
        cpu_at_end = _cpu_now(processes)
        if failures:
            raise RuntimeError(f"sampling or pinning the factors failed: {failures[0]!r}")
        costs = await model_costs(access)
        workers = [process for process in processes if process.url]
        speeds = await worker_costs(workers, reference_model) if workers else {}
    finally:
        if pinned:
            await set_factors(access, dict.fromkeys(pinned))
    end_factors = {model: float(cost["factor"]) for model, cost in costs.items()}
    report = _window_report(run, samples, loads, end_factors, warmup_s, end_s)
    cpu_s = {
        label: round(cpu_at_end[label] - cpu_at_start[label], 1)
        for label in cpu_at_start
        if label in cpu_at_end
    }
    pools = pool_costs(cpu_s, report["raw_service_by_model"], reference_model)
    return {
        "scenario": scenario,
        "note": NOTES[scenario],
        "lanes": [
            {"tenant": load.name, "model": load.model, "concurrency": load.concurrency}
            for load in loads
        ],
        "window_s": [warmup_s, end_s],
        "factors": factors,
        "cost_factors": costs,
        **({"pinned": pinned} if pinned else {}),
        **report,
        "factor_changes": factor_changes(samples),
        "worker_speeds_at_end": speeds,
        "cpu_s_in_window": cpu_s,  # of len(os.sched_getaffinity(0)) × the window's seconds
        "pools": pools,
        # the gateway's factor against the CPU one: 1 where the factor is the pools' CPU cost
        "factor_over_cpu_factor": {
            model: round(end_factors[model] / pool["cpu_factor"], 2)
            for model, pool in pools.items()
            if pool["cpu_factor"] and model in end_factors
        },
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


# ---- the benchmark -----------------------------------------------------------------------------


def cpu_model() -> str:
    """``lscpu``'s model name ("" where it has none)."""
    try:
        listing = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10.0
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in listing.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return ""


async def calibrate(
    access: StackAccess,
    reference_model: str,
    cheap_model: str,
    *,
    concurrency: int = CONCURRENCY,
    reference_concurrency: int = REFERENCE_CONCURRENCY,
    duration_s: float,
    seed: int = 0,
) -> dict[str, float]:
    """Load both pools (the disjoint scenario's lanes, unmeasured) for ``duration_s``; the
    factors after it. A new stack's factors are 1.0 ("unmeasured") until the gateway, which
    takes the workers' speeds every 10 s, finds both pools' decode step fits with an intercept
    (``worker_costs``): 15 s of load were not always enough."""
    loads = scenario_loads(
        "disjoint",
        reference_model,
        cheap_model,
        concurrency=concurrency,
        reference_concurrency=reference_concurrency,
        prefix="calibrate-",
    )
    await run_closed_loop(
        access, loads, duration_s, num_words=NUM_WORDS, max_tokens=MAX_TOKENS, seed=seed
    )
    async with httpx.AsyncClient(base_url=access.base_url, timeout=10.0) as client:
        response = await client.get(
            "/metrics", headers={"authorization": f"Bearer {access.admin_token}"}
        )
        response.raise_for_status()
    return parse_gateway_sample(response.text, duration_s).factors


def stack_processes(stack: Stack, model_ids: Mapping[str, str]) -> list[StackProcess]:
    """The stack's gateway and workers (``model_ids``: each engine name's model id)."""
    processes = [StackProcess("gateway", stack.gateway.process.pid)]
    for worker in stack.workers:
        model = model_ids[worker.spec.model]
        processes.append(
            StackProcess(f"{worker.spec.role}@{model}", worker.process.pid, model, worker.http_url)
        )
    return processes


def run_model_fairness_bench(
    *,
    policies: Sequence[str] = ("vtc", "dlpm"),
    scenarios: Sequence[Scenario] = SCENARIOS,
    concurrency: int = CONCURRENCY,
    reference_concurrency: int = REFERENCE_CONCURRENCY,
    warmup_s: float = 15.0,
    window_s: float = 60.0,
    factors: FactorMode = "measured",
    cheap_factor: float | None = None,
    calibrate_s: float = 30.0,
    seed: int = 0,
    output: str | None = None,
) -> int:
    """Every scenario per policy, each policy on a fresh stack (``calibrate``d first for
    ``calibrate_s``, then the scenarios one after the other, each with new tenants); the last
    stdout line is the JSON result."""
    from engine.model_store import resolve_model

    if cheap_factor is not None and factors != "pinned":
        raise ValueError("a cheap model's factor is pinned: --factors pinned")
    reference_model = resolve_model(REFERENCE_ENGINE, pull=True).model_id
    cheap_model = resolve_model(CHEAP_ENGINE, pull=False).model_id
    result: dict[str, Any] = {
        "models": {"reference": reference_model, "cheap": cheap_model},
        "workers_per_model": {"prefill": 1, "decode": 1},
        "cpu": cpu_model(),
        "num_cpus": len(os.sched_getaffinity(0)),
        "concurrency": {"cheap": concurrency, "reference": reference_concurrency},
        "factors": factors,
        **({"cheap_factor": cheap_factor} if factors == "pinned" else {}),
        "policies": {},
    }
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="fairgate-models-") as state_dir:
            stack = start_models_stack(Path(state_dir), policy)
            try:
                access = StackAccess(stack.base_url, stack.admin_token)
                processes = stack_processes(
                    stack, {REFERENCE_ENGINE: reference_model, CHEAP_ENGINE: cheap_model}
                )
                reports: dict[str, Any] = {}
                if calibrate_s > 0:
                    reports["calibration"] = {
                        "duration_s": calibrate_s,
                        "factors_after": asyncio.run(
                            calibrate(
                                access,
                                reference_model,
                                cheap_model,
                                concurrency=concurrency,
                                reference_concurrency=reference_concurrency,
                                duration_s=calibrate_s,
                                seed=seed,
                            )
                        ),
                    }
                for scenario in scenarios:
                    report = asyncio.run(
                        run_scenario(
                            access,
                            scenario,
                            reference_model,
                            cheap_model,
                            concurrency=concurrency,
                            reference_concurrency=reference_concurrency,
                            warmup_s=warmup_s,
                            window_s=window_s,
                            factors=factors,
                            cheap_factor=cheap_factor,
                            seed=seed,
                            processes=processes,
                        )
                    )
                    log(
                        f"{policy} {scenario}: jain {report['jain']} "
                        f"(at admission {report['jain_at_admission']}), normalised "
                        f"{report['normalized_service']}, factors "
                        f"{ {m: c['factor'] for m, c in report['cost_factors'].items()} }"
                    )
                    reports[scenario] = report
            finally:
                stack.stop()
        result["policies"][policy] = reports
    print_result(result, output)
    return 0
