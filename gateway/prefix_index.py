"""The gateway's approximate prefix index (``scheduling.md`` §4): which prompt blocks each worker
probably still holds in its prefix cache, so that the LPM policies can send a request where most
of its prompt is already computed.

It records, per worker, the block hash chains (``engine.block_manager.block_hashes``) of the
prompts the gateway sent there. Chains are rooted in the request's ``cache_salt`` (one per
tenant), so a chain of one tenant never matches another's: the index leaks no more than the
engine's own cache does. It is approximate on purpose: bounded by an LRU sized to the worker's
cache, and corrected when a worker reports evictions (``evict``).

LRU order keeps every block at least as recent as its descendants (``insert`` touches a chain
deepest block first), so pruning removes chain tails before their prefixes, as an engine does,
and a match never has to look past a hole made by pruning::

    oldest ──────────────────────────────▶ newest
    [ B3  B2  A2 | B1  A1  root-shared ]     insert(A) then insert(B): B's chain, then A's …
      ▲ pruned first: the tails

Matching is a scan of leading hashes. ``PrefixMatcher`` caches a request's hash chain and its
match per worker, rechecking only what an index change can have altered: after inserts only,
a match can only grow (continue the scan where it stopped); after any removal it is recomputed.

Torch-free; pure (no clock, no I/O).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_manager import block_hashes

__all__ = ["PrefixIndex", "PrefixMatcher"]


@dataclass(slots=True)
class _WorkerBlocks:
    """One worker's blocks in LRU order (oldest first). ``num_removals`` counts removals (LRU
    pruning and reported evictions): a cached match made before a removal may be too long."""

    hashes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    num_removals: int = 0


class PrefixIndex:
    """Per worker, the block hashes it probably holds, at most ``max_blocks_per_worker`` each."""

    def __init__(self, max_blocks_per_worker: int) -> None:
        if max_blocks_per_worker < 1:
            raise ValueError(
                f"max_blocks_per_worker must be at least 1, got {max_blocks_per_worker}"
            )
        self.max_blocks_per_worker = max_blocks_per_worker
        self.num_evictions_total = 0  # reported evictions over every worker
        self._workers: dict[str, _WorkerBlocks] = {}

    def num_blocks(self, worker_id: str) -> int:
        worker = self._workers.get(worker_id)
        return 0 if worker is None else len(worker.hashes)

    def num_removals(self, worker_id: str) -> int:
        worker = self._workers.get(worker_id)
        return 0 if worker is None else worker.num_removals

    def match(
        self, worker_id: str, hashes: Sequence[bytes], start: int = 0, stop: int | None = None
    ) -> int:
        """How many leading blocks of ``hashes[:stop]`` the worker holds, given that the first
        ``start`` are known to be there."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return 0
        held = worker.hashes
        stop = len(hashes) if stop is None else min(stop, len(hashes))
        num_matched = start
        while num_matched < stop and hashes[num_matched] in held:
            num_matched += 1
        return num_matched

    def insert(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        """The worker was sent a prompt with this chain: it will hold these blocks."""
        worker = self._workers.setdefault(worker_id, _WorkerBlocks())
        held = worker.hashes
        for block_hash in reversed(hashes):  # deepest first: prefixes end up the most recent
            if block_hash in held:
                held.move_to_end(block_hash)
            else:
                held[block_hash] = None
        if len(held) > self.max_blocks_per_worker:
            worker.num_removals += 1
            while len(held) > self.max_blocks_per_worker:
                held.popitem(last=False)

    def evict(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        """The worker reported that it evicted these blocks."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        worker.num_removals += 1
        self.num_evictions_total += 1
        for block_hash in hashes:
            worker.hashes.pop(block_hash, None)


class PrefixMatcher:
    """One request's view of the index: its hash chain, computed once (prompts may be long), and
    its match per worker, kept until the index changes under it.

    The match is capped at ``(num_prompt_tokens - 1) // block_size`` blocks because an engine
    recomputes the last block of a fully cached prompt to have logits to sample from
    (``engine.engine``): at least one token is always computed."""

    __slots__ = ("_hashes", "_matches", "block_size", "max_blocks", "salt", "token_ids")

    def __init__(
        self, token_ids: Sequence[int], num_prompt_tokens: int, block_size: int, salt: bytes
    ) -> None:
        self.token_ids = token_ids
        self.block_size = block_size
        self.salt = salt
        self.max_blocks = max(0, (num_prompt_tokens - 1) // block_size)
        self._hashes: list[bytes] | None = None
        self._matches: dict[str, tuple[int, int]] = {}  # worker -> (num_removals seen, blocks)

    @property
    def hashes(self) -> list[bytes]:
        if self._hashes is None:
            self._hashes = block_hashes(self.token_ids, self.block_size, self.salt)
        return self._hashes

    def num_cached_tokens(self, index: PrefixIndex, worker_id: str) -> int:
        """Tokens of the prompt the worker probably holds (full blocks, capped as above)."""
        if self.max_blocks == 0 or len(self.token_ids) < self.block_size:
            return 0
        num_removals = index.num_removals(worker_id)
        seen = self._matches.get(worker_id)
        start = seen[1] if seen is not None and seen[0] == num_removals else 0
        num_blocks = index.match(worker_id, self.hashes, start, self.max_blocks)
        self._matches[worker_id] = (num_removals, num_blocks)
        return num_blocks * self.block_size
