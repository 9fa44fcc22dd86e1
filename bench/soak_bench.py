"""``fairgate bench soak``: many requests from many tenants through the whole stack while workers
are killed and restarted. Nothing may be lost, nothing may fail, and the usage ledger must agree
with what the clients received (issue 18, ``faults.md``'s "soaks are benchmarks").

The stack is ``fairgate up``'s code on the null engine (``bench.null_stack.NULL_ENGINE_ENV``):
``num_prefill_workers`` + ``num_decode_workers`` workers kept up by ``deploy.supervisor`` as
``fairgate up`` keeps them, the gateway, and ``num_tenants`` tenants made through the admin API.
``concurrency`` clients (httpx) send ``num_requests`` completions of ``prompt_tokens`` random
token ids (no prefix-cache hits), each with a random ``max_tokens``; a ``stream_fraction`` are
streamed with ``stream_options.include_usage``; the clients of a ``disconnect_fraction`` leave on
purpose: a stream after a random number of text events, an unstreamed request after a random part
of the recent latency. Once ``kill_at[i]`` of the requests have been sent, a worker of role
``kill_roles[i]`` gets SIGKILL; the supervisor starts it again, and the bench notes when the
gateway has the new process ready (the next kill waits for that).

Each request ends as ``completed`` (200 with its usage: the body's, or a stream's usage event then
``[DONE]``), ``disconnected`` (its client left), ``error_status`` (any other status),
``stream_error`` (an in-band error event) or ``lost`` (no answer within ``request_timeout_s``, a
connection that failed, a stream cut without ``[DONE]`` or an error event, a 200 without usage).
The result's booleans, each of which must hold for exit status 0: ``zero_lost``; ``zero_5xx`` (no
status >= 500, no error event; until requests migrate off a killed worker the ones on it fail:
``errors`` lists the failures with their times, and ``num_5xx_outside_kills`` counts those
outside [a kill, its worker ready again + ``KILL_MARGIN_S``]); ``zero_4xx`` (the tenants have no
quotas and every request is valid: a 429 is the gateway refusing work it should have done);
``workers_back`` (each killed worker was ready again in the gateway within ``BACK_TIMEOUT_S``);
``usage_matches``.

**What "the ledger equals the clients' counts" can mean exactly.** The README's billing rule: an
answer that went out whole is billed its usage; a request that ended otherwise is billed its
prompt and the completion tokens up to the last text event its stream *sent*, and nothing when no
text went out. A client that leaves cannot know what was sent after the last event it read (in
flight, or in its socket buffer), nor whether an unstreamed answer went out as it gave up. So per
tenant, with ``P`` the prompt's tokens (the same for every request) and the ledger's ``R``
requests:

- *known*: completed (the client holds the usage); billed nothing for certain (a non-200
  answer; a stream that ended with its error event and no text before it).
- *billed*, amount bounded: a stream that had text read and ended without its usage (its client
  left, an error event, a cut): its prompt, and between the text events read (each carries at
  least one token) and its ``max_tokens``.
- *maybe*: an unstreamed request whose client left or got nothing, a stream cut before any text:
  nothing, or its prompt and at most ``max_tokens``.

``usage_matches`` is, for every tenant: (1) completed + billed <= R <= completed + billed + maybe;
(2) the ledger's prompt tokens == P × R, exactly, and every completed request reported P;
(3) the ledger's completion tokens lie in [Σ completed's + Σ billed's text events, Σ completed's
+ Σ (billed + maybe) ``max_tokens``]; (4) its cached tokens in [Σ completed's, that + P × (R −
completed)]; (5) its three token sums equal the gateway's own counters
(``fairgate_*_tokens_total``): no usage record lost or written twice between the request's end and
SQLite. Without client disconnects and failures the bounds close: (1)-(4) are equalities.

The last stdout line is the JSON result; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.null_stack import NULL_ENGINE_ENV, log_counts, read_metrics, requests_by_outcome
from bench.report import log, print_result
from bench.tenant_load import StackAccess, create_tenants
from deploy.stack import Stack, StackConfig, start_stack
from deploy.supervisor import RestartPolicy, Supervisor

__all__ = [
    "RequestOutcome",
    "RequestSpec",
    "SoakPlan",
    "add_arguments",
    "is_success",
    "main",
    "plan_of",
    "plan_requests",
    "reconcile",
    "run",
    "run_soak_bench",
]

Role = Literal["prefill", "decode"]
OutcomeKind = Literal["completed", "disconnected", "error_status", "stream_error", "lost"]

READY_TIMEOUT_S = 120.0  # for a worker (first start or restart) to be ready
BACK_TIMEOUT_S = 60.0  # from a kill until the gateway has the new process ready
SETTLE_TIMEOUT_S = 30.0  # after the load, for the gateway to end every request it holds
KILL_MARGIN_S = 2.0  # failures this long after a worker is back still count as the kill's
POLL_S = 0.1
PROGRESS_S = 5.0
MAX_LISTED = 500  # failures listed one by one in the result
FIRST_LATENCY_S = 0.05  # an unstreamed client's patience before any request completed
DECODE_STEP_ENV = "FAIRGATE_NULL_DECODE_STEP_S"  # ``engine.loader``'s, without torch


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """What one run sends and breaks (module docstring)."""

    num_requests: int = 20_000
    num_tenants: int = 8
    concurrency: int = 64
    prompt_tokens: int = 32
    min_tokens: int = 8  # each request's max_tokens: uniform in [min_tokens, max_tokens]
    max_tokens: int = 64
    stream_fraction: float = 0.5
    disconnect_fraction: float = 0.05
    kill_at: tuple[float, ...] = (0.3, 0.6)  # fractions of the requests sent
    kill_roles: tuple[Role, ...] = ("decode", "prefill")
    num_prefill_workers: int = 2
    num_decode_workers: int = 2
    request_timeout_s: float = 60.0
    # The clients start one by one over this long: a herd of cold connections at once is the
    # overload bench's case (64 at once got six 503 ``overloaded`` in the first half second).
    ramp_s: float = 2.0
    # The null engine's decode step: slow enough that a request is still being generated when
    # its client leaves (at NULL_ENGINE_ENV's 0.5 ms the gateway saw 3 of 80 such clients go
    # before their answer had gone out; at 5 ms, 18 of 18 in a small run), fast enough never
    # to be the limit.
    decode_step_s: float = 0.005
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.num_tenants < 1 or self.concurrency < 1:
            raise ValueError("requests, tenants and concurrency must be at least 1")
        if not 1 <= self.min_tokens <= self.max_tokens or self.prompt_tokens < 1:
            raise ValueError("need 1 <= min_tokens <= max_tokens and prompt_tokens >= 1")
        if not (0 <= self.stream_fraction <= 1 and 0 <= self.disconnect_fraction <= 1):
            raise ValueError("stream and disconnect fractions must be in [0, 1]")
        if len(self.kill_at) != len(self.kill_roles):
            raise ValueError("--kill-at and --kill-roles must name as many kills")
        if any(not 0 < f < 1 for f in self.kill_at) or list(self.kill_at) != sorted(self.kill_at):
            raise ValueError("--kill-at: increasing fractions strictly between 0 and 1")
        if self.num_prefill_workers < 1 or self.num_decode_workers < 1:
            raise ValueError("at least one prefill and one decode worker")
        if self.ramp_s < 0 or self.decode_step_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("ramp_s must be >= 0, decode_step_s and request_timeout_s > 0")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request, decided before the run. A client that leaves does so after
    ``leave_after_events`` text events (streams) or ``leave_after_latency`` × the recent
    latency of completed unstreamed requests (unstreamed); None: it stays."""

    tenant: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    stream: bool
    leave_after_events: int | None = None
    leave_after_latency: float | None = None


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """How one request ended, as its client saw it. ``detail``: ``"503 no_worker"``, an error
    event's code, ``client_timeout``, an exception's name; ``usage``: (prompt, cached,
    completion) tokens when completed; ``ended_s``: seconds from the load's start."""

    tenant: str
    stream: bool
    max_tokens: int
    kind: OutcomeKind
    ended_s: float
    detail: str = ""
    status: int | None = None
    num_text_events: int = 0
    usage: tuple[int, int, int] | None = None

    @property
    def is_5xx(self) -> bool:
        return self.kind == "stream_error" or (self.status is not None and self.status >= 500)


def plan_requests(plan: SoakPlan) -> list[RequestSpec]:
    """Every request of the run, from the plan's seed."""
    rng = random.Random(plan.seed)
    specs: list[RequestSpec] = []
    for _ in range(plan.num_requests):
        max_tokens = rng.randint(plan.min_tokens, plan.max_tokens)
        stream = rng.random() < plan.stream_fraction
        leaves = rng.random() < plan.disconnect_fraction
        specs.append(
            RequestSpec(
                tenant=_tenant(rng.randrange(plan.num_tenants)),
                prompt_token_ids=tuple(
                    rng.randrange(1000, 40000) for _ in range(plan.prompt_tokens)
                ),
                max_tokens=max_tokens,
                stream=stream,
                leave_after_events=rng.randint(1, max(1, max_tokens // 2))
                if leaves and stream
                else None,
                leave_after_latency=rng.uniform(0.1, 1.0) if leaves and not stream else None,
            )
        )
    return specs


def _tenant(index: int) -> str:
    return f"soak-{index}"


# ---- the clients ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Read:
    """What a client has read of its answer so far (kept when the request is cut short)."""

    num_text_events: int = 0
    usage: tuple[int, int, int] | None = None
    error_code: str | None = None
    is_done: bool = False


def _usage_of(usage: dict[str, Any]) -> tuple[int, int, int]:
    details = usage.get("prompt_tokens_details") or {}
    return usage["prompt_tokens"], details.get("cached_tokens") or 0, usage["completion_tokens"]


def _error_code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"].get("code") or "error")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "not_json"


class _Clients:
    """Sends the requests, ``concurrency`` at a time, and keeps their outcomes."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        keys: dict[str, str],
        model: str,
        plan: SoakPlan,
        specs: list[RequestSpec],
    ) -> None:
        self.http = http
        self.keys = keys
        self.model = model
        self.plan = plan
        self.specs = specs
        self.origin = time.perf_counter()
        self.num_started = 0
        self.outcomes: list[RequestOutcome] = []
        self._latencies_s: list[float] = []  # the last unstreamed completions'

    def now(self) -> float:
        return time.perf_counter() - self.origin

    async def run(self) -> None:
        step_s = self.plan.ramp_s / self.plan.concurrency
        await asyncio.gather(*(self._loop(i * step_s) for i in range(self.plan.concurrency)))

    async def _loop(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        while self.num_started < len(self.specs):
            spec = self.specs[self.num_started]
            self.num_started += 1
            self.outcomes.append(await self._send(spec))

    async def _send(self, spec: RequestSpec) -> RequestOutcome:
        read = _Read()
        kind: OutcomeKind
        status: int | None = None
        try:
            async with asyncio.timeout(self.plan.request_timeout_s):
                if spec.stream:
                    kind, status, detail = await self._streamed(spec, read)
                else:
                    kind, status, detail = await self._unstreamed(spec, read)
        except TimeoutError:
            kind, detail = "lost", "client_timeout"
        except httpx.TransportError as exc:
            kind, detail = "lost", type(exc).__name__
        return RequestOutcome(
            tenant=spec.tenant,
            stream=spec.stream,
            max_tokens=spec.max_tokens,
            kind=kind,
            ended_s=round(self.now(), 3),
            detail=detail,
            status=status,
            num_text_events=read.num_text_events,
            usage=read.usage if kind == "completed" else None,
        )

    def _request(self, spec: RequestSpec) -> tuple[bytes, dict[str, str]]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": list(spec.prompt_token_ids),
            "max_tokens": spec.max_tokens,
            "temperature": 0,
        }
        if spec.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {
            "authorization": f"Bearer {self.keys[spec.tenant]}",
            "content-type": "application/json",
        }
        return json.dumps(body).encode(), headers

    async def _unstreamed(
        self, spec: RequestSpec, read: _Read
    ) -> tuple[OutcomeKind, int | None, str]:
        body, headers = self._request(spec)
        patience_s = None
        if spec.leave_after_latency is not None:
            recent = self._latencies_s[-100:]
            patience_s = spec.leave_after_latency * (
                statistics.median(recent) if recent else FIRST_LATENCY_S
            )
        started = time.perf_counter()
        try:
            # Leaving is cancelling: httpx closes the connection, as a client that gives up does.
            async with asyncio.timeout(patience_s) as patience:
                response = await self.http.post("/v1/completions", content=body, headers=headers)
        except TimeoutError:
            if patience.expired():
                return "disconnected", None, ""
            raise
        if response.status_code != 200:
            code = _error_code(response.content)
            return "error_status", response.status_code, f"{response.status_code} {code}"
        usage = response.json().get("usage")
        if not usage:
            return "lost", 200, "answer_without_usage"
        read.usage = _usage_of(usage)
        self._latencies_s.append(time.perf_counter() - started)
        del self._latencies_s[:-100]
        return "completed", 200, ""

    async def _streamed(
        self, spec: RequestSpec, read: _Read
    ) -> tuple[OutcomeKind, int | None, str]:
        body, headers = self._request(spec)
        async with self.http.stream(
            "POST", "/v1/completions", content=body, headers=headers
        ) as response:
            status = response.status_code
            if status != 200:
                code = _error_code(await response.aread())
                return "error_status", status, f"{status} {code}"
            async for line in response.aiter_lines():
                if self._on_line(line, read) and read.num_text_events == spec.leave_after_events:
                    # Leaving the block closes the connection with the rest of the stream unread.
                    return "disconnected", status, ""
        if read.error_code is not None:
            return "stream_error", status, read.error_code
        if not read.is_done:
            return "lost", status, "stream_cut"
        if read.usage is None:
            return "lost", status, "stream_without_usage"
        return "completed", status, ""

    @staticmethod
    def _on_line(line: str, read: _Read) -> bool:
        """Note one line of the stream; True when it was an event with text."""
        if not line.startswith("data: "):
            return False  # the blank line after each event, and comments (keep-alives)
        data = line[len("data: ") :]
        if data == "[DONE]":
            read.is_done = True
            return False
        event = json.loads(data)
        if event.get("error"):
            read.error_code = str(event["error"].get("code") or "error")
            return False
        if event.get("usage"):
            read.usage = _usage_of(event["usage"])
        has_text = any(choice.get("text") for choice in event.get("choices") or [])
        read.num_text_events += has_text
        return has_text


# ---- killing workers -------------------------------------------------------------------------


@dataclass(slots=True)
class _Kill:
    role: Role
    index: int  # in stack.workers
    pid: int
    at_request: int
    killed_s: float
    back_s: float | None = None  # when the gateway had the new process ready

    def covers(self, t: float) -> bool:
        end = self.back_s if self.back_s is not None else float("inf")
        return self.killed_s <= t <= end + KILL_MARGIN_S


async def _kill_workers(
    stack: Stack, admin: httpx.AsyncClient, clients: _Clients, plan: SoakPlan
) -> list[_Kill]:
    """Each planned kill once its share of the requests has been sent, the next one after the
    gateway has the last killed worker ready again (or ``BACK_TIMEOUT_S``)."""
    kills: list[_Kill] = []
    for fraction, role in zip(plan.kill_at, plan.kill_roles, strict=True):
        while clients.num_started < fraction * plan.num_requests:
            await asyncio.sleep(POLL_S / 10)
        of_role = [i for i, w in enumerate(stack.workers) if w.spec.role == role]
        index = of_role[sum(k.role == role for k in kills) % len(of_role)]
        worker = stack.workers[index]
        os.kill(worker.process.pid, signal.SIGKILL)
        kill = _Kill(role, index, worker.process.pid, clients.num_started, round(clients.now(), 3))
        kills.append(kill)
        log(f"killed {role} worker (pid {kill.pid}) at request {kill.at_request}")
        back_s = await _wait_until_back(stack, admin, kill, worker.http_url, clients)
        kill.back_s = None if back_s is None else round(back_s, 3)
        log(
            f"{role} worker back after {back_s - kill.killed_s:.1f} s"
            if back_s is not None
            else f"{role} worker not back within {BACK_TIMEOUT_S:g} s"
        )
    return kills


async def _wait_until_back(
    stack: Stack, admin: httpx.AsyncClient, kill: _Kill, url: str, clients: _Clients
) -> float | None:
    """When the supervisor's new process in the killed one's place was ready and the gateway
    had polled it successfully since (its worker id is its endpoint's, the same as before)."""
    deadline = time.perf_counter() + BACK_TIMEOUT_S
    ready_at: float | None = None
    while time.perf_counter() < deadline:
        worker = stack.workers[kill.index]  # the supervisor's thread replaces it
        if ready_at is None and worker.process.pid != kill.pid and worker.ready:
            ready_at = time.perf_counter()
        if ready_at is not None:
            response = await admin.get("/admin/v1/workers")
            response.raise_for_status()
            [status] = [s for s in response.json()["data"] if s["url"] == url]
            seen_s_ago = status["last_seen_s_ago"]
            if (
                status["state"] == "ready"
                and seen_s_ago is not None
                and seen_s_ago <= time.perf_counter() - ready_at
            ):
                return clients.now()
        await asyncio.sleep(POLL_S)
    return None


# ---- the ledger and the reconciliation -------------------------------------------------------


_TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens")


async def _settle(stack: Stack) -> bool:
    """Until the gateway holds no request (each one's usage is then recorded: ``_finish`` adds
    it before the request leaves the count); False if it still holds some at the timeout."""
    deadline = time.perf_counter() + SETTLE_TIMEOUT_S
    while True:
        held = _gateway_counts(await read_metrics(stack), "fairgate_requests_in_gateway")
        if sum(held.values()) == 0:
            return True
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(POLL_S)


def _gateway_counts(metrics: str, family_name: str) -> Counter[str]:
    """A family's samples summed by tenant (``*_created`` samples left out)."""
    sums: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics):
        if family.name == family_name:
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    sums[sample.labels.get("tenant", "")] += int(sample.value)
    return sums


async def _ledger(admin: httpx.AsyncClient, tenants: Sequence[str]) -> dict[str, dict[str, int]]:
    """Each tenant's usage from the admin API, every day summed (a run may cross midnight). The
    endpoint writes what the gateway holds unwritten first (``gateway.admin``)."""
    ledger: dict[str, dict[str, int]] = {}
    for tenant in tenants:
        response = await admin.get(f"/admin/v1/tenants/{tenant}/usage", params={"period": "day"})
        response.raise_for_status()
        rows = response.json()["data"]
        ledger[tenant] = {
            name: sum(row[name] for row in rows) for name in ("requests", *_TOKEN_FIELDS)
        }
    return ledger


def reconcile(
    outcomes: Sequence[RequestOutcome],
    ledger: dict[str, int],
    gateway_tokens: dict[str, int],
    prompt_tokens: int,
) -> dict[str, Any]:
    """One tenant's ``usage_matches`` (module docstring): its outcomes against its ledger row
    (``requests`` and the token sums) and the gateway's token counters."""
    completed = [o.usage for o in outcomes if o.usage is not None]
    # A stream whose client read text and got no usage was billed its prompt and some tokens.
    billed = [o for o in outcomes if o.usage is None and o.stream and o.num_text_events > 0]
    maybe = [
        o
        for o in outcomes
        if (o.kind in ("disconnected", "lost") and not o.stream)
        or (o.kind == "lost" and o.stream and o.num_text_events == 0)
    ]
    num_completed = len(completed)
    num_requests = ledger["requests"]
    completion = sum(u[2] for u in completed)
    cached = sum(u[1] for u in completed)
    bounds = {
        "requests": (num_completed + len(billed), num_completed + len(billed) + len(maybe)),
        "completion_tokens": (
            completion + sum(o.num_text_events for o in billed),
            completion + sum(o.max_tokens for o in (*billed, *maybe)),
        ),
        "cached_tokens": (cached, cached + prompt_tokens * (num_requests - num_completed)),
    }
    checks = {name: low <= ledger[name] <= high for name, (low, high) in bounds.items()} | {
        "prompt_tokens": ledger["prompt_tokens"] == prompt_tokens * num_requests
        and all(u[0] == prompt_tokens for u in completed),
        "gateway_counters": all(ledger[name] == gateway_tokens[name] for name in _TOKEN_FIELDS),
    }
    return {
        "ledger": ledger,
        "gateway_tokens": gateway_tokens,
        "client": {
            "completed": num_completed,
            "billed_unfinished": len(billed),
            "maybe_billed": len(maybe),
            "completed_prompt_tokens": sum(u[0] for u in completed),
            "completed_completion_tokens": completion,
        },
        "bounds": {name: list(pair) for name, pair in bounds.items()},
        "is_exact": bounds["requests"][0] == bounds["requests"][1]
        and bounds["completion_tokens"][0] == bounds["completion_tokens"][1],
        "checks": checks,
        "matches": all(checks.values()),
    }


# ---- the run ---------------------------------------------------------------------------------


async def _progress(clients: _Clients) -> None:
    while True:
        await asyncio.sleep(PROGRESS_S)
        kinds = Counter(o.kind for o in clients.outcomes)
        log(
            f"{clients.now():.0f} s: {len(clients.outcomes)}/{len(clients.specs)} ended, "
            f"{len(clients.outcomes) / clients.now():.0f}/s; "
            + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
        )


async def _soak(stack: Stack, plan: SoakPlan) -> dict[str, Any]:
    tenants = [_tenant(i) for i in range(plan.num_tenants)]
    keys, model = await create_tenants(
        StackAccess(stack.base_url, stack.admin_token), dict.fromkeys(tenants, 1.0)
    )
    specs = plan_requests(plan)
    limits = httpx.Limits(
        max_connections=plan.concurrency, max_keepalive_connections=plan.concurrency
    )
    admin_headers = {"authorization": f"Bearer {stack.admin_token}"}
    async with (
        httpx.AsyncClient(
            base_url=stack.base_url, limits=limits, timeout=plan.request_timeout_s
        ) as http,
        httpx.AsyncClient(base_url=stack.base_url, headers=admin_headers, timeout=10.0) as admin,
    ):
        clients = _Clients(http, keys, model, plan, specs)
        progress = asyncio.create_task(_progress(clients))
        killer = asyncio.create_task(_kill_workers(stack, admin, clients, plan))
        try:
            await clients.run()
            duration_s = clients.now()
            # Every kill's share has been sent; the last one may still wait for its worker.
            kills = await killer
        finally:
            for task in (progress, killer):
                task.cancel()
            await asyncio.gather(progress, killer, return_exceptions=True)
        settled = await _settle(stack)
        ledger = await _ledger(admin, tenants)
        metrics = await read_metrics(stack)
    return _result(plan, clients.outcomes, kills, ledger, metrics, duration_s, settled)


def _result(
    plan: SoakPlan,
    outcomes: list[RequestOutcome],
    kills: list[_Kill],
    ledger: dict[str, dict[str, int]],
    metrics: str,
    duration_s: float,
    settled: bool,
) -> dict[str, Any]:
    gateway_tokens = {name: _gateway_counts(metrics, f"fairgate_{name}") for name in _TOKEN_FIELDS}
    by_tenant: dict[str, Any] = {}
    for tenant, row in ledger.items():
        mine = [o for o in outcomes if o.tenant == tenant]
        tokens = {name: gateway_tokens[name][tenant] for name in _TOKEN_FIELDS}
        by_tenant[tenant] = {
            "sent": len(mine),
            "outcomes": dict(Counter(o.kind for o in mine)),
        } | reconcile(mine, row, tokens, plan.prompt_tokens)
    failures = [o for o in outcomes if o.kind not in ("completed", "disconnected")]
    five_xx = [o for o in failures if o.is_5xx]
    four_xx = [o for o in failures if o.status is not None and 400 <= o.status < 500]
    # Listed first when there are too many to list: the lost, then the 5xx, each by time.
    listed = sorted(failures, key=lambda o: (o.kind != "lost", not o.is_5xx, o.ended_s))
    zero_lost = not any(o.kind == "lost" for o in outcomes) and len(outcomes) == plan.num_requests
    result: dict[str, Any] = {
        "plan": asdict(plan),
        "duration_s": round(duration_s, 1),
        "requests_per_s": round(len(outcomes) / duration_s, 1),
        "outcomes": dict(Counter(o.kind for o in outcomes)),
        "outcomes_streamed": dict(Counter(o.kind for o in outcomes if o.stream)),
        "failures_by_detail": dict(Counter(f"{o.kind}: {o.detail}" for o in failures)),
        "gateway_outcomes": dict(requests_by_outcome(metrics)),
        "kills": [asdict(k) for k in kills],
        "num_5xx": len(five_xx),
        "num_5xx_outside_kills": sum(not any(k.covers(o.ended_s) for k in kills) for o in five_xx),
        "num_4xx": len(four_xx),
        "errors": [asdict(o) for o in listed[:MAX_LISTED]],
        "num_errors_listed": min(len(failures), MAX_LISTED),
        "settled": settled,
        "tenants": by_tenant,
        "zero_lost": zero_lost,
        "zero_5xx": not five_xx,
        "zero_4xx": not four_xx,
        "workers_back": len(kills) == len(plan.kill_at)
        and all(k.back_s is not None for k in kills),
        "usage_matches": settled and all(t["matches"] for t in by_tenant.values()),
    }
    return result


SUCCESS_FLAGS = ("zero_lost", "zero_5xx", "zero_4xx", "workers_back", "usage_matches")


def is_success(result: dict[str, Any]) -> bool:
    return all(result[name] for name in SUCCESS_FLAGS)


def run_soak_bench(
    plan: SoakPlan, *, output: str | None = None, log_dir: Path | None = None
) -> dict[str, Any]:
    """Run ``plan`` on a fresh supervised stack; the result (also printed as the last stdout
    line, and written to ``output`` when given). The processes' logs go to ``log_dir`` (None:
    a temporary one, deleted with the stack's state)."""
    with tempfile.TemporaryDirectory(prefix="fairgate-soak-") as state_dir:
        log_dir = log_dir or Path(state_dir) / "logs"
        stack = start_stack(
            StackConfig(
                engine="null",
                num_prefill_workers=plan.num_prefill_workers,
                num_decode_workers=plan.num_decode_workers,
                port=0,
                state_dir=Path(state_dir),
                env=NULL_ENGINE_ENV | {DECODE_STEP_ENV: str(plan.decode_step_s)},
                worker_args=["--log-level", "warning", "--max-num-seqs", "256"],
                gateway_args=["--log-level", "warning"],
                log_dir=log_dir,
                ready_timeout_s=READY_TIMEOUT_S,
            )
        )
        stop = threading.Event()
        supervisor = Supervisor(stack, RestartPolicy(), ready_timeout_s=READY_TIMEOUT_S)
        gave_up: list[str | None] = []
        watch = threading.Thread(target=lambda: gave_up.append(supervisor.run(stop)))
        watch.start()
        try:
            result = asyncio.run(_soak(stack, plan))
        finally:
            stop.set()
            watch.join(READY_TIMEOUT_S)
            stack.stop()
        result["supervisor_gave_up"] = next(iter(gave_up), None)
        result["log_lines"] = log_counts(log_dir)
    print_result(result, output)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fairgate bench soak``'s flags."""
    default = SoakPlan()
    parser.add_argument("--requests", type=int, default=default.num_requests)
    parser.add_argument("--tenants", type=int, default=default.num_tenants)
    parser.add_argument("--concurrency", type=int, default=default.concurrency)
    parser.add_argument("--prompt-tokens", type=int, default=default.prompt_tokens)
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=default.min_tokens,
        help="each request's max_tokens is drawn from [--min-tokens, --max-tokens]",
    )
    parser.add_argument("--max-tokens", type=int, default=default.max_tokens)
    parser.add_argument("--stream-fraction", type=float, default=default.stream_fraction)
    parser.add_argument("--disconnect-fraction", type=float, default=default.disconnect_fraction)
    parser.add_argument(
        "--kill-at",
        default=",".join(f"{f:g}" for f in default.kill_at),
        help="fractions of the requests sent at which a worker is killed ('' for none)",
    )
    parser.add_argument(
        "--kill-roles",
        default=",".join(default.kill_roles),
        help="the role of the worker each kill hits (prefill|decode), as many as --kill-at",
    )
    parser.add_argument("--prefill-workers", type=int, default=default.num_prefill_workers)
    parser.add_argument("--decode-workers", type=int, default=default.num_decode_workers)
    parser.add_argument("--request-timeout-s", type=float, default=default.request_timeout_s)
    parser.add_argument(
        "--ramp-s", type=float, default=default.ramp_s, help="the clients start over this long"
    )
    parser.add_argument(
        "--decode-step-s",
        type=float,
        default=default.decode_step_s,
        help="the null engine's seconds per decode step",
    )
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    parser.add_argument(
        "--log-dir", default=None, help="keep the processes' logs here (ROLE-N.log)"
    )


def plan_of(args: argparse.Namespace) -> SoakPlan:
    roles: list[Role] = []
    for name in filter(None, (r.strip() for r in args.kill_roles.split(","))):
        if name not in ("prefill", "decode"):
            raise ValueError(f"--kill-roles: prefill or decode, got {name!r}")
        roles.append("prefill" if name == "prefill" else "decode")
    return SoakPlan(
        num_requests=args.requests,
        num_tenants=args.tenants,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        min_tokens=args.min_tokens,
        max_tokens=args.max_tokens,
        stream_fraction=args.stream_fraction,
        disconnect_fraction=args.disconnect_fraction,
        kill_at=tuple(float(f) for f in args.kill_at.split(",") if f.strip()),
        kill_roles=tuple(roles),
        num_prefill_workers=args.prefill_workers,
        num_decode_workers=args.decode_workers,
        request_timeout_s=args.request_timeout_s,
        ramp_s=args.ramp_s,
        decode_step_s=args.decode_step_s,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """``fairgate bench soak``: 0 when every invariant held, 1 otherwise."""
    log_dir = None if args.log_dir is None else Path(args.log_dir)
    result = run_soak_bench(plan_of(args), output=args.output, log_dir=log_dir)
    return 0 if is_success(result) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
