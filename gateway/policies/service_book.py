"""The service book of one SLO class: each tenant's normalized service (VTC's counter,
``scheduling.md`` §2), the lift rule, and what gateway replicas compare it with. Torch-free.

VTC orders its backlog by these counters. DLPM orders by deficits, which are kept for the
tenants active on one replica only; with several replicas the book is what keeps the weights
across them (``FairPolicy._is_held_back_elsewhere``): a tenant further ahead than the borrowing
limit of the least counter backlogged on another replica waits, so the shared workers' room goes
to the one behind. Without it, tenants each sending to their own replica (a client's keep-alive
connection stays on one) got the same service whatever their weights.

A tenant's queue empties whenever its replica's pass has taken all it sent, at each replica's
own rhythm, while its requests are in flight and its clients wait for them. Two rules keep that
from hiding it from the others:

- a tenant with requests of the class in flight joins again at most ``max_borrow_tokens`` below
  the other replicas' floor (``FairPolicy._lift``); lifted all the way each time, it lost all it
  was behind. One back from idle is lifted all the way, and the replica's own backlog lifts as
  in §2;
- what a replica tells the others each sync interval is the least counter of the tenants
  backlogged at any moment of the interval (``shared_floor``), not only at its end, which
  missed most of the moments it was queued.

Measured (``tests/gateway/test_replicas.py``: DLPM, weights 1 and 4, each tenant on its own
replica): Jain 0.74 with neither rule (as with nothing shared), 0.95–0.98 with the first alone,
0.82–0.85 with the second alone, 0.998 with both.

The replicas' figures come through ``gateway.replica_sync``: the charges of the others
(``remote_charge``), the least counter backlogged on another replica (``remote_floor``) and the
highest last leaver's counter there (``remote_idle``).

Several models (``gateway.policies.per_model``): each model's pool has its own policy and
queues, and the policies of one class share the class's book, so a tenant's counter counts its
service on every model, in the models' cost units. A tenant is backlogged in the class while it
has requests queued for any model (``backlog`` counts the pools it is queued in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class ServiceBook:
    """Normalized service by tenant for one class. ``backlog``: the backlogged tenants, with
    the number of model pools whose queue of the class holds their requests (``lift`` /
    ``left``); ``num_pools``: how many pools' lanes share the book. ``last_left``: the tenant
    that most recently left the backlog; its counter (kept in ``last_left_counter`` once it is
    forgotten) is the lift when every queue is empty."""

    __slots__ = (
        "backlog",
        "counters",
        "last_left",
        "last_left_counter",
        "left_since_shared",
        "num_pools",
        "remote_floor",
        "remote_idle",
    )

    def __init__(self) -> None:
        self.backlog: dict[str, int] = {}
        self.num_pools = 0
        self.counters: dict[str, float] = {}
        self.last_left: str | None = None
        self.last_left_counter = 0.0
        # The tenants that left the backlog since ``shared_floor`` was last taken.
        self.left_since_shared: set[str] = set()
        # The least counter among the other gateway replicas' backlogged tenants, None when
        # they have none (or there are no replicas); and, of those with no backlog, the highest
        # of their last leavers' counters (what they would lift a newcomer to).
        self.remote_floor: float | None = None
        self.remote_idle: float | None = None

    def lift(
        self,
        tenant_id: str,
        *,
        remote_slack: float = 0.0,
        pool: Iterable[str] = (),
        local_slack: float = 0.0,
    ) -> None:
        """The tenant's queue in a pool's lane is no longer empty: c[u] = max(c[u], the floor)
        (nothing changes for a tenant backlogged already: the floor is at most its counter).
        ``remote_slack``: how far below the other replicas' backlog it may stay (module
        docstring). ``pool``: the tenants queued in that lane. With several pools, the floor is
        at least their least counter: a tenant alone on a pool earned its lead from capacity
        nobody else wanted, and a newcomer lifted only to another pool's floor would take this
        pool over until it caught up. ``local_slack``: how far below this replica's floors it
        may stay: a tenant with requests in flight whose queue emptied for a moment (the pool
        took all of it) is no newcomer, and lifting it to a tenant ahead by its service on
        another model would release that one here."""
        floor = self.floor(remote_slack, local_slack)
        if self.num_pools > 1:
            here = self.least_of(t for t in pool if t != tenant_id and t in self.counters)
            if here is not None:
                floor = max(floor, here - local_slack)
        self.counters[tenant_id] = max(self.counters.get(tenant_id, 0.0), floor)
        self.backlog[tenant_id] = self.backlog.get(tenant_id, 0) + 1

    def left(self, tenant_id: str) -> None:
        """The tenant's queue in a pool's lane is empty."""
        num_pools = self.backlog.pop(tenant_id) - 1
        if num_pools:
            self.backlog[tenant_id] = num_pools
            return
        self.last_left = tenant_id
        self.left_since_shared.add(tenant_id)

    def charge(self, tenant_id: str, cost: float) -> None:
        self.counters[tenant_id] = self.counters.get(tenant_id, 0.0) + cost

    def remote_charge(self, tenant_id: str, cost: float) -> None:
        """Another replica's charge, to a tenant this one knows (one it does not is lifted on
        arrival, as any newcomer)."""
        if tenant_id in self.counters:
            self.counters[tenant_id] += cost

    def lead_elsewhere(self, tenant_id: str) -> float:
        """How far the tenant is ahead of the least counter backlogged on another replica
        (-inf: none is)."""
        if self.remote_floor is None:
            return -math.inf
        return self.counters.get(tenant_id, 0.0) - self.remote_floor

    def local_floor(self) -> float | None:
        """The least counter among this replica's backlogged tenants."""
        return min((self.counters[t] for t in self.backlog), default=None)

    def least_of(self, tenant_ids: Iterable[str]) -> float | None:
        """The least counter among ``tenant_ids`` (one pool's queue, say)."""
        return min((self.counters[t] for t in tenant_ids), default=None)

    def shared_floor(self) -> float | None:
        """What the other replicas are told: the least counter among the tenants backlogged
        here at any moment since the last call, not only now (module docstring)."""
        left, self.left_since_shared = self.left_since_shared, set()
        counters = [self.counters[t] for t in left if t in self.counters]
        local = self.local_floor()
        return min(counters + ([] if local is None else [local]), default=None)

    def floor(self, remote_slack: float = 0.0, local_slack: float = 0.0) -> float:
        """What a tenant joining now is lifted to (at least): the least counter among the
        backlogged tenants (of every replica; those of the others less ``remote_slack``), or
        the last leaver's when none is. Alone, it never decreases, which is what makes
        forgetting a tenant whose counter is at most this safe; with replicas, another's
        backlog may bring it down by what the counters drift apart between syncs."""
        remote = None if self.remote_floor is None else self.remote_floor - remote_slack
        local = self.local_floor()
        local = None if local is None else local - local_slack
        floors = [f for f in (local, remote) if f is not None]
        if floors:
            return min(floors)
        idle = [f for f in (self.idle_floor(), self.remote_idle) if f is not None]
        return max(idle, default=0.0)

    def idle_floor(self) -> float | None:
        """The last leaver's counter (what a newcomer is lifted to with no backlog anywhere);
        None before anyone left."""
        if self.last_left is None:
            return None
        return self.counters.get(self.last_left, self.last_left_counter)

    def can_forget(self, tenant_id: str) -> bool:
        """Forgetting changes nothing it gets on return: its counter is at most the lift (and
        it is queued in no pool)."""
        return (
            tenant_id not in self.backlog
            and self.counters.get(tenant_id, -math.inf) <= self.floor()
        )

    def forget(self, tenant_id: str) -> None:
        """Drop the tenant's counter, unless it is queued in some pool (the policy of another
        model's pool may be forgetting it: that one still counts on it)."""
        if tenant_id in self.backlog:
            return
        counter = self.counters.pop(tenant_id, None)
        if counter is not None and self.last_left == tenant_id:
            self.last_left_counter = counter


def shared_floors(books: Iterable[tuple[str, ServiceBook]]) -> dict[str, float]:
    """By class, what the other replicas are told (``ServiceBook.shared_floor``); classes with
    no backlog in the interval left out."""
    floors = {name: book.shared_floor() for name, book in books}
    return {name: floor for name, floor in floors.items() if floor is not None}


def idle_floors(books: Iterable[tuple[str, ServiceBook]]) -> dict[str, float]:
    """By class, the last leaver's counter; classes no one left yet left out."""
    floors = {name: book.idle_floor() for name, book in books}
    return {name: floor for name, floor in floors.items() if floor is not None}


def set_remote_floors(
    books: Iterable[tuple[str, ServiceBook]], floors: dict[str, float], idle: dict[str, float]
) -> None:
    """The other replicas' floors, by class (``gateway.replica_sync``)."""
    for name, book in books:
        book.remote_floor = floors.get(name)
        book.remote_idle = idle.get(name)
