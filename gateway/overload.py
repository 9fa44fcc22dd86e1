"""The gateway's own overload, and who is refused when it happens.

Offered more than its CPU can run, the gateway's event loop has more ready work than it gets
through: every request in the process slows down together (the loop serves them in turns),
clients time out, and the work done for them is lost, so goodput falls well below capacity.
The queue for workers (``gateway.dispatch``) cannot see this: the backlog is in front of the
handlers, in the loop itself.

``LoadGuard`` watches the loop's lag (a timer that sleeps ``SAMPLE_S`` and notes how late it
wakes). While the lag stays over ``max_loop_lag_s`` (every sample of the last ``WINDOW_S``: one
slow callback or a collection of the garbage collector is not overload), a tenant's new request
is refused at once, right after its key is checked and before its body is read, with 503
``overloaded`` and ``Retry-After``, if that tenant already holds at least its weighted share of
the requests in the gateway. So the tenants that bring the overload are the ones refused, and a
tenant sending a little is still served. The guard also counts each tenant's requests in the
gateway (from its key to its last byte), which is what the shares are taken of.

Torch-free; one event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from gateway.errors import Unavailable

__all__ = ["LoadGuard", "Overloaded"]

logger = logging.getLogger(__name__)

SAMPLE_S = 0.005  # the lag timer's period
WINDOW_S = 0.05  # overloaded while every sample over this long was late


class Overloaded(Unavailable):
    """The gateway itself is over capacity and this tenant holds its share of it."""

    code = "overloaded"


class LoadGuard:
    def __init__(self, max_loop_lag_s: float) -> None:
        self.max_loop_lag_s = max_loop_lag_s
        self._requests: collections.Counter[str] = collections.Counter()  # by tenant id
        self._weights: dict[str, float] = {}
        self._num_requests = 0
        self._late_since: float | None = None  # when the samples began to be late, in a row
        self.lag_s = 0.0  # the last sample's
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sample_forever(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def num_requests(self) -> int:
        """Requests in the gateway: past the gatekeeper and not yet finished or refused."""
        return self._num_requests

    def requests_by_tenant(self) -> dict[str, int]:
        """Requests in the gateway by tenant id (tenants with none are left out)."""
        return dict(self._requests)

    @property
    def is_overloaded(self) -> bool:
        late_since = self._late_since
        return late_since is not None and time.monotonic() - late_since >= WINDOW_S

    def enter(self, tenant_id: str, weight: float) -> None:
        """A request of this tenant comes in: ``Overloaded`` if the gateway is and the tenant
        holds its weighted share of the requests in it; else it is counted until ``leave``."""
        if self.is_overloaded and self._requests[tenant_id] >= self._share(tenant_id, weight):
            raise Overloaded("the gateway is over capacity; try again shortly", retry_after_s=1.0)
        self._requests[tenant_id] += 1
        self._weights[tenant_id] = weight
        self._num_requests += 1

    def leave(self, tenant_id: str) -> None:
        self._requests[tenant_id] -= 1
        self._num_requests -= 1
        if self._requests[tenant_id] <= 0:
            del self._requests[tenant_id]
            del self._weights[tenant_id]

    def _share(self, tenant_id: str, weight: float) -> float:
        """The tenant's weighted share of the requests in the gateway (a tenant alone holds
        all of them: its share is refused too)."""
        total_weight = sum(self._weights.values())
        if tenant_id not in self._weights:
            total_weight += weight
        return self._num_requests * weight / total_weight

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + SAMPLE_S
            await asyncio.sleep(SAMPLE_S)
            self.lag_s = lag_s = loop.time() - expected
            if lag_s <= self.max_loop_lag_s:
                self._late_since = None
            elif self._late_since is None:
                self._late_since = time.monotonic() - lag_s
