"""``fairgate bench sched``: every named scheduling policy on the same simulated trace.

Each policy is the real class from ``gateway.policies.make_policy``, driven by ``bench.sim`` on a
trace from ``bench.scenarios`` with step times from ``bench.latency_model``. The last stdout line is
one JSON object ``{"scenario", "policies": {NAME: metrics}}``; a policy that ``make_policy`` does
not know gets ``{"error": …}`` instead of metrics. ``--plot`` draws each tenant's service over
time, one panel per policy. ``--fit`` measures the engine and writes the latency model instead.

Metrics (service in the units of ``scheduling.md`` §1 for every policy: computed (uncached) prompt
tokens × w_in + output tokens × w_out, divided by the tenant's weight where normalized):
- ``max_service_diff``: the largest |ΔW_f − ΔW_g| of normalized service over any interval in which
  both f and g had a request queued throughout (on the sample grid: 500 intervals per run);
- ``bound``: the policy's guarantee on it: 2U for fcfs (VTC's, to compare with), vtc and rr_lpm,
  2(U + Q_u) for dlpm, 2·|W|·(U + Q_u) for d2lpm, with U = w_in·L_input + w_out·M, L_input the
  longest prompt of the trace and M the decode pool's KV tokens (all decode workers: what the
  running batches hold at once); divided by the smallest weight;
- ``jain``: Jain's index of normalized service among the tenants backlogged throughout a window
  of 5% of the run, averaged over the windows;
- ``throughput_tok_s``: prompt + output tokens of the requests completed within the trace's
  duration, per second of it;
- ``p99_ttft_s``: per tenant, over completed requests;
- ``slo_attainment``: per class, the fraction of requests that completed within the class's TTFT
  and TPOT targets (``gateway.config.DEFAULT_SLO_CLASSES``); rejected and unserved ones miss;
  ``ttft_attainment`` and ``tpot_attainment`` the same for each target alone (TPOT: mean time
  per output token after the first, from the simulated decode steps);
  ``ttft_attainment_by_tenant`` and ``tpot_attainment_by_tenant`` the same per tenant;
- ``class_load``: per class, the requests/s completed within the duration as a fraction of what
  the cluster completes of that class's requests alone (``bench.scenarios.stream_capacity_req_s``
  of its streams' average request); ``batch_use_of_leftover``: ``class_load["batch"] / (1 −
  class_load["interactive"])``, how much of the capacity the interactive class leaves the batch
  class uses (scenarios with both classes);
- ``cache_hit_rate``: cached prompt tokens / prompt tokens of the requests prefilled;
- ``service_share``: per tenant, its share of all service (not normalized);
- ``prefill_step_s``: mean and longest prefill step, the granularity at which a prefill worker
  can turn to a more important prompt.

The prefill workers' step shape is the engine's by default (``max_num_batched_tokens`` 2048,
``prefill_chunk_size`` 512, no step-time cap); ``run_sched_bench`` takes other values. The
trace's rates and the class capacities behind ``class_load`` are always those of the default
step shape, so that runs with different step budgets see the same arrivals and their loads,
throughputs and attainments compare directly (a smaller budget's cost shows as less load).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

from bench.latency_model import DEFAULT_MODEL_PATH, LatencyModel, fit
from bench.report import log, print_result
from bench.scenarios import SCENARIOS, Scenario, build_trace, capacity_of
from bench.sim import ClusterSpec, SimResult, Simulator, Trace
from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies import POLICY_NAMES, make_policy

__all__ = ["policy_metrics", "run_fit", "run_policy", "run_sched_bench"]


def run_policy(
    name: str,
    trace: Trace,
    cluster: ClusterSpec,
    model: LatencyModel,
    settings: SchedulerSection | None = None,
    slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
) -> tuple[SimResult, SchedulerSection]:
    """Simulate policy ``name`` on ``trace``, configured as the gateway's ``[scheduler]``
    section (``settings``, its defaults when None) says but for what the simulated cluster
    fixes: the prefix index sized to the cache, and the prefill speed assumed before one is
    measured. ``ValueError`` when there is no such policy."""
    full_step_s = model.prefill_step_s(
        cluster.prefill_step_tokens, cluster.prefill_step_tokens * cluster.prefill_chunk_tokens
    )
    settings = msgspec.structs.replace(
        settings or SchedulerSection(),
        prefix_index_blocks=cluster.prefix_cache_blocks,
        default_prefill_tok_s=cluster.prefill_step_tokens / full_step_s,
        max_prefill_inflight_tokens=cluster.max_inflight_tokens,
    )
    policy = make_policy(name, settings, slo_classes, block_size=cluster.block_size)
    simulator = Simulator(
        policy,
        trace,
        cluster,
        model,
        w_in=settings.w_in,
        w_out=settings.w_out,
        slo_classes=slo_classes,  # the policy's, so the two cannot differ
    )
    return simulator.run(), settings


def policy_metrics(
    result: SimResult,
    settings: SchedulerSection,
    slo_classes: Sequence[SloClass] | None = None,
    class_capacity_req_s: dict[str, float] | None = None,
) -> dict[str, Any]:
    trace = result.trace
    weights = {t.tenant_id: t.weight for t in trace.tenants}
    normalized = {
        tenant_id: [s / weights[tenant_id] for s in series]
        for tenant_id, series in result.service.items()
    }
    records = result.records
    completed = [r for r in records if r.outcome == "completed"]
    in_window = [r for r in completed if r.finish_s is not None and r.finish_s <= trace.duration_s]
    prefilled = [r for r in records if r.first_token_s is not None]
    total_service = sum(series[-1] for series in result.service.values())
    slo_classes = slo_classes or DEFAULT_SLO_CLASSES
    metrics = {
        "max_service_diff": round(_max_service_diff(normalized, result.backlogged), 1),
        "bound": round(_bound(result, settings) / min(weights.values()), 1),
        "jain": round(_jain(normalized, result.backlogged), 4),
        "throughput_tok_s": round(
            sum(r.num_prompt_tokens + r.num_output_tokens for r in in_window) / trace.duration_s,
            1,
        ),
        "p99_ttft_s": {
            tenant_id: _p99([_ttft(r) for r in completed if r.tenant_id == tenant_id])
            for tenant_id in weights
        },
        "slo_attainment": _slo_attainment(records, slo_classes),
        "ttft_attainment": _slo_attainment(records, slo_classes, check_tpot=False),
        "tpot_attainment": _slo_attainment(records, slo_classes, check_ttft=False),
        "ttft_attainment_by_tenant": _slo_attainment(
            records, slo_classes, check_tpot=False, by_tenant=True
        ),
        "tpot_attainment_by_tenant": _slo_attainment(
            records, slo_classes, check_ttft=False, by_tenant=True
        ),
        "cache_hit_rate": round(
            sum(r.num_cached_tokens for r in prefilled)
            / max(1, sum(r.num_prompt_tokens for r in prefilled)),
            4,
        ),
        "service_share": {
            tenant_id: round(series[-1] / total_service, 4) if total_service else 0.0
            for tenant_id, series in result.service.items()
        },
        "completed": len(completed),
        "rejected": sum(r.outcome == "rejected" for r in records),
        "unserved": sum(r.outcome == "unserved" for r in records),
        "requeues": sum(r.num_requeues for r in records),
        "evicted_blocks": result.num_evicted_blocks,
        "prefill_step_s": {
            "mean": round(result.prefill_busy_s / max(1, result.num_prefill_steps), 3),
            "max": round(result.max_prefill_step_s, 3),
        },
    }
    if class_capacity_req_s:
        load = {
            name: round(
                sum(r.slo_class == name for r in in_window) / trace.duration_s / capacity, 4
            )
            for name, capacity in class_capacity_req_s.items()
        }
        metrics["class_load"] = load
        if "batch" in load and "interactive" in load:
            leftover = 1.0 - load["interactive"]
            metrics["batch_use_of_leftover"] = (
                round(load["batch"] / leftover, 4) if leftover > 0 else None
            )
    return metrics


def class_capacity_req_s(
    scenario: Scenario, model: LatencyModel, cluster: ClusterSpec
) -> dict[str, float]:
    """Per SLO class of the scenario: requests/s the cluster completes of its streams' average
    request (the streams' nominal rates weight the average)."""
    classes = sorted({s.slo_class for s in scenario.streams})
    return {
        name: capacity_of([s for s in scenario.streams if s.slo_class == name], model, cluster)
        for name in classes
    }


def _ttft(record: Any) -> float:
    return float(record.first_token_s - record.arrival)


def _p99(values: list[float]) -> float | None:
    """Nearest-rank 99th percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)], 3)


def _max_service_diff(service: dict[str, list[float]], backlogged: dict[str, list[bool]]) -> float:
    """max over pairs and over runs of intervals where both were backlogged of (max D − min D),
    D = W_f − W_g sampled at the runs' interval ends: the largest |ΔW_f − ΔW_g| over a
    sub-interval."""
    worst = 0.0
    for f, g in itertools.combinations(service, 2):
        low = high = None
        for i in range(1, len(service[f])):
            if not (backlogged[f][i] and backlogged[g][i]):
                low = high = None
                continue
            if low is None or high is None:
                low = high = service[f][i - 1] - service[g][i - 1]
            diff = service[f][i] - service[g][i]
            low, high = min(low, diff), max(high, diff)
            worst = max(worst, high - low)
    return worst


def _bound(result: SimResult, settings: SchedulerSection) -> float:
    cluster = result.cluster
    longest_prompt = max((r.num_prompt_tokens for r in result.records), default=0)
    batch_tokens = cluster.num_decode_workers * cluster.decode_kv_tokens
    u = settings.w_in * longest_prompt + settings.w_out * batch_tokens
    if result.policy == "dlpm":
        return 2 * (u + settings.quantum_tokens)
    if result.policy == "d2lpm":
        return 2 * cluster.num_prefill_workers * (u + settings.quantum_tokens)
    return 2 * u


def _jain(
    service: dict[str, list[float]], backlogged: dict[str, list[bool]], window: int = 25
) -> float:
    """Jain's index of normalized service per window of ``window`` sample intervals (5% of the
    run), over the tenants backlogged throughout the window, averaged over the windows with two
    or more such tenants; 1.0 when there is none. Per window, not over the whole run: a tenant
    backlogged only part of the time (on/off) is compared while it competes."""
    num_samples = len(next(iter(service.values()), []))
    indices: list[float] = []
    for start in range(1, num_samples - window + 1, window):
        end = start + window - 1  # intervals start..end, i.e. samples start-1 .. end
        gains = [
            series[end] - series[start - 1]
            for tenant_id, series in service.items()
            if all(backlogged[tenant_id][start : end + 1])
        ]
        if len(gains) >= 2 and any(gains):
            indices.append(sum(gains) ** 2 / (len(gains) * sum(g * g for g in gains)))
    return sum(indices) / len(indices) if indices else 1.0


def _slo_attainment(
    records: Sequence[Any],
    slo_classes: Sequence[SloClass],
    *,
    check_ttft: bool = True,
    check_tpot: bool = True,
    by_tenant: bool = False,
) -> dict[str, float]:
    """Per class (per tenant with ``by_tenant``), the share of requests that completed and met
    the class's targets checked. TPOT (the mean time per output token after the first) is
    checked for classes that have a target, over requests with at least two tokens; TPOT alone
    (``check_ttft`` False) counts only those, completed, as the gateway's
    ``fairgate_tpot_attainment`` does."""
    targets = {c.name: c for c in slo_classes}
    met: dict[str, list[bool]] = {}
    for record in records:
        slo = targets.get(record.slo_class)
        if slo is None:
            continue
        if not check_ttft and (
            slo.tpot_target_s is None
            or record.outcome != "completed"
            or record.num_output_tokens < 2
        ):
            continue
        ok = record.outcome == "completed"
        if ok and check_ttft:
            ok = _ttft(record) <= slo.ttft_target_s
        if ok and check_tpot and slo.tpot_target_s is not None and record.num_output_tokens > 1:
            tpot = (record.finish_s - record.first_token_s) / (record.num_output_tokens - 1)
            ok = tpot <= slo.tpot_target_s
        met.setdefault(record.tenant_id if by_tenant else record.slo_class, []).append(ok)
    return {name: round(sum(oks) / len(oks), 4) for name, oks in met.items()}


# ---- the command ------------------------------------------------------------------------------


def run_sched_bench(
    *,
    scenario: str,
    policies: Sequence[str] = POLICY_NAMES,
    num_prefill_workers: int = 2,
    num_decode_workers: int = 2,
    seed: int = 0,
    duration_s: float | None = None,
    overload: float = 2.0,
    speedup: float = 1.0,
    prefill_step_tokens: int = 2048,
    prefill_chunk_tokens: int = 512,
    prefill_step_max_s: float | None = ClusterSpec().prefill_step_max_s,
    max_prefill_inflight_s: float | None = ClusterSpec().max_inflight_s,
    model_path: Path = DEFAULT_MODEL_PATH,
    output: str | None = None,
    plot: str | None = None,
) -> int:
    """``prefill_step_tokens`` and ``prefill_chunk_tokens``: the prefill workers' per-step token
    budget and per-request chunk (the engine's ``max_num_batched_tokens`` and
    ``prefill_chunk_size``); ``prefill_step_max_s``: also cap a step at that many seconds of
    work at the worker's measured speed; ``max_prefill_inflight_s``: the gateway's time cap on
    what a prefill worker holds (``ClusterSpec``); both default to the engine's and the
    gateway's own. None: off."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    model = LatencyModel.load(model_path)
    if speedup != 1.0:
        model = model.scaled(speedup)
    reference = ClusterSpec(
        num_prefill_workers=num_prefill_workers, num_decode_workers=num_decode_workers
    )
    cluster = replace(
        reference,
        prefill_step_tokens=prefill_step_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
        prefill_step_max_s=prefill_step_max_s,
        max_inflight_s=max_prefill_inflight_s,
    )
    # Rates and capacities from the default step shape: the same trace for every budget.
    trace = build_trace(
        SCENARIOS[scenario], model, reference, seed=seed, duration_s=duration_s, overload=overload
    )
    log(
        f"bench sched: {scenario}, {len(trace.requests)} requests over {trace.duration_s:g} s, "
        f"{num_prefill_workers} prefill + {num_decode_workers} decode workers, prefill steps of "
        f"{prefill_step_tokens} tokens (chunks of {prefill_chunk_tokens}"
        + (f", at most {prefill_step_max_s:g} s" if prefill_step_max_s is not None else "")
        + f"), seed {seed}"
    )
    class_capacity = class_capacity_req_s(SCENARIOS[scenario], model, reference)
    figures: dict[str, dict[str, Any]] = {}
    results: list[SimResult] = []
    for name in policies:
        start = time.perf_counter()
        try:
            result, settings = run_policy(name, trace, cluster, model)
        except ValueError as exc:
            log(f"{name}: not available: {exc}")
            figures[name] = {"error": f"not available: {exc}"}
            continue
        wall_s = time.perf_counter() - start
        metrics = policy_metrics(result, settings, class_capacity_req_s=class_capacity)
        figures[name] = metrics
        results.append(result)
        log(
            f"{name}: max_service_diff {metrics['max_service_diff']:g} (bound "
            f"{metrics['bound']:g}), jain {metrics['jain']:g}, throughput "
            f"{metrics['throughput_tok_s']:g} tok/s, cache hits {metrics['cache_hit_rate']:g}, "
            f"prefill steps {metrics['prefill_step_s']['mean']:g} s (max "
            f"{metrics['prefill_step_s']['max']:g}), "
            f"{len(result.records) / wall_s:.0f} requests/s of wall time"
        )
    if plot is not None and results:
        plot_service(results, Path(plot))
        log(f"plot: {plot}")
    print_result(
        {
            "scenario": scenario,
            "seed": seed,
            "duration_s": trace.duration_s,
            "num_requests": len(trace.requests),
            "latency_model": model.provenance,
            "prefill_step": {
                "max_tokens": prefill_step_tokens,
                "chunk_tokens": prefill_chunk_tokens,
                "max_s": prefill_step_max_s,
                "max_inflight_s": max_prefill_inflight_s,
            },
            "policies": figures,
        },
        output,
    )
    return 0


def plot_service(results: Sequence[SimResult], path: Path) -> None:
    """Each tenant's normalized service over time, one panel per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(8, 2.6 * len(results)), sharex=True, squeeze=False
    )
    for ax, result in zip(axes[:, 0], results, strict=True):
        weights = {t.tenant_id: t.weight for t in result.trace.tenants}
        for tenant_id, series in result.service.items():
            ax.plot(
                result.sample_times,
                [s / weights[tenant_id] for s in series],
                label=tenant_id
                if weights[tenant_id] == 1
                else f"{tenant_id} (w={weights[tenant_id]:g})",
            )
        ax.axvline(result.trace.duration_s, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{result.policy}", fontsize=10)
        ax.set_ylabel("service / weight")
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("simulated time (s); dotted: arrivals stop")
    fig.suptitle(f"{results[0].trace.scenario}: service over time")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_fit(
    *, engine: str = "default", quick: bool = False, model_path: Path = DEFAULT_MODEL_PATH
) -> int:
    """Measure the engine and write the latency model to ``model_path``."""
    model = fit(engine, quick=quick)
    model.save(model_path)
    log(f"latency model written to {model_path}")
    print_result(
        {
            "latency_model": str(model_path),
            "prefill": [model.prefill_base_s, model.prefill_token_s, model.prefill_attention_s],
            "decode": [model.decode_base_s, model.decode_seq_s, model.decode_context_s],
            "provenance": model.provenance,
        },
        None,
    )
    return 0
