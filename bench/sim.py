"""A deterministic discrete-event simulator of the serving cluster, driving a real scheduling
policy (``gateway.policies.make_policy``) the way ``gateway.dispatch.Dispatcher`` does.

    arrival ─▶ policy.enqueue ──(Shed: rejected)
                  │ schedule pass: Placement / Rejection
                  ▼
    prefill worker (K): chunked prefill, prefix cache ─▶ on_first_token, on_tokens(1)
                  ▼  (KV moves at no cost)
    decode worker (D): continuous batching ─▶ on_tokens(1) per step ─▶ on_finish

What is real and what is modelled:
- Real: the policy object and the gateway's scheduling core (``gateway.core``): the worker
  accounts, views and prefill caps the policy decides on, and what carrying out a decision and
  each step of a request do to them and to the policy, in the dispatcher's order (a decode
  worker without room answers like the real one, and counts as full until one of its requests
  ends). The simulated workers report their load before every pass, exactly. Prompts are real
  token ids and prefix caching is keyed by ``engine.block_manager.block_hashes`` over the
  request's ``cache_salt``, so tenant-scoped hash chains hit exactly when they would. A
  prefill worker orders its chunks with the engine's own function
  (``engine.preemption.prefill_order``).
- Modelled: step times (``bench.latency_model``). A prefill worker runs the engine's step shape:
  chunks of at most ``prefill_chunk_tokens`` per request within a per-step token budget, and
  between steps the most important ready chunks first (``scheduling.md`` §6: highest class
  rank, then lowest tenant counter, then earliest arrival, the counter being the tenant's
  service so far divided by its weight; within a tenant and class the shortest remaining
  prompt first, aged by the steps it waited), admitting waiting requests in that order too, so
  a short prompt does not wait behind a long one (``ClusterSpec.chunk_priority``; off: the
  engine's old FIFO admission, running first). The budget is ``prefill_step_tokens`` (the
  engine's ``max_num_batched_tokens``) or, with ``prefill_step_max_s``, also no more than the
  worker's measured speed computes in that time: a step-time target that holds on any backend
  (``_PrefillWorker.step_token_budget``). Its prefix cache is an LRU over block hashes bounded
  to ``prefix_cache_blocks``, and what it evicts is reported with ``on_evicted``. A decode
  worker holds ``prompt + max_tokens`` KV tokens and a batch slot per request from placement
  to finish, preempts only when a ``MakeRoom`` asks (by recompute: the request goes back to the
  queue with its output so far in its prompt), and decodes every request it holds in one step:
  pure decode steps, as the engine of a disaggregated decode worker runs. It reports the
  latency model's decode line as the engine reports its fitted one
  (``engine.engine_thread.DecodeSpeed``). Requests generate exactly ``max_tokens`` tokens.
- Tenants are open loop (each request at its trace time) or closed loop
  (``TenantSpec.concurrency``: clients that keep that many requests in flight).
- Schedule passes run after every event that frees capacity (a prefill that ends, a decode that
  ends, a requeue) and after an arrival when some worker has room for the smallest prompt of the
  trace; the gateway also runs one after every arrival, but one that cannot place anything
  changes nothing but when a policy's ``Rejection`` comes out.
- At ``duration_s`` the gateway stops taking work: requests still queued are removed from the
  policy (outcome ``unserved``), those placed run to completion.

Service (``scheduling.md`` §1) is recorded per tenant as it happens, in the same units for every
policy: ``w_in`` per computed (uncached) prompt token when its chunk ends, ``w_out`` per output
token. Same seed and trace give the same result, byte for byte.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Literal

from bench.latency_model import LatencyModel
from engine.block_manager import block_hashes
from engine.engine import EngineConfig, step_prompt_tokens
from engine.engine_thread import PREFILL_SPEED_SMOOTHING
from engine.preemption import PrefillCandidate, prefill_order
from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.core import SchedulingCore, WorkerAccount
from gateway.scheduler import (
    ROOM_RETRY_S,
    MakeRoom,
    Placement,
    QueuedRequest,
    Rejection,
    SchedulingPolicy,
    Shed,
    has_prefill_room,
)
from transfer.messages import WorkerInfo, WorkerLoad, WorkerRole

__all__ = [
    "ClusterSpec",
    "Outcome",
    "RequestRecord",
    "SimResult",
    "SimulationError",
    "Simulator",
    "TenantSpec",
    "Trace",
    "TraceRequest",
    "cache_salt",
]

Outcome = Literal["completed", "rejected", "unserved"]

_PREFILL_STEP = 0
_DECODE_STEP = 1
_CLIENT = 2  # a closed-loop tenant's client sends its next request
_TIMER = 3  # a pass is due (a make-room ask or refusal expired)


class SimulationError(RuntimeError):
    """The policy broke the interface (placed a request it does not hold, named an unknown
    worker), or the trace cannot run on the cluster."""


def cache_salt(tenant_id: str) -> bytes:
    """The prefix-cache scope of a tenant, as the gateway derives one per tenant."""
    return f"tenant:{tenant_id}".encode()


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """``concurrency``: a closed-loop tenant, whose clients keep this many requests in flight:
    its requests in the trace go out in trace order, ``concurrency`` at time 0 and one more
    whenever one of them ends (their trace arrival times are ignored). None: open loop, each
    request at its arrival time."""

    tenant_id: str
    weight: float = 1.0
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class TraceRequest:
    request_id: str
    tenant_id: str
    slo_class: str
    arrival: float
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Trace:
    """What arrives: requests sorted by arrival, all before ``duration_s``."""

    scenario: str
    tenants: list[TenantSpec]
    requests: list[TraceRequest]
    duration_s: float


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The simulated workers. Defaults follow the workers' and the gateway's (``--block-size``,
    ``--prefill-chunk-size``, ``--max-num-batched-tokens``, ``max_prefill_inflight_tokens``),
    except the two time caps, off by default (see the module docstring)."""

    num_prefill_workers: int = 2
    num_decode_workers: int = 2
    block_size: int = 16
    prefill_chunk_tokens: int = 512  # the engine's prefill_chunk_size
    prefill_step_tokens: int = 2048  # the engine's max_num_batched_tokens
    # With a value: a prefill step also computes no more than the worker's measured speed does in
    # this many seconds (at least one block).
    prefill_step_max_s: float | None = EngineConfig().max_prefill_step_s
    prefill_max_seqs: int = 64
    prefix_cache_blocks: int = 2048  # per prefill worker: 32k tokens
    max_inflight_tokens: int = 8192  # the gateway's default per prefill worker
    # the gateway's max_prefill_inflight_s (None: no cap)
    max_inflight_s: float | None = SchedulerSection().max_prefill_inflight_s
    decode_kv_tokens: int = 16384  # per decode worker
    decode_max_seqs: int = 64
    chunk_priority: bool = True  # §6 chunk order on the prefill workers (the engine's)

    def __post_init__(self) -> None:
        for name in ("block_size", "prefill_chunk_tokens", "prefill_step_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("prefill_step_max_s", "max_inflight_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; times in simulated seconds."""

    request_id: str
    tenant_id: str
    slo_class: str
    arrival: float
    num_prompt_tokens: int
    max_tokens: int
    outcome: Outcome | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_requeues: int = 0


@dataclass(slots=True)
class SimResult:
    """A run: per request records; per tenant cumulative service (not normalized by weight) at
    ``sample_times``, and whether the tenant had a request queued throughout each interval
    ending at a sample; what was left on the workers at the end (all zero: nothing leaks); the
    prefill steps all workers ran, their busy time and the longest step."""

    policy: str
    trace: Trace
    cluster: ClusterSpec
    records: list[RequestRecord]
    sample_times: list[float]
    service: dict[str, list[float]]
    backlogged: dict[str, list[bool]]
    end_s: float
    num_evicted_blocks: int
    leftover_kv_tokens: int
    leftover_inflight_tokens: int
    leftover_queued: int
    num_prefill_steps: int
    prefill_busy_s: float
    max_prefill_step_s: float


@dataclass(slots=True, eq=False)
class _Job:
    request: QueuedRequest
    record: RequestRecord
    hashes: list[bytes] = field(default_factory=list)
    num_computed: int = 0
    num_registered_blocks: int = 0
    is_admitted: bool = False  # by its prefill worker: it holds its cached prefix
    prefill: _PrefillWorker | None = None
    decode: _DecodeWorker | None = None
    is_decoding: bool = False  # its first token came: it is on its decode worker
    arrival_step: int = 0  # its prefill worker's step count when it arrived there
    arrival_order: int = 0  # the order jobs arrived at prefill workers in (a tie-breaker)


def _kv_tokens(request: QueuedRequest) -> int:
    """KV a request holds on its decode worker: its prompt and every token it will generate
    (a resumed one's prompt includes those it generated before)."""
    return request.num_prompt_tokens + request.max_tokens - request.num_output_tokens


def _worker_info(worker_id: str, role: WorkerRole, cluster: ClusterSpec) -> WorkerInfo:
    return WorkerInfo(
        worker_id,
        instance_id=worker_id,
        role=role,
        model_id="simulated",
        block_size=cluster.block_size,
        num_total_blocks=(
            cluster.decode_kv_tokens if role == "decode" else cluster.prefix_cache_blocks
        )
        // cluster.block_size,
        max_model_len=cluster.decode_kv_tokens,
        vocab_size=0,
        max_num_seqs=cluster.decode_max_seqs if role == "decode" else 0,
    )


class _PrefillWorker:
    """Chunked prefill, with an LRU prefix cache of block hashes. ``plan_step`` takes the
    jobs in priority order (a sort key per job, given by the simulator) or, without one,
    running first then FIFO admission."""

    def __init__(self, index: int, cluster: ClusterSpec) -> None:
        self.index = index
        self.worker_id = f"prefill-{index}"
        self.cluster = cluster
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.waiting: deque[_Job] = deque()
        self.running: list[_Job] = []
        self.step_runs: list[tuple[_Job, int]] = []
        self.step_s = 0.0  # of the step in flight
        # The gateway's account of it (``gateway.core``): whole prompts until their prefill
        # ends, and what it reports.
        self.account = WorkerAccount(info=_worker_info(self.worker_id, "prefill", cluster))
        self.busy_s = 0.0
        self.num_steps = 0
        self.max_step_s = 0.0
        # The engine thread's measure: a moving average of each step's prompt tokens/s.
        self.step_tok_s: float | None = None

    @property
    def is_busy(self) -> bool:
        return bool(self.step_runs)

    def prefill_tok_s(self) -> float | None:
        """What the worker reports to the gateway: the engine thread's moving average."""
        return self.step_tok_s

    def report(self) -> WorkerLoad:
        return WorkerLoad(self.worker_id, "prefill", True, prefill_tok_s=self.step_tok_s or 0.0)

    def step_token_budget(self) -> int:
        """Prompt tokens the next step may compute: ``prefill_step_tokens`` and, with
        ``prefill_step_max_s``, the engine's rule (``engine.engine.step_prompt_tokens``). A
        step of N tokens takes about ``base + N·per_token``, so N = max_s · N/step_s settles
        where a step takes ``max_s``. One difference: before any measurement the engine runs
        its whole token budget, which at the fitted CPU speed is a step of several seconds
        once per worker; here the budget starts at one block and settles from below, so that
        a run's figures do not depend on which prompts happen to come first."""
        budget = self.cluster.prefill_step_tokens
        max_s = self.cluster.prefill_step_max_s
        if max_s is None:
            return budget
        if self.step_tok_s is None:
            return min(budget, self.cluster.block_size)
        return step_prompt_tokens(budget, self.step_tok_s, max_s, self.cluster.block_size)

    def plan_step(
        self, order: Callable[[list[_Job]], list[_Job]] | None = None
    ) -> list[tuple[_Job, int]]:
        """The runs of the next step: with ``order`` (of running and waiting jobs, best
        first), the best ready chunks; else running first, then FIFO admissions."""
        if order is not None:
            return self._plan_in_order(order)
        budget = self.step_token_budget()
        chunk = self.cluster.prefill_chunk_tokens
        runs: list[tuple[_Job, int]] = []
        for job in self.running:
            if budget == 0:
                break
            count = min(job.request.num_prompt_tokens - job.num_computed, chunk, budget)
            runs.append((job, count))
            budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.cluster.prefill_max_seqs:
            job = self.waiting.popleft()
            self._admit(job)
            self.running.append(job)
            count = min(job.request.num_prompt_tokens - job.num_computed, chunk, budget)
            runs.append((job, count))
            budget -= count
        self.step_runs = runs
        return runs

    def _plan_in_order(self, order: Callable[[list[_Job]], list[_Job]]) -> list[tuple[_Job, int]]:
        budget = self.step_token_budget()
        chunk = self.cluster.prefill_chunk_tokens
        num_free_seqs = self.cluster.prefill_max_seqs - len(self.running)
        runs: list[tuple[_Job, int]] = []
        for job in order([*self.running, *self.waiting]):
            if budget == 0:
                break
            if not job.is_admitted:  # waiting: admit it if a sequence slot is free
                if num_free_seqs == 0:
                    continue
                num_free_seqs -= 1
                self.waiting.remove(job)
                self._admit(job)
                self.running.append(job)
            count = min(job.request.num_prompt_tokens - job.num_computed, chunk, budget)
            runs.append((job, count))
            budget -= count
        self.step_runs = runs
        return runs

    def _admit(self, job: _Job) -> None:
        """Take the cached prefix, as ``LLMEngine._admit`` does: a fully cached prompt
        recomputes its last block so there are logits to sample."""
        request = job.request
        job.is_admitted = True
        job.hashes = block_hashes(
            request.prompt_token_ids, self.cluster.block_size, request.cache_salt
        )
        num_cached = 0
        for block_hash in job.hashes:
            if block_hash not in self.cache:
                break
            num_cached += 1
        self._touch(job.hashes[:num_cached])
        if num_cached * self.cluster.block_size >= request.num_prompt_tokens:
            num_cached -= 1
        job.num_computed = num_cached * self.cluster.block_size
        job.num_registered_blocks = num_cached
        job.record.num_cached_tokens = job.num_computed

    def _touch(self, chain: list[bytes]) -> None:
        """Make a chain's blocks the most recent, its prefix the newest: as the engine's LRU
        orders a released chain (``BlockManager.free``), so the tail is evicted before the
        blocks its hash depends on and a pruned chain keeps a usable prefix."""
        for block_hash in reversed(chain):
            self.cache.move_to_end(block_hash)

    def finish_step(self) -> tuple[list[_Job], list[bytes]]:
        """Apply the step's runs: (jobs whose prefill ended, block hashes evicted)."""
        done: list[_Job] = []
        for job, count in self.step_runs:
            job.num_computed += count
            num_full = job.num_computed // self.cluster.block_size
            for block_hash in job.hashes[job.num_registered_blocks : num_full]:
                self.cache[block_hash] = None
                self.cache.move_to_end(block_hash)
            job.num_registered_blocks = max(job.num_registered_blocks, num_full)
            if job.num_computed == job.request.num_prompt_tokens:
                done.append(job)
        num_step_tokens = sum(count for _, count in self.step_runs)
        self.busy_s += self.step_s
        self.num_steps += 1
        self.max_step_s = max(self.max_step_s, self.step_s)
        if self.step_s > 0:
            tok_s = num_step_tokens / self.step_s
            if self.step_tok_s is None:
                self.step_tok_s = tok_s
            else:
                self.step_tok_s += PREFILL_SPEED_SMOOTHING * (tok_s - self.step_tok_s)
        self.step_runs = []
        for job in done:  # its blocks are released, tail first, as the engine frees them
            self._touch(job.hashes[: job.num_registered_blocks])
        if done:
            self.running = [job for job in self.running if job not in done]
        evicted: list[bytes] = []
        while len(self.cache) > self.cluster.prefix_cache_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        return done, evicted


class _DecodeWorker:
    """Continuous batching; KV reserved for a request's whole length at placement."""

    def __init__(self, index: int, cluster: ClusterSpec, model: LatencyModel) -> None:
        self.index = index
        self.worker_id = f"decode-{index}"
        self.cluster = cluster
        self.model = model
        self.reserved_kv_tokens = 0
        # Requests placed here and not finished: each takes a batch slot from its placement
        # (its reservation) on, as on the real worker, where reservations count against
        # ``max_num_seqs`` with the running requests.
        self.num_held = 0
        self.is_full = False  # answered "no room" since a request last ended here
        self.waiting: deque[_Job] = deque()
        self.running: list[_Job] = []
        self.is_busy = False
        self.held: dict[str, _Job] = {}  # placed here and not finished, by request id
        self.account = WorkerAccount(info=_worker_info(self.worker_id, "decode", cluster))

    def free_kv_tokens(self) -> int:
        return 0 if self.is_full else self.cluster.decode_kv_tokens - self.reserved_kv_tokens

    def free_slots(self) -> int:
        return max(0, self.cluster.decode_max_seqs - self.num_held)

    def try_reserve(self, job: _Job) -> bool:
        if (
            _kv_tokens(job.request) > self.cluster.decode_kv_tokens - self.reserved_kv_tokens
            or not self.free_slots()
        ):
            self.is_full = True
            return False
        self.reserved_kv_tokens += _kv_tokens(job.request)
        self.num_held += 1
        self.held[job.request.request_id] = job
        return True

    def release(self, job: _Job) -> None:
        self.reserved_kv_tokens -= _kv_tokens(job.request)
        self.num_held -= 1
        del self.held[job.request.request_id]
        self.is_full = False

    def report(self) -> WorkerLoad:
        """Exact, as of now (the simulator reports before every pass)."""
        return WorkerLoad(
            self.worker_id,
            "decode",
            True,
            num_running=self.num_held,
            num_running_tokens=sum(
                job.request.num_prompt_tokens
                + job.record.num_output_tokens
                - job.request.num_output_tokens
                for job in self.held.values()
            ),
            # The fitted model's line at this batch size (the engine fits one from its steps).
            decode_base_s=self.model.decode_base_s + self.model.decode_seq_s * self.num_held,
            decode_token_s=self.model.decode_context_s,
            num_free_blocks=(self.cluster.decode_kv_tokens - self.reserved_kv_tokens)
            // self.cluster.block_size,
            num_total_blocks=self.cluster.decode_kv_tokens // self.cluster.block_size,
        )

    def plan_step(self) -> int:
        """Admit waiting requests into the batch; the batch's total context."""
        while self.waiting and len(self.running) < self.cluster.decode_max_seqs:
            self.running.append(self.waiting.popleft())
        self.is_busy = bool(self.running)
        return sum(j.request.num_prompt_tokens + j.record.num_output_tokens for j in self.running)


class Simulator:
    """One policy on one trace. ``run`` once; the policy must be fresh."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        trace: Trace,
        cluster: ClusterSpec,
        model: LatencyModel,
        *,
        w_in: float = 1.0,
        w_out: float = 2.0,
        num_samples: int = 500,
        slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
    ) -> None:
        self.policy = policy
        self.core = SchedulingCore(
            policy,
            max_prefill_inflight_tokens=cluster.max_inflight_tokens,
            max_prefill_inflight_s=cluster.max_inflight_s,
        )
        policy.set_block_size(cluster.block_size)
        self.trace = trace
        self.cluster = cluster
        self.model = model
        self.w_in = w_in
        self.w_out = w_out
        self.sample_interval_s = trace.duration_s / num_samples
        self.prefill = [_PrefillWorker(i, cluster) for i in range(cluster.num_prefill_workers)]
        self.decode = [_DecodeWorker(i, cluster, model) for i in range(cluster.num_decode_workers)]
        self._prefill_by_id = {w.worker_id: w for w in self.prefill}
        self._decode_by_id = {w.worker_id: w for w in self.decode}
        self._weights = {t.tenant_id: t.weight for t in trace.tenants}
        self._tenant_index = {t.tenant_id: i for i, t in enumerate(trace.tenants)}
        # Closed-loop tenants: their requests not sent yet, in trace order.
        self._unsent: dict[str, deque[TraceRequest]] = {
            t.tenant_id: deque() for t in trace.tenants if t.concurrency is not None
        }
        for request in trace.requests:
            if request.tenant_id in self._unsent:
                self._unsent[request.tenant_id].append(request)
        self._class_ranks = {c.name: c.rank for c in slo_classes}
        self._tpot_targets = {c.name: c.tpot_target_s for c in slo_classes}
        self._top_class_rank = max(self._class_ranks.values(), default=0)
        self._events: list[tuple[float, int, int, int]] = []  # (time, seq, kind, worker index)
        self._seq = 0
        self._queued: dict[str, _Job] = {}
        self._num_queued = dict.fromkeys(self._weights, 0)
        self._emptied = dict.fromkeys(self._weights, True)
        self._service = dict.fromkeys(self._weights, 0.0)
        self._sample_times: list[float] = []
        self._service_samples: dict[str, list[float]] = {t: [] for t in self._weights}
        self._backlog_samples: dict[str, list[bool]] = {t: [] for t in self._weights}
        self._records: list[RequestRecord] = []
        self._num_evicted = 0
        self._min_prompt_tokens = min((len(r.prompt_token_ids) for r in trace.requests), default=1)
        self._check_trace()

    def _check_trace(self) -> None:
        for request in self.trace.requests:
            if request.tenant_id not in self._weights:
                raise SimulationError(f"request {request.request_id}: unknown tenant")
            if request.slo_class not in self._class_ranks:
                raise SimulationError(
                    f"request {request.request_id}: unknown SLO class {request.slo_class!r}"
                )
            need = len(request.prompt_token_ids) + request.max_tokens
            if need > self.cluster.decode_kv_tokens or request.max_tokens < 1:
                raise SimulationError(
                    f"request {request.request_id} ({need} tokens) cannot run on a decode "
                    f"worker of {self.cluster.decode_kv_tokens} KV tokens"
                )

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> SimResult:
        for tenant in self.trace.tenants:
            self.policy.update_tenant(tenant.tenant_id, tenant.weight)
        arrivals = [r for r in self.trace.requests if r.tenant_id not in self._unsent]
        for tenant in self.trace.tenants:
            for _ in range(tenant.concurrency or 0):
                self._push(0.0, _CLIENT, self._tenant_index[tenant.tenant_id])
        next_arrival = 0
        is_cut = False
        now = 0.0
        while next_arrival < len(arrivals) or self._events:
            arrival_s = arrivals[next_arrival].arrival if next_arrival < len(arrivals) else None
            if self._events and (arrival_s is None or self._events[0][0] < arrival_s):
                now, _, kind, index = heapq.heappop(self._events)
                if not is_cut and now > self.trace.duration_s:
                    self._sample_until(self.trace.duration_s)
                    self._cut(self.trace.duration_s)
                    is_cut = True
                self._sample_until(now)
                if kind == _CLIENT:
                    freed = self._send_next(self.trace.tenants[index].tenant_id, now)
                elif kind == _TIMER:
                    freed = True
                elif kind == _PREFILL_STEP:
                    freed = self._end_prefill_step(self.prefill[index], now)
                else:
                    freed = self._end_decode_step(self.decode[index], now)
                if freed:
                    self._schedule_pass(now)
            else:
                assert arrival_s is not None
                now = arrival_s
                self._sample_until(now)
                self._arrive(arrivals[next_arrival], now)
                next_arrival += 1
                if self._has_room():
                    self._schedule_pass(now)
        if not is_cut:
            self._sample_until(self.trace.duration_s)
            self._cut(max(now, self.trace.duration_s))
        end_s = max(now, self.trace.duration_s)
        self._sample_until(end_s)
        return SimResult(
            policy=self.policy.name,
            trace=self.trace,
            cluster=self.cluster,
            records=self._records,
            sample_times=self._sample_times,
            service=self._service_samples,
            backlogged=self._backlog_samples,
            end_s=end_s,
            num_evicted_blocks=self._num_evicted,
            leftover_kv_tokens=sum(w.reserved_kv_tokens for w in self.decode),
            leftover_inflight_tokens=sum(w.account.inflight_tokens for w in self.prefill)
            + sum(w.account.inflight_tokens for w in self.decode),
            leftover_queued=self.policy.queued(),
            num_prefill_steps=sum(w.num_steps for w in self.prefill),
            prefill_busy_s=sum(w.busy_s for w in self.prefill),
            max_prefill_step_s=max((w.max_step_s for w in self.prefill), default=0.0),
        )

    def _push(self, at: float, kind: int, index: int) -> None:
        heapq.heappush(self._events, (at, self._seq, kind, index))
        self._seq += 1

    def _send_next(self, tenant_id: str, now: float) -> bool:
        """A closed-loop client sends its next request (none after the cut); whether a pass
        should follow."""
        unsent = self._unsent[tenant_id]
        if not unsent or now > self.trace.duration_s:
            return False
        self._arrive(replace(unsent.popleft(), arrival=now), now)
        return self._has_room()

    def _ended(self, record: RequestRecord, now: float) -> None:
        """A request ended (completed or rejected): a closed-loop client sends another."""
        if record.tenant_id in self._unsent:
            self._push(now, _CLIENT, self._tenant_index[record.tenant_id])

    def _arrive(self, spec: TraceRequest, now: float) -> None:
        request = QueuedRequest(
            request_id=spec.request_id,
            tenant_id=spec.tenant_id,
            slo_class=spec.slo_class,
            weight=self._weights[spec.tenant_id],
            arrival=spec.arrival,
            num_prompt_tokens=len(spec.prompt_token_ids),
            max_tokens=spec.max_tokens,
            prompt_token_ids=spec.prompt_token_ids,
            cache_salt=cache_salt(spec.tenant_id),
            rank=self._class_ranks[spec.slo_class],
            tpot_target_s=self._tpot_targets[spec.slo_class],
        )
        record = RequestRecord(
            spec.request_id,
            spec.tenant_id,
            spec.slo_class,
            spec.arrival,
            request.num_prompt_tokens,
            spec.max_tokens,
        )
        self._records.append(record)
        try:
            self.policy.enqueue(request, now)
        except Shed:
            record.outcome, record.finish_s = "rejected", now
            self._ended(record, now)
            return
        self._hold(_Job(request, record))

    def _hold(self, job: _Job) -> None:
        self._queued[job.request.request_id] = job
        self._num_queued[job.request.tenant_id] += 1

    def _release(self, request_id: str) -> _Job:
        job = self._queued.pop(request_id, None)
        if job is None:
            raise SimulationError(f"the policy decided on {request_id}, which it does not hold")
        tenant_id = job.request.tenant_id
        self._num_queued[tenant_id] -= 1
        if self._num_queued[tenant_id] == 0:
            self._emptied[tenant_id] = True
        return job

    def _cut(self, now: float) -> None:
        """The end of the run: what still waits is given up, as the gateway does on timeout."""
        for request_id in list(self._queued):
            job = self._release(request_id)
            self.policy.remove(request_id)
            job.record.outcome, job.record.finish_s = "unserved", now

    # ---- scheduling -----------------------------------------------------------------------

    def _has_room(self) -> bool:
        """Could a pass place anything at all? (Skips passes that are sure to do nothing.)"""
        smallest = self._min_prompt_tokens
        probe = QueuedRequest("", "", "", 1.0, 0.0, smallest, 1, rank=self._top_class_rank)
        return any(
            has_prefill_room(probe, self.core.prefill_view(w.account)) for w in self.prefill
        ) and any(w.free_kv_tokens() > smallest and w.free_slots() for w in self.decode)

    def _report(self) -> None:
        """Every worker reports its load, exactly (the gateway polls; here nothing is stale but
        a decode worker's "no room", kept until one of its requests ends, as the real one's is
        until its next report)."""
        for prefill in self.prefill:
            prefill.account.reported(prefill.report())
        for decode in self.decode:
            decode.account.reported(decode.report())
            if decode.is_full:
                self.core.no_room(decode.account)

    def _schedule_pass(self, now: float) -> None:
        # A requeue wakes the dispatcher again; the worker that said "no room" is then full, so
        # this ends after at most one round per decode worker.
        for _ in range(len(self.decode) + 1):
            if not self._queued:
                return
            self._report()
            decisions = self.core.schedule(
                [w.account for w in self.prefill], [w.account for w in self.decode], now
            )
            num_requeued = 0
            for decision in decisions:
                if isinstance(decision, MakeRoom):
                    # Room made: another pass places the request, as the dispatcher's does
                    # after the answer; either way one when the ask (or refusal) expires.
                    num_requeued += self._make_room(decision, now)
                    self._push(now + ROOM_RETRY_S, _TIMER, 0)
                    continue
                job = self._release(decision.request.request_id)
                if isinstance(decision, Rejection):
                    job.record.outcome, job.record.finish_s = "rejected", now
                    self._ended(job.record, now)
                elif not self._carry_out(decision, job, now):
                    num_requeued += 1
            if num_requeued == 0:
                return

    def _carry_out(self, placement: Placement, job: _Job, now: float) -> bool:
        """Start the request on its workers; False when the decode worker had no room and the
        request went back to the policy."""
        prefill = self._prefill_by_id.get(placement.prefill_worker_id or "")
        decode = self._decode_by_id.get(placement.decode_worker_id)
        if prefill is None or decode is None:
            raise SimulationError(
                f"placement on unknown workers {placement.prefill_worker_id!r}, "
                f"{placement.decode_worker_id!r}"
            )
        request = job.request
        self.core.placed(placement, prefill.account, decode.account)
        if not decode.try_reserve(job):
            # The gateway's path for a decode worker's "no room" (``gateway.generation``): the
            # request ends on both workers with nothing computed, the worker counts as full,
            # and the request goes back to the queue ahead of later arrivals.
            self.core.prefill_done(prefill.account, request, None, now)
            self.core.decode_done(decode.account, request, 0, now, finished=False)
            self.core.no_room(decode.account)
            self.policy.requeue(request, now)
            job.record.num_requeues += 1
            self._hold(job)
            return False
        job.prefill, job.decode = prefill, decode
        job.arrival_step, job.arrival_order = prefill.num_steps, self._seq
        self._seq += 1
        prefill.waiting.append(job)
        if not prefill.is_busy:
            self._start_prefill_step(prefill, now)
        return True

    def _make_room(self, room: MakeRoom, now: float) -> bool:
        """A ``MakeRoom`` on a simulated decode worker: it preempts, by recompute, requests
        decoding there of a lower class than the one it is asked for (least important first:
        lowest rank, then highest tenant counter, then latest arrival) until the KV and a batch
        slot are free. A preempted request goes back to the queue with its prompt and the
        tokens generated so far, as the gateway requeues what a worker hands back."""
        worker = self._decode_by_id[room.decode_worker_id]
        self.core.room_asked(worker.account)
        rank = room.request.rank
        victims = sorted(
            (job for job in worker.held.values() if job.request.rank < rank and job.is_decoding),
            key=lambda job: (
                job.request.rank,
                -self.policy.counter(job.request.tenant_id),
                -job.request.arrival,
            ),
        )
        num_preempted = 0
        for job in victims:
            if worker.free_kv_tokens() >= room.num_tokens and worker.free_slots():
                break
            self._preempt(worker, job, now)
            num_preempted += 1
        has_room = worker.free_kv_tokens() >= room.num_tokens and bool(worker.free_slots())
        self.core.room_answered(worker.account, room, num_preempted > 0 or has_room, now)
        return num_preempted > 0 or has_room

    def _preempt(self, worker: _DecodeWorker, job: _Job, now: float) -> None:
        request, record = job.request, job.record
        if job in worker.running:
            worker.running.remove(job)
        else:
            worker.waiting.remove(job)
        worker.release(job)
        self.core.decode_done(
            worker.account, request, record.num_output_tokens, now, finished=False
        )
        generated = record.num_output_tokens - request.num_output_tokens
        # The output so far joins the prompt (its ids do not matter: no one shares them).
        resumed = replace(
            request,
            num_prompt_tokens=request.num_prompt_tokens + generated,
            prompt_token_ids=[*request.prompt_token_ids, *range(generated)],
            num_output_tokens=record.num_output_tokens,
        )
        job.request = resumed
        job.hashes, job.num_computed, job.num_registered_blocks = [], 0, 0
        job.is_admitted, job.is_decoding = False, False
        job.prefill = job.decode = None
        record.num_requeues += 1
        self.policy.requeue(resumed, now)
        self._hold(job)

    # ---- workers --------------------------------------------------------------------------

    def _chunk_order(self, worker: _PrefillWorker, jobs: list[_Job]) -> list[_Job]:
        """§6, the engine's own order (``engine.preemption.prefill_order``): highest class rank,
        then lowest tenant counter (its service so far over its weight), then earliest arrival;
        and within a tenant and class the shortest remaining prompt first, aged by the steps it
        has waited at the worker."""
        candidates = [
            PrefillCandidate(
                tenant=job.request.cache_salt,
                rank=job.request.rank,
                counter=self._service[job.request.tenant_id] / self._weights[job.request.tenant_id],
                arrival=job.request.arrival,
                num_remaining_tokens=job.request.num_prompt_tokens - job.num_computed,
                num_waited_steps=worker.num_steps - job.arrival_step,
                arrival_order=job.arrival_order,
            )
            for job in jobs
        ]
        return [jobs[i] for i in prefill_order(candidates, worker.step_token_budget())]

    def _start_prefill_step(self, worker: _PrefillWorker, now: float) -> None:
        order = partial(self._chunk_order, worker) if self.cluster.chunk_priority else None
        runs = worker.plan_step(order)
        if not runs:
            return
        num_tokens = sum(count for _, count in runs)
        attention = sum(count * (job.num_computed + count) for job, count in runs)
        worker.step_s = self.model.prefill_step_s(num_tokens, attention)
        self._push(now + worker.step_s, _PREFILL_STEP, worker.index)

    def _end_prefill_step(self, worker: _PrefillWorker, now: float) -> bool:
        for job, count in worker.step_runs:
            self._service[job.request.tenant_id] += self.w_in * count
        done, evicted = worker.finish_step()
        if evicted:
            self._num_evicted += len(evicted)
            self.policy.on_evicted(worker.worker_id, evicted)
        for job in done:
            self._first_token(job, worker, now)
        self._start_prefill_step(worker, now)
        return bool(done)

    def _first_token(self, job: _Job, worker: _PrefillWorker, now: float) -> None:
        request, record = job.request, job.record
        self.core.prefill_done(worker.account, request, record.num_cached_tokens, now)
        if record.first_token_s is None:  # (a resumed request's first token came before)
            record.first_token_s = now
        self._generated(job, now)
        if record.outcome is None:
            assert job.decode is not None
            job.is_decoding = True
            job.decode.waiting.append(job)
            if not job.decode.is_busy:
                self._start_decode_step(job.decode, now)

    def _generated(self, job: _Job, now: float) -> None:
        """One more output token for ``job``; it finishes at ``max_tokens``."""
        request, record = job.request, job.record
        record.num_output_tokens += 1
        self._service[request.tenant_id] += self.w_out
        self.core.tokens_generated(request, 1, now)
        if record.num_output_tokens == request.max_tokens:
            assert job.decode is not None
            job.decode.release(job)
            self.core.decode_done(job.decode.account, request, record.num_output_tokens, now)
            record.outcome, record.finish_s = "completed", now
            self._ended(record, now)

    def _start_decode_step(self, worker: _DecodeWorker, now: float) -> None:
        num_context_tokens = worker.plan_step()
        if worker.running:
            seconds = self.model.decode_step_s(len(worker.running), num_context_tokens)
            self._push(now + seconds, _DECODE_STEP, worker.index)

    def _end_decode_step(self, worker: _DecodeWorker, now: float) -> bool:
        for job in worker.running:
            self._generated(job, now)
        num_running = len(worker.running)
        worker.running = [job for job in worker.running if job.record.outcome is None]
        self._start_decode_step(worker, now)
        return len(worker.running) < num_running

    # ---- samples --------------------------------------------------------------------------

    def _sample_until(self, now: float) -> None:
        """Record the samples due at or before ``now`` (service changes only at events)."""
        next_s = len(self._sample_times) * self.sample_interval_s
        while next_s <= now:
            self._sample_times.append(next_s)
            for tenant_id, service in self._service.items():
                self._service_samples[tenant_id].append(service)
                queued = self._num_queued[tenant_id]
                self._backlog_samples[tenant_id].append(queued > 0 and not self._emptied[tenant_id])
                self._emptied[tenant_id] = queued == 0
            next_s = len(self._sample_times) * self.sample_interval_s
