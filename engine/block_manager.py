"""KV block allocation with reference counts and a prefix cache over full blocks.

This module hands out block ids ``0 .. num_blocks - 1`` of a paged KV cache whose tensor lives in
the runner; it never touches tensors. Every block is in exactly one of three states::

    free                 ref_count == 0, no hash       in the free list
    cached-unreferenced  ref_count == 0, holds a hash  in the LRU (oldest first), reusable by a hit
    referenced           ref_count >= 1, hash or not   owned by one or more sequences

    allocate:    free (lowest id first) -> referenced, else evict LRU-oldest cached-unreferenced
    match_prefix: cached (either state) -> referenced (one more reference)
    register:    referenced without hash -> referenced with hash
    unregister:  referenced with hash -> referenced without hash
    free:        referenced -> (last reference) cached-unreferenced if hashed, else free

A full block's hash chains the hash of the block before it with the block's token ids, starting
from a root derived from a per-tenant ``salt``. The hash is cryptographic (BLAKE2b over a fixed
encoding), so a prompt of one tenant can never hit blocks computed for another: a shared prefix
cache leaks prompts through timing (vLLM CVE-2025-46570). The gateway computes the same chain with
``block_hashes`` for its approximate prefix index, which is why the hashing is module-level and
torch-free.

Check/act pairs as in nano-vllm: ``can_allocate`` / ``allocate``; ``allocate`` returns ``None``
(without side effects) when it cannot, and the caller decides whether to preempt. Every operation is
O(1) per block. Not thread-safe: the engine owns its block manager from one thread.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import struct
from collections.abc import Sequence

__all__ = [
    "HASH_SIZE",
    "BlockManager",
    "BlockManagerError",
    "block_hashes",
    "hash_block",
    "root_hash",
]

HASH_SIZE = 32  # bytes of one block hash
_ROOT_PERSON = b"fairgate.root"  # BLAKE2b personalization: root and block hashes never collide
_BLOCK_PERSON = b"fairgate.block"


class BlockManagerError(RuntimeError):
    """A caller broke the block protocol: a double free, a reference to a free block, an unknown
    block id, or registering a block under a second hash. These are engine bugs, not bad input, so
    they are raised rather than turned into client errors. (Belongs under the worker errors of the
    ``FairgateError`` hierarchy once that module exists.)"""


# ---- hashing -------------------------------------------------------------------------------


def root_hash(salt: bytes) -> bytes:
    """The parent of a chain's first block. Distinct salts give distinct roots, and so disjoint
    chains: the salt is chosen by the server (tenant id), never by the client."""
    return hashlib.blake2b(salt, digest_size=HASH_SIZE, person=_ROOT_PERSON).digest()


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one block: BLAKE2b(parent_hash ‖ token ids as little-endian int64).

    The parent has a fixed length, so the concatenation is unambiguous; the encoding does not
    depend on the platform or on Python's per-process ``hash()`` seed.
    """
    if len(parent_hash) != HASH_SIZE:
        raise ValueError(f"a parent hash has {HASH_SIZE} bytes, got {len(parent_hash)}")
    try:
        packed = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as exc:
        raise ValueError("token ids must be integers that fit in 64 bits") from exc
    return hashlib.blake2b(
        parent_hash + packed, digest_size=HASH_SIZE, person=_BLOCK_PERSON
    ).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes) -> list[bytes]:
    """Hash chain of the full blocks of ``token_ids``; a trailing partial block is not hashed
    because its content is not final."""
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    hashes: list[bytes] = []
    parent_hash = root_hash(salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes


# ---- the allocator -------------------------------------------------------------------------


class BlockManager:
    """Reference-counted KV blocks with an LRU prefix cache over full blocks.

    Duplicate content policy: ``register`` keeps the first block registered under a hash. A second
    block with the same content stays unhashed (it is freed to the free list, not the cache) and
    ``register`` returns the canonical block id, which the caller may ignore.
    """

    __slots__ = (
        "_block_hash",
        "_evicted_hashes",
        "_free_block_ids",
        "_hash_to_block_id",
        "_lru_block_ids",
        "_ref_counts",
        "block_size",
        "max_num_evicted_hashes",
        "num_total_blocks",
    )

    def __init__(
        self, num_blocks: int, block_size: int, *, max_num_evicted_hashes: int | None = None
    ) -> None:
        """``max_num_evicted_hashes`` bounds the undrained eviction log (default four times the
        cache); past it the oldest entries are dropped, which only leaves the gateway's already
        approximate index a little staler, instead of growing without bound when nobody drains."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        if max_num_evicted_hashes is None:
            max_num_evicted_hashes = 4 * num_blocks
        if max_num_evicted_hashes < 0:
            raise ValueError("max_num_evicted_hashes must be >= 0")
        self.max_num_evicted_hashes = max_num_evicted_hashes
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        # A min-heap: the lowest free ids go first, so a request's blocks tend to be consecutive
        # and move between workers as a few large slices instead of many small ones.
        self._free_block_ids: list[int] = list(range(num_blocks))
        # Cached-unreferenced blocks, least recently used first (values unused).
        self._lru_block_ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._hash_to_block_id: dict[bytes, int] = {}
        # An ordered set: a hash that is registered again before the drain is taken back out.
        self._evicted_hashes: dict[bytes, None] = {}

    # ---- counts ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks ``allocate`` can hand out: free plus cached-unreferenced (evictable)."""
        return len(self._free_block_ids) + len(self._lru_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered hash, referenced or not: what a prefix match can hit."""
        return len(self._hash_to_block_id)

    def ref_count(self, block_id: int) -> int:
        self._check_block_id(block_id)
        return self._ref_counts[block_id]

    # ---- prefix cache ------------------------------------------------------------------------

    def hash_blocks(self, token_ids: Sequence[int], salt: bytes) -> list[bytes]:
        """``block_hashes`` with this cache's block size."""
        return block_hashes(token_ids, self.block_size, salt)

    def peek_prefix(self, block_hashes: Sequence[bytes]) -> int:
        """How many leading blocks ``match_prefix`` would return, without taking references or
        touching the LRU (for scheduling estimates)."""
        num_matched = 0
        for block_hash in block_hashes:
            if block_hash not in self._hash_to_block_id:
                break
            num_matched += 1
        return num_matched

    def match_prefix(self, block_hashes: Sequence[bytes]) -> list[int]:
        """Take a reference to each block of the longest cached run of leading hashes and return
        their ids; the caller owns those references and gives them back with ``free``."""
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._hash_to_block_id.get(block_hash)
            if block_id is None:
                break
            if self._ref_counts[block_id] == 0:
                del self._lru_block_ids[block_id]  # no longer evictable
            self._ref_counts[block_id] += 1
            block_ids.append(block_id)
        return block_ids

    def register(self, block_id: int, block_hash: bytes) -> int:
        """Record that ``block_id`` (referenced by the caller) is full and holds the content whose
        hash is ``block_hash``. Returns the canonical block for that hash: ``block_id`` itself,
        or the block registered first when another already holds the same content (see the class
        docstring). Registering a block again under the same hash is a no-op."""
        self._check_block_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise BlockManagerError(f"register of block {block_id}, which nobody references")
        current_hash = self._block_hash[block_id]
        if current_hash is not None:
            if current_hash != block_hash:
                raise BlockManagerError(
                    f"block {block_id} is already registered under another hash"
                )
            return block_id
        canonical_block_id = self._hash_to_block_id.get(block_hash)
        if canonical_block_id is not None:
            return canonical_block_id
        self._block_hash[block_id] = block_hash
        self._hash_to_block_id[block_hash] = block_id
        self._evicted_hashes.pop(block_hash, None)
        return block_id

    def unregister(self, block_ids: Sequence[int]) -> None:
        """Take these (referenced) blocks out of the prefix cache: their content is no longer
        what their hash says (the engine zeroed it). They stay referenced; freed, they go to the
        free list. Their hashes join the eviction log, like any block that left the cache."""
        for block_id in block_ids:
            self._check_block_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise BlockManagerError(f"unregister of block {block_id}, which nobody references")
            block_hash = self._block_hash[block_id]
            if block_hash is None:
                continue
            self._block_hash[block_id] = None
            del self._hash_to_block_id[block_hash]
            self._log_eviction(block_hash)

    def drain_evicted_hashes(self) -> list[bytes]:
        """Hashes evicted since the last call and not registered again since, oldest first; the
        gateway corrects its prefix index from these."""
        evicted_hashes = list(self._evicted_hashes)
        self._evicted_hashes.clear()
        return evicted_hashes

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after new weights). Only possible while no block is
        referenced, since a running sequence's blocks must keep their hashes; returns False then
        and changes nothing. Dropped hashes are reported by ``drain_evicted_hashes``."""
        if self.num_free_blocks != self.num_total_blocks:
            return False
        while self._lru_block_ids:
            heapq.heappush(self._free_block_ids, self._evict_oldest())
        return True

    # ---- allocation --------------------------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int] | None:
        """``num_blocks`` fresh blocks with one reference each, or None (and nothing changed) when
        there are not enough. Takes free blocks first, then evicts the least recently used
        cached-unreferenced ones; referenced blocks are never taken."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if not self.can_allocate(num_blocks):
            return None
        block_ids: list[int] = []
        for _ in range(num_blocks):
            block_id = (
                heapq.heappop(self._free_block_ids)
                if self._free_block_ids
                else self._evict_oldest()
            )
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block; each must already be referenced (by the caller)."""
        for block_id in block_ids:
            self._check_block_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise BlockManagerError(f"incref of block {block_id}, which nobody references")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def fork(self, block_ids: Sequence[int]) -> list[int]:
        """Share a block table with a new sequence: one more reference to each block, returned as
        the child's own table. Writing into a shared partial block needs copy-on-write first."""
        self.incref(block_ids)
        return list(block_ids)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block (a block may appear as often as the caller holds it).

        Give ``block_ids`` in sequence order: they are released tail first, so a chain's last block
        becomes the oldest in the LRU and is evicted before the blocks its hash depends on. Raises
        ``BlockManagerError``, changing nothing, if any reference is not held.
        """
        num_frees: dict[int, int] = {}
        for block_id in block_ids:
            self._check_block_id(block_id)
            num_frees[block_id] = num_frees.get(block_id, 0) + 1
        for block_id, num in num_frees.items():
            if num > self._ref_counts[block_id]:
                raise BlockManagerError(
                    f"free of block {block_id} with {self._ref_counts[block_id]} references "
                    f"({num} requested): double free"
                )
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            if self._block_hash[block_id] is None:
                heapq.heappush(self._free_block_ids, block_id)
            else:
                self._lru_block_ids[block_id] = None  # most recently used end

    # ---- internals ---------------------------------------------------------------------------

    def _check_block_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_total_blocks:
            raise BlockManagerError(f"block id {block_id} is not in [0, {self.num_total_blocks})")

    def _evict_oldest(self) -> int:
        """Turn the least recently used cached-unreferenced block into a free (unlisted) one."""
        block_id, _ = self._lru_block_ids.popitem(last=False)
        block_hash = self._block_hash[block_id]
        assert block_hash is not None  # only hashed blocks enter the LRU
        self._block_hash[block_id] = None
        del self._hash_to_block_id[block_hash]
        self._log_eviction(block_hash)
        return block_id

    def _log_eviction(self, block_hash: bytes) -> None:
        self._evicted_hashes[block_hash] = None
        if len(self._evicted_hashes) > self.max_num_evicted_hashes:
            del self._evicted_hashes[next(iter(self._evicted_hashes))]

    def check_invariants(self) -> None:
        """Raise ``BlockManagerError`` if the bookkeeping is inconsistent. O(num_blocks): for tests
        and debugging, not the hot path."""
        n = self.num_total_blocks
        problems: list[str] = []
        if len(self._ref_counts) != n or len(self._block_hash) != n:
            problems.append("per-block arrays do not have num_total_blocks entries")
        free_ids = set(self._free_block_ids)
        if len(free_ids) != len(self._free_block_ids):
            problems.append("duplicates in the free list")
        num_referenced = 0
        for block_id, (ref_count, block_hash) in enumerate(
            zip(self._ref_counts, self._block_hash, strict=True)
        ):
            is_free = block_id in free_ids
            is_lru = block_id in self._lru_block_ids
            if ref_count < 0:
                problems.append(f"block {block_id} has ref count {ref_count}")
            elif ref_count > 0:
                num_referenced += 1
                if is_free or is_lru:
                    problems.append(f"referenced block {block_id} is also free or evictable")
            elif block_hash is None and not is_free:
                problems.append(f"unreferenced unhashed block {block_id} is not in the free list")
            elif block_hash is not None and not is_lru:
                problems.append(f"cached-unreferenced block {block_id} is not in the LRU")
            if block_hash is not None and self._hash_to_block_id.get(block_hash) != block_id:
                problems.append(f"block {block_id} carries a hash that maps elsewhere")
        for block_id in free_ids:
            if not 0 <= block_id < n or self._block_hash[block_id] is not None:
                problems.append(f"free-list entry {block_id} is out of range or hashed")
        for block_id in self._lru_block_ids:
            if not 0 <= block_id < n or self._block_hash[block_id] is None:
                problems.append(f"LRU entry {block_id} is out of range or unhashed")
        for block_hash, block_id in self._hash_to_block_id.items():
            if not 0 <= block_id < n or self._block_hash[block_id] != block_hash:
                problems.append(f"a hash maps to block {block_id}, which does not carry it")
        if len(self._free_block_ids) + len(self._lru_block_ids) + num_referenced != n:
            problems.append("free + cached-unreferenced + referenced != num_total_blocks")
        if any(block_hash in self._hash_to_block_id for block_hash in self._evicted_hashes):
            problems.append("an evicted hash is still cached")
        if len(self._evicted_hashes) > self.max_num_evicted_hashes:
            problems.append("the eviction log exceeds max_num_evicted_hashes")
        if problems:
            raise BlockManagerError("block manager invariants broken: " + "; ".join(problems))
