"""Does the simulator model the real stack? The same short trace (``bench.scenarios``:
``weighted`` and ``overload`` by default) run through (i) the real stack with the tiny model,
replaying the trace's arrival times and prompts with an open-loop client, and (ii) the simulator
(``bench.sim``, through ``bench.sched_bench.run_policy``) with a latency model fitted to the tiny
model, per policy; per-tenant service shares from both, and the largest difference in
percentage points (the target is 5).

**The same measure on both sides.** A tenant's service is ``w_in`` × computed (uncached) prompt
tokens + ``w_out`` × completion tokens of its requests that completed within the trace's
duration, attributed to the moment they completed (``bench.tenant_load``); its share is that
over all tenants'. On the real stack that is each answer's ``usage``; in the simulator each
completed ``RequestRecord``. Both cut at the same time and count the same way, so what a
request in progress at the cut does to the figure, it does to both.

**The real run.** A fresh stack per (scenario, policy): the tiny model, ``num_prefill_workers``
prefill workers and one decode worker, the gateway's load guard off (``bench.fairness_bench``:
on a small machine it refuses from CPU contention, which the simulator does not model). Each
trace request is sent at its arrival time as a non-streamed ``/v1/completions`` of its prompt
token ids and ``max_tokens``; a refusal (429/503) is counted, not retried (the simulator's
arrivals are not retried either). At the end of the trace whatever is still in flight is
cancelled. The simulated cluster is read from the real workers (``/v1/info``: KV blocks, block
size, sequence limits), with the gateway's and engine's other defaults.

**The latency model.** ``latency_model_tiny.json`` beside this file: ``bench.latency_model.fit``
on the tiny model with one torch thread, which is what each worker of a 3-worker stack on two
cores runs (``deploy.stack.StackConfig.worker_threads``); ``refit=True`` measures it again. The
traces' rates come from it (``overload`` × its capacity). A real stack is slower than its
engines' steps alone: the gateway, the HTTP calls, the KV transfers and the load generator
share the same cores (on a 2-core machine the real stack served about a fifth of what the
fitted model does). So the simulator's speed is then fitted to each real run, one factor for
all six coefficients (``LatencyModel.scaled``), such that both serve the same total within the
trace; the shares, which the figure compares, stay free. The report gives that factor, and the
simulator's shares at the speed of the fit alone as well (``sim_as_fitted``).

Known difference the figure includes: the tiny model may end a completion before
``max_tokens`` (an end-of-sequence token); the simulator always generates ``max_tokens``. The
report gives the real mean completion length so that it can be told apart.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec

from bench.fairness_bench import start_fairness_stack
from bench.latency_model import LatencyModel, fit
from bench.report import log
from bench.scenarios import SCENARIOS, build_trace
from bench.sched_bench import run_policy
from bench.sim import ClusterSpec, SimResult, Trace
from bench.tenant_load import (
    Completion,
    LoadRun,
    Sender,
    StackAccess,
    completion_body,
    create_tenants,
    service_by_tenant,
)
from deploy.stack import Stack
from transfer.messages import WorkerInfo

__all__ = [
    "TINY_MODEL_PATH",
    "cluster_of",
    "fit_tiny_model",
    "max_share_diff_pp",
    "replay_trace",
    "run_fidelity_bench",
    "service_shares",
    "sim_completions",
]

TINY_MODEL_PATH = Path(__file__).with_name("latency_model_tiny.json")
W_IN, W_OUT = 1.0, 2.0  # scheduling.md §1, the gateway's and the simulator's defaults
# Fitting the simulator's speed to a real run: service within the trace grows with the speed
# (in proportion, while the cluster is overloaded), so a few multiplicative steps settle it.
CALIBRATION_ROUNDS = 4
CALIBRATION_TOLERANCE = 0.03


def fit_tiny_model(path: Path = TINY_MODEL_PATH) -> LatencyModel:
    """Measure the tiny model's engine steps with one torch thread (a worker's share of two
    cores, see the module docstring) and write the model to ``path``. The quick set of steps:
    the full one has 3072-token prompts, past the tiny model's 2048-token context."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fit("tiny", quick=True)
    finally:
        torch.set_num_threads(threads)
    model.save(path)
    return model


def service_shares(services: Mapping[str, float]) -> dict[str, float]:
    """Each tenant's fraction of the total; all zero when nobody was served."""
    total = sum(services.values())
    return {tenant: (value / total if total else 0.0) for tenant, value in services.items()}


def max_share_diff_pp(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """The largest |a − b| over the tenants of either, in percentage points (a missing tenant's
    share is 0)."""
    return max((abs(a.get(t, 0.0) - b.get(t, 0.0)) * 100 for t in {*a, *b}), default=0.0)


def sim_completions(result: SimResult) -> list[Completion]:
    """The simulated requests that completed, as the real run records its answers."""
    return [
        Completion(
            r.tenant_id,
            r.arrival,
            r.finish_s,
            r.num_prompt_tokens,
            r.num_cached_tokens,
            r.num_output_tokens,
        )
        for r in result.records
        if r.outcome == "completed" and r.finish_s is not None
    ]


def _shares(completions: Iterable[Completion], trace: Trace) -> dict[str, float]:
    services = service_by_tenant(
        list(completions),
        0.0,
        trace.duration_s,
        weights=dict.fromkeys((t.tenant_id for t in trace.tenants), 1.0),
        w_in=W_IN,
        w_out=W_OUT,
    )
    return service_shares(services)


async def replay_trace(access: StackAccess, trace: Trace) -> LoadRun:
    """Create the trace's tenants with their weights, send every request at its arrival time
    (open loop, no retries), and cancel what is still in flight at the trace's end."""
    keys, model = await create_tenants(access, {t.tenant_id: t.weight for t in trace.tenants})
    sender = Sender(access, keys, time.perf_counter())
    tasks: list[asyncio.Task[bool]] = []
    try:
        for request in trace.requests:
            await asyncio.sleep(max(0.0, request.arrival - sender.now()))
            body = completion_body(model, request.prompt_token_ids, request.max_tokens)
            tasks.append(
                asyncio.create_task(sender.send(request.tenant_id, "/v1/completions", body))
            )
        await asyncio.sleep(max(0.0, trace.duration_s - sender.now()))
        for task in tasks:
            if task.done():
                task.result()  # a request's error (not a refusal) is the run's
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sender.close()
    return sender.run


def cluster_of(stack: Stack) -> ClusterSpec:
    """The simulated cluster that matches ``stack``'s workers (their ``/v1/info``); the rest
    are the engine's and the gateway's defaults, as ``ClusterSpec``'s."""
    infos = [
        (worker.spec.role, _info(worker.http_url))
        for worker in stack.workers
        if worker.spec.role in ("prefill", "decode")
    ]
    prefill = [info for role, info in infos if role == "prefill"]
    decode = [info for role, info in infos if role == "decode"]
    block_size = prefill[0].block_size
    return replace(
        ClusterSpec(),
        num_prefill_workers=len(prefill),
        num_decode_workers=len(decode),
        block_size=block_size,
        prefill_max_seqs=min(i.max_num_seqs or 64 for i in prefill),
        prefix_cache_blocks=min(i.num_total_blocks for i in prefill),
        decode_kv_tokens=min(i.num_total_blocks for i in decode) * block_size,
        decode_max_seqs=min(i.max_num_seqs or 64 for i in decode),
    )


def _info(url: str) -> WorkerInfo:
    response = httpx.get(url + "/v1/info", timeout=10.0)
    response.raise_for_status()
    return msgspec.msgpack.decode(response.content, type=WorkerInfo)


def _real_run(
    policy: str, num_prefill_workers: int, trace_for: Callable[[ClusterSpec], Trace]
) -> tuple[LoadRun, ClusterSpec, Trace]:
    """A fresh stack; the trace for its cluster (``trace_for``); the replay."""
    with tempfile.TemporaryDirectory(prefix="fairgate-fidelity-") as state_dir:
        stack = start_fairness_stack(Path(state_dir), policy, num_prefill_workers)
        try:
            cluster = cluster_of(stack)
            trace = trace_for(cluster)
            log(f"fidelity: {trace.scenario}, {policy}: {len(trace.requests)} requests, real stack")
            run = asyncio.run(replay_trace(StackAccess(stack.base_url, stack.admin_token), trace))
        finally:
            stack.stop()
    return run, cluster, trace


def _trace_maker(
    scenario: str, model: LatencyModel, *, seed: int, duration_s: float, overload: float
) -> tuple[dict[ClusterSpec, Trace], Callable[[ClusterSpec], Trace]]:
    """The scenario's trace for a cluster, built once per cluster: every policy's stack has the
    same workers, so one cluster, the same rates and the same arrivals (the dict tells)."""
    traces: dict[ClusterSpec, Trace] = {}

    def trace_for(cluster: ClusterSpec) -> Trace:
        if cluster not in traces:
            traces[cluster] = build_trace(
                SCENARIOS[scenario],
                model,
                cluster,
                seed=seed,
                duration_s=duration_s,
                overload=overload,
            )
        return traces[cluster]

    return traces, trace_for


def _sim_side(
    policy: str, trace: Trace, cluster: ClusterSpec, model: LatencyModel
) -> dict[str, Any]:
    result, _ = run_policy(policy, trace, cluster, model)
    return _side(sim_completions(result), trace)


def _calibrated_sim(
    policy: str, trace: Trace, cluster: ClusterSpec, model: LatencyModel, real_service: float
) -> tuple[dict[str, Any], float]:
    """The simulator's side with the model's speed fitted to the real run: the speedup
    (``LatencyModel.scaled``) under which the simulator serves as much in all as the real
    stack did (see the module docstring), and its figures at that speed."""
    speedup = 1.0
    side = _sim_side(policy, trace, cluster, model)
    for _ in range(CALIBRATION_ROUNDS):
        if not side["service"] or not real_service:
            break
        ratio = real_service / side["service"]
        if abs(ratio - 1) <= CALIBRATION_TOLERANCE:
            break
        speedup *= ratio
        side = _sim_side(policy, trace, cluster, model.scaled(speedup))
    return side, speedup


def _side(completions: list[Completion], trace: Trace) -> dict[str, Any]:
    in_time = [c for c in completions if c.finished_s < trace.duration_s]
    return {
        "service": sum(c.service(W_IN, W_OUT) for c in in_time),
        "service_share": {t: round(s, 4) for t, s in _shares(in_time, trace).items()},
        "completed": len(in_time),
        "mean_completion_tokens": round(
            sum(c.completion_tokens for c in in_time) / max(1, len(in_time)), 1
        ),
    }


def run_fidelity_bench(
    *,
    scenarios: Iterable[str] = ("weighted", "overload"),
    policies: Iterable[str] = ("vtc", "dlpm", "d2lpm"),
    duration_s: float = 40.0,
    num_prefill_workers: int = 2,
    overload: float = 2.0,
    seed: int = 0,
    model_path: Path = TINY_MODEL_PATH,
    refit: bool = False,
) -> dict[str, Any]:
    """Every (scenario, policy) on the real stack and in the simulator; see the module
    docstring. Per pair: both sides' shares, ``max_share_diff_pp``, and what the real run was
    refused; overall ``max_share_diff_pp`` and whether it is within ``target_pp``."""
    model = fit_tiny_model(model_path) if refit else LatencyModel.load(model_path)
    result: dict[str, Any] = {
        "engine": "tiny",
        "latency_model": model.provenance,
        "duration_s": duration_s,
        "overload": overload,
        "seed": seed,
        "target_pp": 5.0,
        "scenarios": {},
    }
    worst = 0.0
    for scenario_name in scenarios:
        figures: dict[str, Any] = {}
        traces, trace_for = _trace_maker(
            scenario_name, model, seed=seed, duration_s=duration_s, overload=overload
        )
        for policy in policies:
            run, cluster, trace = _real_run(policy, num_prefill_workers, trace_for)
            log(f"fidelity: {scenario_name}, {policy}: simulator")
            real = _side(run.completions, trace)
            fitted = _sim_side(policy, trace, cluster, model)
            sim, speedup = _calibrated_sim(policy, trace, cluster, model, real["service"])
            diff = max_share_diff_pp(real["service_share"], sim["service_share"])
            worst = max(worst, diff)
            figures[policy] = {
                "real": real | {"refused": sum(run.refused.values())},
                "sim": sim | {"speedup": round(speedup, 3)},
                "sim_as_fitted": fitted,
                "max_share_diff_pp": round(diff, 2),
                "max_share_diff_pp_as_fitted": round(
                    max_share_diff_pp(real["service_share"], fitted["service_share"]), 2
                ),
            }
            log(
                f"fidelity: {scenario_name}, {policy}: real {real['service_share']}, "
                f"sim {sim['service_share']}: {diff:.1f} pp"
            )
        if len(traces) > 1:
            raise RuntimeError(f"{scenario_name}: the stacks' workers differed between runs")
        trace = next(iter(traces.values()))
        result["scenarios"][scenario_name] = {
            "num_requests": len(trace.requests),
            "weights": {t.tenant_id: t.weight for t in trace.tenants},
            "cluster": {
                "num_prefill_workers": cluster.num_prefill_workers,
                "num_decode_workers": cluster.num_decode_workers,
                "decode_kv_tokens": cluster.decode_kv_tokens,
                "decode_max_seqs": cluster.decode_max_seqs,
                "prefix_cache_blocks": cluster.prefix_cache_blocks,
            },
            "policies": figures,
        }
    result["max_share_diff_pp"] = round(worst, 2)
    result["within_target"] = worst <= result["target_pp"]
    return result
