"""Tenants loading a real stack, and the service each one got: the instrument behind the
end-to-end fairness tests (``tests/gateway/test_fairness_e2e.py``) and the fidelity bench
(``bench.fidelity_bench``).

Service is ``scheduling.md`` §1's, from what the gateway answers (each response's ``usage``):
``w_in`` × uncached prompt tokens (``prompt_tokens`` − ``prompt_tokens_details.cached_tokens``)
+ ``w_out`` × completion tokens, divided by the tenant's weight where normalized.

**Which requests a window counts.** A request's service is attributed to the moment it
completed, and a window counts the requests that completed in it. Counting only the requests
that both started and ended in the window would be biased: a tenant served less has longer
latencies, so fewer of its requests fit in a window, and the count would make a slow tenant look
slower still (under a closed loop with N in flight a request of a tenant served R requests/s
lasts N/R s). Attribution by completion is unbiased once the loop is steady: what it counts
that was done before the window (the head start of the requests in progress at its start) and
what it misses (the work done on those in progress at its end) are the same quantity sampled at
two times, so the error is the difference of two such samples, at most the partial work of the
requests a tenant has on the workers, a few requests' worth against the hundreds a window
counts.

**Backlogged, really.** A fairness figure means something only while every tenant has requests
waiting in the gateway's queue (otherwise the tenant is served all it asks for, and the workers
are not the bottleneck). ``sample_queue_depths`` reads ``fairgate_queue_depth`` from the
gateway's ``/metrics`` during the window so that a test can check it.

Requests go through ``bench.lean_http`` (the load generator shares the machine with the stack).
A refused request (429 or 503, with ``Retry-After``) is counted and retried after
``REFUSED_PAUSE_S``: a refusal of a backlogged tenant (its oldest request waited longer than its
class allows) leaves its queue standing, so it stays backlogged.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.lean_http import ConnectionPool

__all__ = [
    "Completion",
    "LoadRun",
    "StackAccess",
    "TenantLoad",
    "chat_body",
    "completion_body",
    "create_tenants",
    "jain_index",
    "run_closed_loop",
    "sample_queue_depths",
    "service_by_tenant",
]

REFUSED_PAUSE_S = 1.0
REQUEST_TIMEOUT_S = 120.0
_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "silver",
    "window",
    "market",
    "yellow",
    "forest",
    "engine",
    "paper",
    "orange",
    "bridge",
    "candle",
    "winter",
    "summer",
    "island",
    "rocket",
    "violin",
    "pepper",
    "planet",
    "castle",
    "meadow",
    "harbor",
    "lantern",
    "marble",
    "thunder",
    "velvet",
    "whisper",
]


@dataclass(frozen=True, slots=True)
class StackAccess:
    """How to reach a running stack: the gateway's URL and its admin token."""

    base_url: str
    admin_token: str


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One tenant of a closed loop: ``concurrency`` requests in flight while it is active.
    ``active``: (start, end) seconds from the loop's start; empty: the whole run. At the end of
    an active interval its clients go away: what it has in flight then is cancelled (the
    gateway aborts it), so that it is idle from that moment, however slow the stack.
    ``base_url``: where it sends its requests ("": the stack's URL), e.g. one gateway replica
    of several, as a client whose keep-alive connections stay on the replica it reached.
    ``model``: the model its requests name ("": the first ``/v1/models`` lists); a tenant
    sending to several models is one load per model, of the same name and weight."""

    name: str
    weight: float = 1.0
    concurrency: int = 16
    active: tuple[tuple[float, float], ...] = ()
    base_url: str = ""
    model: str = ""

    def is_active(self, t: float) -> bool:
        return not self.active or any(start <= t < end for start, end in self.active)

    def active_end(self, t: float) -> float:
        """When the active interval holding ``t`` ends (inf: never)."""
        return min((end for start, end in self.active if start <= t < end), default=math.inf)

    def next_start(self, t: float) -> float | None:
        """The next moment after ``t`` at which it becomes active; None: never again."""
        starts = [start for start, _ in self.active if start > t]
        return min(starts) if starts else None


@dataclass(frozen=True, slots=True)
class Completion:
    """One answered request; times in seconds from the loop's start; ``model``: the model the
    answer names ("": not known)."""

    tenant: str
    sent_s: float
    finished_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    model: str = ""

    def service(self, w_in: float = 1.0, w_out: float = 2.0) -> float:
        return w_in * (self.prompt_tokens - self.cached_tokens) + w_out * self.completion_tokens


@dataclass(slots=True)
class LoadRun:
    """What a loop got: every completion, and the refusals (429/503) per tenant."""

    completions: list[Completion] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    refusal_codes: Counter[str] = field(default_factory=Counter)  # the error bodies' codes


def completion_from_answer(
    tenant: str, sent_s: float, finished_s: float, body: bytes
) -> Completion:
    answer = json.loads(body)
    usage = answer["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return Completion(
        tenant,
        sent_s,
        finished_s,
        usage["prompt_tokens"],
        details.get("cached_tokens") or 0,
        usage["completion_tokens"],
        answer.get("model") or "",
    )


def service_by_tenant(
    completions: Sequence[Completion],
    start_s: float,
    end_s: float,
    *,
    weights: Mapping[str, float] | None = None,
    w_in: float = 1.0,
    w_out: float = 2.0,
) -> dict[str, float]:
    """Per tenant, the service of the requests that completed in [start_s, end_s) (see the
    module docstring), divided by its weight when ``weights`` are given; a tenant in
    ``weights`` with no completion there gets 0."""
    service: dict[str, float] = dict.fromkeys(weights or {}, 0.0)
    for completion in completions:
        if start_s <= completion.finished_s < end_s:
            service[completion.tenant] = service.get(completion.tenant, 0.0) + completion.service(
                w_in, w_out
            )
    if weights is not None:
        service = {tenant: value / weights[tenant] for tenant, value in service.items()}
    return service


def jain_index(values: Sequence[float]) -> float:
    """(Σx)² / (n·Σx²): 1 when all are equal, 1/n when one gets everything."""
    if not values or not any(values):
        raise ValueError("Jain's index needs at least one positive value")
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def chat_body(model: str, rng: random.Random, num_words: int, max_tokens: int) -> bytes:
    """A non-streamed chat completion of ``num_words`` random words (unique prompts: nothing
    but the chat template's own prefix is ever cached)."""
    content = " ".join(rng.choice(_WORDS) for _ in range(num_words))
    return json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()


def completion_body(model: str, prompt_token_ids: Sequence[int], max_tokens: int) -> bytes:
    """A non-streamed completion of the given token ids."""
    return json.dumps(
        {
            "model": model,
            "prompt": list(prompt_token_ids),
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()


async def create_tenants(
    access: StackAccess, weights: Mapping[str, float]
) -> tuple[dict[str, str], str]:
    """Create each tenant with its weight through the admin API, and a key for it; (keys by
    tenant, the model's id)."""
    admin = {"authorization": f"Bearer {access.admin_token}"}
    keys: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=access.base_url, timeout=30.0) as client:
        for name, weight in weights.items():
            response = await client.post(
                "/admin/v1/tenants", json={"name": name, "weight": weight}, headers=admin
            )
            response.raise_for_status()
            response = await client.post(
                f"/admin/v1/tenants/{name}/keys", json={"name": "load"}, headers=admin
            )
            response.raise_for_status()
            keys[name] = response.json()["secret"]
        response = await client.get(
            "/v1/models", headers={"authorization": f"Bearer {next(iter(keys.values()))}"}
        )
        response.raise_for_status()
        model: str = response.json()["data"][0]["id"]
    return keys, model


class Sender:
    """Sends one request of a tenant and records its answer; times from ``origin``.
    ``urls``: where each tenant sends (the stack's URL for one not named)."""

    def __init__(
        self,
        access: StackAccess,
        keys: Mapping[str, str],
        origin: float,
        urls: Mapping[str, str] | None = None,
    ) -> None:
        self.pools: dict[str, ConnectionPool] = {}
        self.pool_of: dict[str, ConnectionPool] = {}
        for tenant in keys:
            base_url = (urls or {}).get(tenant) or access.base_url
            if base_url not in self.pools:
                url = httpx.URL(base_url)
                self.pools[base_url] = ConnectionPool(url.host, url.port or 80)
            self.pool_of[tenant] = self.pools[base_url]
        self.keys = keys
        self.origin = origin
        self.run = LoadRun(refused=dict.fromkeys(keys, 0))

    def now(self) -> float:
        return time.perf_counter() - self.origin

    async def send(self, tenant: str, path: str, body: bytes) -> bool:
        """True when it was answered 200 (recorded), False when refused (429/503, counted);
        RuntimeError on any other answer."""
        headers = f"authorization: Bearer {self.keys[tenant]}\r\n".encode()
        sent_s = self.now()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, _, answer = await self.pool_of[tenant].post(path, body, headers)
        except TimeoutError:
            # not a TimeoutError: that is what a caller's own deadline raises
            raise RuntimeError(f"{tenant}: no answer within {REQUEST_TIMEOUT_S:g} s") from None
        if status in (429, 503):
            self.run.refused[tenant] += 1
            self.run.refusal_codes[f"{status} {json.loads(answer)['error']['code']}"] += 1
            return False
        if status != 200:
            raise RuntimeError(f"{tenant}: the gateway answered {status}: {answer[:200]!r}")
        self.run.completions.append(completion_from_answer(tenant, sent_s, self.now(), answer))
        return True

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


async def run_closed_loop(
    access: StackAccess,
    loads: Sequence[TenantLoad],
    duration_s: float,
    *,
    num_words: int = 30,
    max_tokens: int = 32,
    seed: int = 0,
    during: Callable[[Callable[[], float]], Coroutine[Any, Any, None]] | None = None,
) -> LoadRun:
    """Create the tenants, then keep each one's ``concurrency`` chat requests in flight while
    it is active, for ``duration_s``. What is still in flight at the end is cancelled (the
    gateway aborts it) and not counted. ``during(now)`` runs beside the loop (e.g.
    ``sample_queue_depths``); ``now()`` gives the loop's clock."""
    keys, model = await create_tenants(access, {load.name: load.weight for load in loads})
    rng = random.Random(seed)
    urls = {load.name: load.base_url for load in loads if load.base_url}
    sender = Sender(access, keys, time.perf_counter(), urls)

    async def client(load: TenantLoad) -> None:
        while (now := sender.now()) < duration_s:
            if not load.is_active(now):
                resume = load.next_start(now)
                if resume is None or resume >= duration_s:
                    return
                await asyncio.sleep(resume - now)
                continue
            body = chat_body(load.model or model, rng, num_words, max_tokens)
            try:
                end = load.active_end(now)
                async with asyncio.timeout(None if math.isinf(end) else end - now):
                    is_served = await sender.send(load.name, "/v1/chat/completions", body)
            except TimeoutError:
                continue  # its clients left at the end of its active time
            if not is_served:
                await asyncio.sleep(REFUSED_PAUSE_S)

    clients = [asyncio.create_task(client(load)) for load in loads for _ in range(load.concurrency)]
    side = asyncio.create_task(during(sender.now)) if during is not None else None
    try:
        done, _ = await asyncio.wait(clients, timeout=duration_s)
        for task in done:
            task.result()  # a client's error is the run's
    finally:
        for task in [*clients, *([side] if side else [])]:
            task.cancel()
        await asyncio.gather(*clients, *([side] if side else []), return_exceptions=True)
        sender.close()
    return sender.run


async def sample_queue_depths(
    access: StackAccess,
    tenants: Sequence[str],
    now: Callable[[], float],
    start_s: float,
    end_s: float,
    into: dict[str, list[float]],
    interval_s: float = 0.5,
) -> None:
    """Append each tenant's ``fairgate_queue_depth`` to ``into[tenant]`` every ``interval_s``
    from ``start_s`` to ``end_s`` (the loop's clock)."""
    headers = {"authorization": f"Bearer {access.admin_token}"}
    async with httpx.AsyncClient(base_url=access.base_url, timeout=10.0) as client:
        await asyncio.sleep(max(0.0, start_s - now()))
        while now() < end_s:
            response = await client.get("/metrics", headers=headers)
            response.raise_for_status()
            depths = dict.fromkeys(tenants, 0.0)
            for family in text_string_to_metric_families(response.text):
                if family.name != "fairgate_queue_depth":
                    continue
                for sample in family.samples:
                    tenant = sample.labels.get("tenant", "")
                    if tenant in depths:
                        depths[tenant] = sample.value
            for tenant, depth in depths.items():
                into.setdefault(tenant, []).append(depth)
            await asyncio.sleep(interval_s)
