"""Finished requests' usage, written to the tenant store in batches off the request path.

``add`` is synchronous and never fails (it appends to a list); one background task flushes the
list every ``flush_interval_s`` (sooner when it grows past ``max_batch``) in one store
transaction. A flush that fails keeps its batch for the next try, so no usage record is lost
while the gateway runs; ``stop`` flushes what is left. Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.tenants import TenantStore, UsageDelta

__all__ = ["UsageRecorder"]

logger = logging.getLogger(__name__)


class UsageRecorder:
    def __init__(
        self, store: TenantStore, *, flush_interval_s: float = 0.5, max_batch: int = 512
    ) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self._pending: list[UsageDelta] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def add(self, delta: UsageDelta) -> None:
        self._pending.append(delta)
        if len(self._pending) >= self.max_batch:
            self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="usage-recorder")

    async def stop(self) -> None:
        """Stop the task and write everything pending (raises if that last write fails)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            await self.store.record_usage(batch)
        except BaseException:
            self._pending[:0] = batch  # keep them, in order, for the next flush
            raise

    async def _flush_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.flush_interval_s)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:
                logger.exception("writing %d usage records failed; retrying", self.num_pending)
