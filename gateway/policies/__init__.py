"""The scheduling policies behind ``gateway.scheduler.SchedulingPolicy`` (``scheduling.md``), and
``make_policy``, which builds one by its config name. Pure: the gateway's dispatcher and the
simulator (``bench.sim``) run the same classes.

    fcfs     first come, first served
    vtc      Virtual Token Counter, with the lift rule (§2)
    dlpm     Deficit Longest Prefix Match over the prefill pool as one (§3)
    d2lpm    DLPM per worker plus a (tenant, worker) deficit for placement (§4)
    rr_lpm   round-robin routing + longest prefix match at each worker: locality only, the
             unfair baseline

What the fair ones share lives in ``base.FairPolicy``: one lane per SLO class (§5) holding a FIFO
queue per tenant and that class's fairness state; admission (``Shed``) and rejection of sheddable
requests that can no longer make their deadline; at-risk requests of lower classes first; the
charges of §1 as the work happens; and forgetting idle tenants. A policy adds only its order
(``_serve``), its placement (``_dispatch``), what it does with a charge and what it keeps per
queued request (``_new_entry``). One schedule pass::

    reject hopeless sheddable heads ─▶ at-risk heads of lower classes, earliest deadline first
        ─▶ each class, highest rank first: the policy's own order, placing until nothing fits

Work conservation, bounded. When the request a policy prefers cannot be placed now (its prompt
does not fit the room left), others of its class are tried, but a tenant may get ahead of the
blocked one's fair turn by at most ``max_borrow_tokens`` of service; beyond that, and for lower
classes, the room is left for the blocked request. Unbounded passing lets a tenant with small
requests take every gap as it opens, so one with large requests never fits again and the
fairness bound is lost (measured with the test backend: VTC fell to FCFS's service gap). The
workers do not idle for it: a request fits an idle prefill worker, and the wait ends as work in
flight completes; with nothing in flight, nothing is held back. Placement only gets harder
within a pass, so a prompt that failed to fit lets every prompt at least as long be skipped
without trying. A tenant's own queue stays FIFO under VTC. (rr_lpm, which has no fair turn to
pass, lets any request that fits its worker go.)

Weights: a charge is divided by the tenant's weight: the one ``update_tenant`` last set, else the
request's own (a demoted request keeps its own reduced weight).

One module per policy (``vtc``, ``rr_lpm``, ``dlpm``, ``d2lpm``, ``fcfs``), the skeleton they
share in ``base``, and what the prefix-locality ones share in ``lpm``; the prefix index is
``gateway.prefix_index``. The tenants' service per class is ``service_book``; ``per_model``
keeps a policy per model's pool, fair per tenant across them.

Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies.base import DEFAULT_BLOCK_SIZE, FairPolicy
from gateway.policies.d2lpm import D2lpmPolicy
from gateway.policies.dlpm import DlpmPolicy
from gateway.policies.fcfs import FcfsPolicy
from gateway.policies.per_model import PerModelPolicy
from gateway.policies.rr_lpm import RrLpmPolicy
from gateway.policies.service_book import ServiceBook
from gateway.policies.vtc import VtcPolicy
from gateway.scheduler import SchedulingPolicy

__all__ = [
    "POLICY_NAMES",
    "D2lpmPolicy",
    "DlpmPolicy",
    "FcfsPolicy",
    "PerModelPolicy",
    "RrLpmPolicy",
    "VtcPolicy",
    "make_per_model_policy",
    "make_policy",
]

POLICY_NAMES = ("fcfs", "vtc", "dlpm", "d2lpm", "rr_lpm")

_FAIR_POLICIES: dict[str, type[FairPolicy[Any, Any]]] = {
    "vtc": VtcPolicy,
    "dlpm": DlpmPolicy,
    "d2lpm": D2lpmPolicy,
    "rr_lpm": RrLpmPolicy,
}


def make_policy(
    name: str,
    settings: SchedulerSection | None = None,
    slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    books: dict[str, ServiceBook] | None = None,
) -> SchedulingPolicy:
    """The policy called ``name`` (one of ``POLICY_NAMES``), configured by the ``[scheduler]``
    section and the SLO classes; ``block_size``: the workers' KV block size, until the policy's
    ``set_block_size`` says theirs; ``books``: service books shared with other models' pools'
    policies (``make_per_model_policy``)."""
    settings = settings or SchedulerSection()
    if name == "fcfs":
        return FcfsPolicy(make_room=settings.make_room_for_higher_classes)
    factory = _FAIR_POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return factory(settings, slo_classes, block_size=block_size, books=books)


def make_per_model_policy(
    name: str,
    settings: SchedulerSection | None = None,
    slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PerModelPolicy:
    """``make_policy``'s policy for each model's pool, fair per tenant across them
    (``gateway.policies.per_model``)."""
    make_policy(name, settings, slo_classes, block_size=block_size)  # (an unknown name fails now)
    return PerModelPolicy(
        name,
        lambda books: make_policy(name, settings, slo_classes, block_size=block_size, books=books),
    )
