"""Preemption policy: which request goes first and which goes out.

Pure functions over plain values (torch-free); the engine carries the decisions out, and the
simulator (``bench.sim``) can order its jobs with the very same functions.

Three orders over the same ``Priority`` (higher ``rank``, lower ``counter``, earlier ``arrival``
is more important), ties broken by the engine's own admission order::

    importance_order  ascending = most important first:  the next decode, the next swap-in
    prefill_order     the next prompt chunk and the next admission (below)
    victim_order      ascending = least important first: the next request to preempt

``prefill_order`` is ``importance_order`` with one change, inside each tenant and class only
(PecSched: short inputs must not wait behind long ones). The places the importance order gives
a tenant's requests of one class stay that tenant's, so its share of every step, and every
other tenant's, is what it was; which of its requests takes each place goes by the *aged
remaining length* ``aged_remaining_tokens``: its uncomputed prompt tokens less one step's
prompt-token budget for every engine step it has waited. A short prompt thus takes a long one's
place between its chunks, and the long one is never starved:

    Comparing two requests at one step, the aged length of a request that arrived at step ``a``
    with ``R`` tokens left is ``R - (now - a)·B``: the order is that of ``R + a·B``, the step at
    which its prompt would be done had it the whole budget ``B`` from its arrival (earliest
    first). A later request can only go ahead of it if its own ``R' + a'·B`` is smaller, so a
    request arriving ``ceil(R₀ / B)`` steps or more after it (``R₀``: its uncomputed tokens on
    arrival) never goes ahead: a prompt is passed by later ones of its tenant and class during
    at most as many steps as it would take alone at the full budget. Under a continuous stream
    of shorter prompts its prefill still ends within about twice its own time, plus the work
    that was queued before it.

The tenant's identity is its prefix-cache salt (the gateway gives each tenant its own; requests
added without one are all one tenant). The counter is per request (the tenant's counter when the
gateway placed it), so two requests of one tenant differ in it: inside a tenant it is the length,
not the counter, that decides.

How a victim gives its blocks up (``PreemptionMode``) is carried out by the engine, with
``engine.swap`` for ``swap``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from engine.sequence import Priority

__all__ = [
    "PreemptionMode",
    "PrefillCandidate",
    "aged_remaining_tokens",
    "importance_order",
    "prefill_order",
    "victim_order",
]

PreemptionMode = Literal["recompute", "swap"]


def importance_order(priority: Priority, arrival_order: int) -> tuple[int, float, float, int]:
    """Sort key: the most important request first, then the earliest admitted."""
    return (-priority.rank, priority.counter, priority.arrival, arrival_order)


def victim_order(priority: Priority, arrival_order: int) -> tuple[int, float, float, int]:
    """Sort key: the least important request first (lowest rank, highest counter, latest
    arrival), then the latest admitted."""
    return (priority.rank, -priority.counter, -priority.arrival, -arrival_order)


def aged_remaining_tokens(
    num_remaining_tokens: int, num_waited_steps: int, step_tokens: int
) -> int:
    """A request's length as ``prefill_order`` weighs it: its uncomputed prompt tokens less
    ``step_tokens`` (one step's prompt-token budget) for each step it has waited. Negative once
    it has waited longer than its prompt takes alone."""
    return num_remaining_tokens - num_waited_steps * step_tokens


@dataclass(frozen=True, slots=True)
class PrefillCandidate:
    """A request with prompt tokens left to compute, as ``prefill_order`` sees it."""

    tenant: bytes  # its tenant's prefix-cache salt
    rank: int  # its SLO class (higher: more important)
    counter: float  # its tenant's fair-share counter when it was placed (lower: first)
    arrival: float  # at the gateway (earlier: first)
    num_remaining_tokens: int  # prompt tokens not computed yet (all of them while waiting)
    num_waited_steps: int  # engine steps since it arrived in the engine
    arrival_order: int  # the engine's admission order: the last tie-breaker

    def importance_key(self) -> tuple[int, float, float, int]:
        return importance_order(Priority(self.rank, self.counter, self.arrival), self.arrival_order)


def prefill_order(candidates: Sequence[PrefillCandidate], step_tokens: int) -> list[int]:
    """The indices of ``candidates`` in the order their prompt chunks go (and waiting ones are
    admitted): ``importance_order``'s places, and inside each (tenant, rank) the shortest aged
    remaining length (``aged_remaining_tokens`` with ``step_tokens``, one step's prompt-token
    budget) first, then the earliest arrival and admission (module docstring)."""
    if step_tokens < 1:
        raise ValueError(f"step_tokens must be at least 1, got {step_tokens}")
    places = sorted(range(len(candidates)), key=lambda i: candidates[i].importance_key())
    groups: dict[tuple[bytes, int], list[int]] = {}
    for index in places:
        groups.setdefault(_group(candidates[index]), []).append(index)
    takers: dict[tuple[bytes, int], Iterator[int]] = {
        group: iter(sorted(members, key=lambda i: _length_key(candidates[i], step_tokens)))
        for group, members in groups.items()
    }
    return [next(takers[_group(candidates[index])]) for index in places]


def _group(candidate: PrefillCandidate) -> tuple[bytes, int]:
    return (candidate.tenant, candidate.rank)


def _length_key(candidate: PrefillCandidate, step_tokens: int) -> tuple[int, float, int]:
    aged = aged_remaining_tokens(
        candidate.num_remaining_tokens, candidate.num_waited_steps, step_tokens
    )
    return (aged, candidate.arrival, candidate.arrival_order)
