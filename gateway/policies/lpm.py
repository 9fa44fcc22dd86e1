"""What the prefix-locality policies (rr_lpm, dlpm, d2lpm) share: the prefix index, the queue
entries that carry a prompt's block hash chain, and the longest-prefix-match order. Torch-free.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from engine.block_manager import block_hashes
from gateway.config import DEFAULT_SLO_CLASSES, SchedulerSection, SloClass
from gateway.policies.base import (
    DEFAULT_BLOCK_SIZE,
    Entry,
    FairPolicy,
    Flight,
    LaneT,
    Pass,
    has_room,
)
from gateway.policies.service_book import ServiceBook
from gateway.prefix_index import PrefixIndex, PrefixPath
from gateway.scheduler import Placement, WorkerView, place

LPM_ORDER = operator.attrgetter("lpm_order")


@dataclass(slots=True, eq=False)
class IndexedEntry(Entry):
    """A queued request of an indexed policy: its prompt's block hash chain, followed in the
    prefix index while it is queued, and its place in longest-prefix-match order."""

    hashes: list[bytes] | None = None  # None once placed (no longer needed)
    path: PrefixPath | None = None
    lpm_order: tuple[int, float] = (0, 0.0)  # (-longest match over the workers, arrival)


IndexedEntryT = TypeVar("IndexedEntryT", bound=IndexedEntry)


class IndexedPolicy(FairPolicy[LaneT, IndexedEntryT]):
    """A policy that places by prefix locality: it keeps the prefix index (``gateway.
    prefix_index``), sends a request to a worker with room holding its longest match (least
    loaded among ties; ``_pick_worker``) and records the prompt there. With no prefill workers
    (colocated decode workers) the index is by decode worker. Service (``tenants``) counts
    uncached prompt tokens (§1 for DLPM), corrected by what the worker found cached."""

    # Whether ``_longest`` is the match at one worker rather than over all of them: the index
    # must then report changes at each worker (``PrefixIndex``'s ``report_each_worker``).
    _orders_by_one_worker = False

    def __init__(
        self,
        settings: SchedulerSection | None = None,
        slo_classes: Sequence[SloClass] = DEFAULT_SLO_CLASSES,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        books: dict[str, ServiceBook] | None = None,
    ) -> None:
        super().__init__(settings, slo_classes, block_size=block_size, books=books)
        self._index = PrefixIndex(
            self.settings.prefix_index_blocks, report_each_worker=self._orders_by_one_worker
        )
        # Every queued prompt is tracked in the index (``PrefixIndex.track``), which says whose
        # longest match may have changed; ``lpm_order`` is kept up to date from that
        # (``_refresh_orders``), over the index's workers while they are all in the pass's
        # locality views (those not in the index hold nothing), else (a worker went away)
        # over the views' workers, as a scan would.
        self._worker_ids: frozenset[str] = frozenset()
        self._is_index_local = True

    def set_block_size(self, block_size: int) -> None:
        """The prefix index is kept in blocks of this size. Told before the first request is
        placed (the registry keeps workers of another block size out, so it does not change
        after): requests queued before it are hashed again."""
        if block_size == self.block_size:
            return
        if self._flights or self._index.worker_ids():
            raise ValueError(
                f"the workers' KV block size changed from {self.block_size} to {block_size} "
                "with prompts placed"
            )
        self.block_size = block_size
        for entry in self._entries.values():
            if entry.path is not None:
                self._index.untrack(entry.path)
            entry.hashes = None
            self._track(entry)
            self._lpm_reordered(entry)

    def on_evicted(self, worker_id: str, block_hashes: Sequence[bytes]) -> None:
        self._index.evict(worker_id, block_hashes)

    def _queued_entry(self, entry: IndexedEntryT) -> None:
        self._track(entry)
        self._lpm_queued(entry)

    def _track(self, entry: IndexedEntryT) -> None:
        """Follow the entry's prompt in the prefix index, and set its LPM order."""
        request = entry.request
        block_size = self.block_size
        if entry.hashes is None:
            entry.hashes = block_hashes(request.prompt_token_ids, block_size, request.cache_salt)
        # An engine recomputes the last block of a fully cached prompt (``PrefixMatcher``).
        max_blocks = max(0, (request.num_prompt_tokens - 1) // block_size)
        entry.path = self._index.track(entry.hashes, max_blocks, entry)
        entry.lpm_order = (-self._longest(entry), request.arrival)

    def _dequeued_entry(self, entry: IndexedEntryT) -> None:
        if entry.path is not None:
            self._index.untrack(entry.path)
            entry.path = None

    def _lpm_queued(self, entry: IndexedEntryT) -> None:
        """Hook: ``entry`` was queued with its ``lpm_order``."""

    def _lpm_reordered(self, entry: IndexedEntryT) -> None:
        """Hook: the ``lpm_order`` of the queued ``entry`` changed."""

    def _cached_tokens(self, entry: IndexedEntryT, worker_id: str) -> int:
        assert entry.path is not None  # queued
        return entry.path.num_blocks_at(worker_id) * self.block_size

    def _longest(self, entry: IndexedEntryT) -> int:
        assert entry.path is not None
        if self._is_index_local:
            return entry.path.longest() * self.block_size
        return max((self._cached_tokens(entry, w) for w in self._worker_ids), default=0)

    def _refresh_orders(self, run: Pass) -> None:
        """Bring ``lpm_order`` up to date for ``run.locality``: the entries whose longest match
        an index change may have altered, or every entry when the workers changed."""
        worker_ids = frozenset(w.worker_id for w in run.locality)
        if worker_ids != self._worker_ids:
            self._worker_ids = worker_ids
            self._is_index_local = self._index.worker_ids() <= worker_ids
            self._index.take_changed()
            entries: Iterable[IndexedEntryT] = list(self._entries.values())
        else:
            entries = (cast(IndexedEntryT, path.owner) for path in self._index.take_changed())
        for entry in entries:
            if not entry.is_queued:
                continue
            order = (-self._longest(entry), entry.request.arrival)
            if order != entry.lpm_order:
                entry.lpm_order = order
                self._lpm_reordered(entry)

    def _candidates(self, entry: IndexedEntryT, run: Pass) -> list[WorkerView]:
        is_colocated = not run.prefill
        return [w for w in run.locality if has_room(w, entry.request, is_colocated)]

    def _pick_worker(self, entry: IndexedEntryT, run: Pass) -> WorkerView | None:
        candidates = self._candidates(entry, run)
        if not candidates:
            return None
        return self._most_cached(entry, candidates)

    def _most_cached(self, entry: IndexedEntryT, candidates: list[WorkerView]) -> WorkerView:
        return max(
            candidates,
            key=lambda w: (
                self._cached_tokens(entry, w.worker_id),
                -self._load(w),
                w.free_kv_tokens,
            ),
        )

    def _dispatch(self, entry: IndexedEntryT, run: Pass) -> bool:
        worker = self._pick_worker(entry, run)
        if worker is None:
            run.failed(entry)
            return False
        return self._dispatch_to(entry, worker, run)

    def _dispatch_to(self, entry: IndexedEntryT, worker: WorkerView, run: Pass) -> bool:
        request = entry.request
        num_cached = self._cached_tokens(entry, worker.worker_id)
        if run.prefill:
            placement = place(request, [worker], run.decode, tpot_guard=run.tpot_guard)
        else:
            placement = place(request, [], [worker], tpot_guard=run.tpot_guard)
        if placement is None:  # no decode worker has KV room for it
            run.failed(entry)
            return False
        placement = Placement(
            request, placement.prefill_worker_id, placement.decode_worker_id, num_cached
        )
        run.add(placement)
        assert entry.hashes is not None  # made when it was queued
        self._index.insert(worker.worker_id, entry.hashes)
        self._placed(entry, placement, worker.worker_id, num_cached)
        entry.hashes = None  # the chain is no longer needed: free it
        return True

    def _charge_prompt(self, entry: IndexedEntryT, worker_id: str | None, num_cached: int) -> None:
        request = entry.request
        cost = self.settings.w_in * (request.num_prompt_tokens - num_cached)
        self._add_service(request.tenant_id, cost * self._unit(request))

    def _charge_output(self, flight: Flight, num_tokens: int) -> None:
        request = flight.entry.request
        cost = self.settings.w_out * num_tokens
        self._add_service(request.tenant_id, cost * self._unit(request))

    def _correct_prompt(self, flight: Flight, num_cached_tokens: int) -> None:
        request = flight.entry.request
        cost = self.settings.w_in * (flight.num_expected_cached - num_cached_tokens)
        self._add_service(request.tenant_id, cost * self._unit(request))
        flight.num_expected_cached = num_cached_tokens


class LpmQueue(Generic[IndexedEntryT]):
    """Queued entries in LPM order (``Entry.lpm_order``), kept across passes: arrivals are
    inserted in place, and it is re-sorted only when some entry's order changed
    (``is_unsorted``); entries that left stay until then and are skipped (``num_gone``)."""

    __slots__ = ("entries", "is_unsorted", "num_gone")

    def __init__(self) -> None:
        self.entries: list[IndexedEntryT] = []
        self.is_unsorted = False
        self.num_gone = 0

    def add(self, entry: IndexedEntryT) -> None:
        bisect.insort_right(self.entries, entry, key=LPM_ORDER)

    def in_order(self) -> list[IndexedEntryT]:
        if self.is_unsorted or self.num_gone > len(self.entries) // 2:
            self.entries = [entry for entry in self.entries if entry.is_queued]
            self.entries.sort(key=LPM_ORDER)
            self.is_unsorted = False
            self.num_gone = 0
        return self.entries
