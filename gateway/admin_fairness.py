"""Fairness receipts (admin token; a tenant key gets 403):

    GET /admin/v1/tenants/{tenant}/fairness?window=5m     FairnessReceipt

What the tenant received over the window against its entitled share, the largest service gap to
another tenant backlogged at the same time, and the scheduling policy's bound on that gap
(``gateway.fairness_history`` for the definitions). ``window``: a whole number of seconds,
minutes or hours (``300s``, ``5m``, ``1h``; default ``5m``), at most the history's horizon
(one hour); the receipt says which window its samples cover (less, when the gateway has not
been up that long).

The bound (``scheduling.md``): VTC ``2U``, DLPM ``2(U + Q_u)``, D²LPM ``2·|W|·(U + Q_u)``, with
``U = w_in·L_input + w_out·M`` (``gap_bound``): ``w_in``, ``w_out`` and ``Q_u``
(``scheduler.quantum_tokens``) from the configuration; ``L_input``, the longest prompt a
request may have: the model's context length (its ready workers', else what its first worker
announced) less one, as admission refuses a prompt that fills it; ``M``, the most tokens one
decode batch can hold: the largest KV cache of the model's decode (or colocated) workers,
blocks × block size; ``|W|``: the workers D²LPM keeps deficits for, those that prefill the
model's requests: its ready prefill workers, or, with none, its ready colocated ones (as
``Dispatcher`` places them), at least one. Each model's ``U`` is in cost units (times its
cost factor); the largest model's is taken. FCFS and RR-LPM promise no bound: the receipt says
so. The gap the bound is checked against is of the service the policy charges
(``gateway.metrics.service_measure``: VTC the whole prompt, the others the computed one);
the receipt names it (``measure``). Torch-free.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import _ID_SCHEMA, json_response
from gateway.auth import Authenticator
from gateway.config import SchedulerSection
from gateway.errors import ClientError
from gateway.fairness_history import FairnessHistory, FairnessReceipt, GapBound
from gateway.metrics import service_measure
from gateway.model_costs import CostBook
from gateway.openapi_document import Endpoint, PathParam, QueryParam
from gateway.tenants import TenantStore
from gateway.workers import WorkerRegistry
from transfer.messages import WorkerRole

__all__ = [
    "DEFAULT_WINDOW",
    "FairnessParts",
    "fairness_endpoints",
    "gap_bound",
    "parse_window",
    "window_pattern",
]

DEFAULT_WINDOW = "5m"
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
_BOUNDED = {"vtc": "VTC", "dlpm": "DLPM", "d2lpm": "D²LPM"}


@dataclass(frozen=True, slots=True)
class FairnessParts:
    """What the receipts route uses of the gateway."""

    auth: Authenticator
    store: TenantStore  # a tenant by id or name
    history: FairnessHistory  # ``Gateway.fairness``
    bound: Callable[[], GapBound]  # the policy's, from the workers now (``gap_bound``)


def parse_window(text: str | None, max_s: float) -> float:
    """Seconds of ``300s`` / ``5m`` / ``1h`` (None: ``DEFAULT_WINDOW``); ``ClientError`` (400,
    param ``window``) for anything else: no leading zero, more than zero and at most ``max_s``
    (exactly what ``window_pattern`` matches)."""
    text = DEFAULT_WINDOW if text is None else text
    if re.fullmatch(window_pattern(max_s), text) is None:
        raise ClientError(
            "window must be a whole number of seconds, minutes or hours, more than 0 and at "
            f"most {max_s:g} s (the history kept), e.g. 300s, 5m, 1h",
            param="window",
        )
    return float(int(text[:-1]) * _UNIT_S[text[-1]])


@functools.cache
def window_pattern(max_s: float) -> str:
    """The windows of at most ``max_s`` seconds, as a regular expression (the document's, so
    that a window it calls valid is never refused)."""
    parts = [
        f"(?:{_up_to(int(max_s) // unit_s)}){unit}"
        for unit, unit_s in _UNIT_S.items()
        if int(max_s) // unit_s >= 1
    ]
    return "^(?:" + "|".join(parts) + ")$"


def _up_to(limit: int) -> str:
    """A regular expression of the whole numbers 1 … ``limit`` (≥ 1), with no leading zero."""
    digits = str(limit)
    width = len(digits)
    choices: list[str] = []
    if width > 1:  # fewer digits than ``limit``
        choices.append("[1-9]" + (f"[0-9]{{0,{width - 2}}}" if width > 2 else ""))
    for i, digit in enumerate(digits):  # as many digits as ``limit``, and less at digit i
        low = 1 if i == 0 else 0
        if int(digit) - 1 >= low:
            rest = "[0-9]" * (width - i - 1)
            choices.append(f"{digits[:i]}[{low}-{int(digit) - 1}]{rest}")
    choices.append(digits)
    return "|".join(c for c in choices if c)


def gap_bound(
    policy: str, scheduler: SchedulerSection, registry: WorkerRegistry, costs: CostBook
) -> GapBound:
    """The policy's bound on the gap (module docstring), from the workers known now."""
    measure = service_measure(policy)
    if policy not in _BOUNDED:
        return GapBound(
            policy,
            None,
            formula=f"{policy} promises no bound on the service gap (scheduling.md: only VTC, "
            "DLPM and D²LPM do)",
            measure=measure,
        )
    w_in, w_out = scheduler.w_in, scheduler.w_out
    best: tuple[float, str, int, str] | None = None  # U, how it was made, |W|, their role
    for model in registry.model_ids():
        pool = registry.pools.get(model)
        max_model_len = registry.max_model_len(model) or (
            0 if pool is None else pool.reference.max_model_len
        )
        kv_tokens = [
            h.info.num_total_blocks * h.info.block_size
            for h in registry.handles
            if h.info is not None and h.info.model_id == model and h.role in ("decode", "colocated")
        ]
        if max_model_len < 2 or not kv_tokens:
            continue
        l_input, m = max_model_len - 1, max(kv_tokens)
        factor = costs.factor(model)
        u = factor * (w_in * l_input + w_out * m)
        # D²LPM's deficits are per worker that prefills: prefill ones, else colocated ones.
        role: WorkerRole = "prefill" if registry.ready("prefill", model) else "colocated"
        num_workers = max(1, len(registry.ready(role, model)))
        how = (
            f"{model}: U = ({w_in:g}·{l_input} + {w_out:g}·{m}) × cost factor {factor:g} = "
            f"{u:g} (L_input: context length {max_model_len} − 1; M: the largest decode KV "
            f"cache, {m} tokens)"
        )
        if best is None or u > best[0]:
            best = (u, how, num_workers, role)
    name = _BOUNDED[policy]
    if best is None:
        return GapBound(
            policy,
            None,
            formula=f"{name}'s bound is not known yet: no worker has said its context length "
            "and KV cache size",
            measure=measure,
        )
    u, how, num_workers, prefilling = best
    quantum = scheduler.quantum_tokens
    shape = {
        "vtc": "2·U",
        "dlpm": f"2·(U + Q_u), Q_u = {quantum:g}",
        "d2lpm": f"2·|W|·(U + Q_u), |W| = {num_workers} {prefilling} workers, Q_u = {quantum:g}",
    }[policy]
    return GapBound(
        policy,
        u,
        quantum=quantum,
        num_workers=num_workers,
        formula=f"{name}: {shape}; U divided by the smaller weight of the two tenants (service "
        f"units); {how}; service: {measure}",
        measure=measure,
    )


def fairness_endpoints(parts: FairnessParts) -> list[Endpoint]:
    async def tenant_fairness(request: Request) -> Response:
        await parts.auth.require_admin(request)
        window_s = parse_window(request.query_params.get("window"), parts.history.horizon_s)
        tenant = await parts.store.get_tenant(request.path_params["tenant"])
        receipt = parts.history.receipt(tenant.tenant_id, window_s, parts.bound())
        return json_response(receipt)

    return [
        Endpoint(
            "GET",
            "/admin/v1/tenants/{tenant}/fairness",
            tenant_fairness,
            "A tenant's fairness receipt: service received against its entitled share, the "
            "largest service gap to another backlogged tenant, and the policy's bound on it",
            "admin",
            response=FairnessReceipt,
            errors=(400, 401, 403, 404),
            query=(
                QueryParam(
                    "window",
                    "how far back: 300s, 5m, 1h (default 5m; at most 1h)",
                    {"type": "string", "pattern": window_pattern(parts.history.horizon_s)},
                ),
            ),
            path_params=(PathParam("tenant", "the tenant's id or name", _ID_SCHEMA),),
        )
    ]
