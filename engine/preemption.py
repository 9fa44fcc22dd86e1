"""Preemption policy: which request goes first and which goes out.

Pure functions over priorities (torch-free); the engine carries the decisions out.

Two orders over the same ``Priority`` (higher ``rank``, lower ``counter``, earlier ``arrival``
is more important), ties broken by the engine's own admission order::

    prefill_order  ascending = most important first:  the next prompt chunk, the next swap-in
    victim_order   ascending = least important first: the next request to preempt

How a victim gives its blocks up (``PreemptionMode``) is carried out by the engine, with
``engine.swap`` for ``swap``.
"""

from __future__ import annotations

from typing import Literal

from engine.sequence import Priority

__all__ = ["PreemptionMode", "prefill_order", "victim_order"]

PreemptionMode = Literal["recompute", "swap"]


def prefill_order(priority: Priority, arrival_order: int) -> tuple[int, float, float, int]:
    """Sort key: the most important request first, then the earliest admitted."""
    return (-priority.rank, priority.counter, priority.arrival, arrival_order)


def victim_order(priority: Priority, arrival_order: int) -> tuple[int, float, float, int]:
    """Sort key: the least important request first (lowest rank, highest counter, latest
    arrival), then the latest admitted."""
    return (priority.rank, -priority.counter, -priority.arrival, -arrival_order)
