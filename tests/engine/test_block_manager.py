"""The KV block allocator and its prefix cache: unit tests per behaviour, then a hypothesis state
machine that drives it like an engine would and checks it against a model of the KV contents."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from engine.block_manager import (
    HASH_SIZE,
    BlockManager,
    BlockManagerError,
    block_hashes,
    hash_block,
    root_hash,
)

BLOCK_SIZE = 4


def _cached_sequence(manager: BlockManager, token_ids: list[int], salt: bytes = b"") -> list[int]:
    """Allocate blocks for ``token_ids`` as a new sequence would, register its full blocks, and
    return its block table (still referenced)."""
    hashes = manager.hash_blocks(token_ids, salt)
    block_ids = manager.allocate(-(-len(token_ids) // manager.block_size))
    assert block_ids is not None
    for block_id, block_hash in zip(block_ids, hashes, strict=False):
        manager.register(block_id, block_hash)
    return block_ids


def _snapshot(manager: BlockManager) -> tuple[object, ...]:
    return (
        manager.num_free_blocks,
        manager.num_cached_blocks,
        [manager.ref_count(b) for b in range(manager.num_total_blocks)],
    )


# ---- hashing -------------------------------------------------------------------------------


def test_hash_chain_covers_full_blocks_only() -> None:
    token_ids = list(range(10))
    hashes = block_hashes(token_ids, BLOCK_SIZE, b"")
    assert len(hashes) == 2
    assert all(len(h) == HASH_SIZE for h in hashes)
    first = hash_block(root_hash(b""), token_ids[0:4])
    assert hashes == [first, hash_block(first, token_ids[4:8])]
    assert block_hashes(token_ids[:3], BLOCK_SIZE, b"") == []
    assert block_hashes(token_ids[:8], BLOCK_SIZE, b"") == hashes


def test_hash_depends_on_salt_tokens_and_parent() -> None:
    token_ids = [1, 2, 3, 4, 5, 6, 7, 8]
    base = block_hashes(token_ids, BLOCK_SIZE, b"tenant-a")
    assert block_hashes(token_ids, BLOCK_SIZE, b"tenant-a") == base
    assert set(block_hashes(token_ids, BLOCK_SIZE, b"tenant-b")).isdisjoint(base)
    assert set(block_hashes(token_ids, BLOCK_SIZE, b"")).isdisjoint(base)
    changed_first = block_hashes([9, *token_ids[1:]], BLOCK_SIZE, b"tenant-a")
    # The second block's tokens are equal, but its parent differs, so its hash does too.
    assert changed_first[1] != base[1]
    # Token ids are encoded at a fixed width: [1, 256] and [256, 1] must not collide.
    assert hash_block(root_hash(b""), [1, 256]) != hash_block(root_hash(b""), [256, 1])


def test_hash_encoding_is_stable() -> None:
    """Workers and the gateway compute these independently (and across versions): the encoding
    is BLAKE2b-256 over parent ‖ little-endian int64 token ids, with fixed personalizations."""
    root = hashlib.blake2b(b"t", digest_size=32, person=b"fairgate.root").digest()
    assert root_hash(b"t") == root
    tokens = b"".join(t.to_bytes(8, "little", signed=True) for t in (5, -1, 2**40))
    expected = hashlib.blake2b(root + tokens, digest_size=32, person=b"fairgate.block").digest()
    assert hash_block(root, [5, -1, 2**40]) == expected


def test_hash_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        hash_block(b"short", [1])
    with pytest.raises(ValueError):
        hash_block(root_hash(b""), [2**64])
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0, b"")


# ---- allocation ----------------------------------------------------------------------------


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, BLOCK_SIZE)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
    manager = BlockManager(5, BLOCK_SIZE)
    assert (manager.num_total_blocks, manager.num_free_blocks, manager.num_cached_blocks) == (
        5,
        5,
        0,
    )


def test_allocate_and_free_round_trip() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    block_ids = manager.allocate(3)
    assert block_ids is not None and len(set(block_ids)) == 3
    assert all(manager.ref_count(b) == 1 for b in block_ids)
    assert manager.num_free_blocks == 1
    assert manager.allocate(0) == []
    manager.free(block_ids)
    assert manager.num_free_blocks == 4
    assert manager.num_cached_blocks == 0
    manager.check_invariants()


def test_allocate_returns_none_without_side_effects_when_exhausted() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    held = _cached_sequence(manager, list(range(8)))  # 2 referenced, cached blocks
    cached = _cached_sequence(manager, list(range(100, 104)))
    manager.free(cached)  # 1 cached-unreferenced, 1 free: 2 available
    before = _snapshot(manager)
    assert manager.can_allocate(2)
    assert not manager.can_allocate(3)
    assert manager.allocate(3) is None
    assert _snapshot(manager) == before
    assert manager.drain_evicted_hashes() == []
    assert manager.peek_prefix(manager.hash_blocks(list(range(100, 104)), b"")) == 1
    with pytest.raises(ValueError):
        manager.allocate(-1)
    assert not manager.can_allocate(-1)
    manager.free(held)
    manager.check_invariants()


def test_allocate_takes_free_blocks_before_evicting() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    cached = _cached_sequence(manager, list(range(8)))
    manager.free(cached)
    fresh = manager.allocate(2)
    assert fresh is not None and set(fresh).isdisjoint(cached)
    assert manager.num_cached_blocks == 2
    assert manager.drain_evicted_hashes() == []


def test_eviction_is_lru_and_never_takes_referenced_blocks() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    seqs = [list(range(i * 10, i * 10 + 4)) for i in range(3)]
    tables = [_cached_sequence(manager, token_ids) for token_ids in seqs]
    held = manager.allocate(1)
    assert held is not None
    for table in tables:
        manager.free(table)  # LRU order now: seq0, seq1, seq2
    # A hit on seq0 makes it the most recently used once it is freed again.
    hit = manager.match_prefix(manager.hash_blocks(seqs[0], b""))
    assert hit == tables[0]
    manager.free(hit)
    evicted = manager.allocate(2)
    assert evicted == [tables[1][0], tables[2][0]]
    assert manager.drain_evicted_hashes() == [
        manager.hash_blocks(seqs[1], b"")[0],
        manager.hash_blocks(seqs[2], b"")[0],
    ]
    assert manager.peek_prefix(manager.hash_blocks(seqs[0], b"")) == 1
    assert manager.allocate(2) is None  # seq0's cached block is left, the held one is not
    assert manager.allocate(1) == tables[0]
    manager.check_invariants()


def test_free_releases_tail_first_so_chain_tails_are_evicted_first() -> None:
    manager = BlockManager(3, BLOCK_SIZE)
    token_ids = list(range(12))
    table = _cached_sequence(manager, token_ids)
    manager.free(table)
    assert manager.allocate(1) == [table[2]]
    assert manager.peek_prefix(manager.hash_blocks(token_ids, b"")) == 2


# ---- prefix cache --------------------------------------------------------------------------


def test_prefix_hit_after_free() -> None:
    manager = BlockManager(8, BLOCK_SIZE)
    prompt = list(range(10))  # 2 full blocks and a partial one
    table = _cached_sequence(manager, prompt)
    assert manager.num_cached_blocks == 2
    manager.free(table)
    assert manager.num_free_blocks == 8
    assert manager.num_cached_blocks == 2
    longer = [*prompt[:8], 42, 43, 44, 45, 46]
    hashes = manager.hash_blocks(longer, b"")
    assert manager.peek_prefix(hashes) == 2
    assert manager.num_free_blocks == 8  # peek takes no references
    hit = manager.match_prefix(hashes)
    assert hit == table[:2]
    assert [manager.ref_count(b) for b in hit] == [1, 1]
    assert manager.num_free_blocks == 6
    manager.check_invariants()


def test_match_shares_referenced_blocks() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    token_ids = list(range(8))
    table = _cached_sequence(manager, token_ids)
    hit = manager.match_prefix(manager.hash_blocks(token_ids, b""))
    assert hit == table
    assert [manager.ref_count(b) for b in table] == [2, 2]
    manager.free(table)
    manager.free(hit)
    assert manager.num_free_blocks == 4
    manager.check_invariants()


def test_match_stops_at_first_miss() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    token_ids = list(range(8))
    hashes = manager.hash_blocks(token_ids, b"")
    table = manager.allocate(2)
    assert table is not None
    manager.register(table[1], hashes[1])  # the second block alone is unreachable
    assert manager.peek_prefix(hashes) == 0
    assert manager.match_prefix(hashes) == []
    assert manager.ref_count(table[1]) == 1


def test_partial_block_is_not_cached() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    token_ids = list(range(6))
    table = _cached_sequence(manager, token_ids)
    assert len(table) == 2
    assert manager.num_cached_blocks == 1
    manager.free(table)
    assert manager.match_prefix(manager.hash_blocks(list(range(8)), b"")) == [table[0]]


def test_salts_never_share_blocks() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    token_ids = list(range(8))
    manager.free(_cached_sequence(manager, token_ids, salt=b"tenant-a"))
    assert manager.peek_prefix(manager.hash_blocks(token_ids, b"tenant-b")) == 0
    assert manager.match_prefix(manager.hash_blocks(token_ids, b"tenant-b")) == []
    assert manager.match_prefix(manager.hash_blocks(token_ids, b"")) == []
    assert len(manager.match_prefix(manager.hash_blocks(token_ids, b"tenant-a"))) == 2


def test_register_duplicate_keeps_the_first_block() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    block_hash = manager.hash_blocks(list(range(4)), b"")[0]
    first, second = manager.allocate(2) or []
    assert manager.register(first, block_hash) == first
    assert manager.register(first, block_hash) == first  # idempotent
    assert manager.register(second, block_hash) == first
    assert manager.num_cached_blocks == 1
    manager.free([second])
    manager.free([first])
    assert manager.num_cached_blocks == 1
    # The duplicate went back to the free list, so it is handed out before the cached block.
    fresh = manager.allocate(3)
    assert fresh is not None and second in fresh and first not in fresh
    assert manager.match_prefix([block_hash]) == [first]
    manager.check_invariants()


def test_register_rejects_protocol_errors() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    hash_a, hash_b = manager.hash_blocks(list(range(8)), b"")
    (block_id,) = manager.allocate(1) or []
    manager.register(block_id, hash_a)
    with pytest.raises(BlockManagerError):
        manager.register(block_id, hash_b)
    unreferenced = next(b for b in range(4) if manager.ref_count(b) == 0)
    with pytest.raises(BlockManagerError):
        manager.register(unreferenced, hash_b)
    with pytest.raises(BlockManagerError):
        manager.register(4, hash_b)
    manager.check_invariants()


# ---- references ----------------------------------------------------------------------------


def test_double_free_raises_and_changes_nothing() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    table = _cached_sequence(manager, list(range(8)))
    manager.free(table[1:])
    before = _snapshot(manager)
    with pytest.raises(BlockManagerError, match="double free"):
        manager.free(table)
    assert _snapshot(manager) == before
    with pytest.raises(BlockManagerError):
        manager.free([table[0], table[0]])  # one reference held, two released
    with pytest.raises(BlockManagerError):
        manager.free([-1])
    assert _snapshot(manager) == before
    manager.free(table[:1])
    manager.check_invariants()


def test_fork_and_incref_add_references() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    table = _cached_sequence(manager, list(range(6)))
    child = manager.fork(table)
    assert child == table and child is not table
    assert [manager.ref_count(b) for b in table] == [2, 2]
    manager.incref(table[:1])
    assert manager.ref_count(table[0]) == 3
    manager.free(table)
    manager.free(child)
    assert manager.num_free_blocks == 3
    manager.free(table[:1])
    assert manager.num_free_blocks == 4
    free_block = next(b for b in range(4) if manager.ref_count(b) == 0)
    with pytest.raises(BlockManagerError):
        manager.incref([free_block])
    manager.check_invariants()


# ---- eviction log and reset ----------------------------------------------------------------


def test_unregistered_blocks_leave_the_cache_and_are_freed_to_the_free_list() -> None:
    """The engine zeroed them: no prefix match may take them, the gateway hears they left (the
    eviction log), and once freed they are plain free blocks."""
    manager = BlockManager(4, BLOCK_SIZE)
    token_ids = list(range(8))
    hashes = manager.hash_blocks(token_ids, b"")
    block_ids = _cached_sequence(manager, token_ids)
    manager.unregister(block_ids[1:])
    assert manager.peek_prefix(hashes) == 1
    assert manager.drain_evicted_hashes() == [hashes[1]]
    manager.free(block_ids)
    manager.check_invariants()
    assert manager.num_cached_blocks == 1
    with pytest.raises(BlockManagerError, match="nobody references"):
        manager.unregister(block_ids[:1])


def test_drain_evicted_hashes() -> None:
    manager = BlockManager(2, BLOCK_SIZE)
    token_ids = list(range(8))
    hashes = manager.hash_blocks(token_ids, b"")
    manager.free(_cached_sequence(manager, token_ids))
    assert manager.drain_evicted_hashes() == []
    assert manager.allocate(2) is not None  # evicts the tail first
    assert manager.drain_evicted_hashes() == [hashes[1], hashes[0]]
    assert manager.drain_evicted_hashes() == []


def test_drain_skips_hashes_registered_again() -> None:
    manager = BlockManager(1, BLOCK_SIZE)
    hash_a, hash_b = manager.hash_blocks(list(range(8)), b"")
    manager.free(_cached_sequence(manager, list(range(4))))
    block_ids = manager.allocate(1)  # evicts hash_a
    assert block_ids is not None
    manager.register(block_ids[0], hash_a)  # recomputed: cached again
    manager.free(block_ids)
    assert manager.drain_evicted_hashes() == []
    block_ids = manager.allocate(1)
    assert block_ids is not None
    manager.register(block_ids[0], hash_b)
    assert manager.drain_evicted_hashes() == [hash_a]


def test_eviction_log_is_bounded() -> None:
    manager = BlockManager(1, BLOCK_SIZE, max_num_evicted_hashes=2)
    hashes = manager.hash_blocks(list(range(12)), b"")
    for block_hash in hashes:
        block_ids = manager.allocate(1)
        assert block_ids is not None
        manager.register(block_ids[0], block_hash)
        manager.free(block_ids)
    manager.allocate(1)
    manager.check_invariants()
    assert manager.drain_evicted_hashes() == hashes[1:]


def test_reset_prefix_cache() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    token_ids = list(range(8))
    table = _cached_sequence(manager, token_ids)
    assert manager.reset_prefix_cache() is False
    assert manager.num_cached_blocks == 2
    manager.free(table)
    assert manager.reset_prefix_cache() is True
    assert manager.num_cached_blocks == 0
    assert manager.num_free_blocks == 4
    assert sorted(manager.drain_evicted_hashes()) == sorted(manager.hash_blocks(token_ids, b""))
    manager.check_invariants()


def test_check_invariants_detects_corruption() -> None:
    manager = BlockManager(4, BLOCK_SIZE)
    table = _cached_sequence(manager, list(range(4)))
    manager.check_invariants()
    manager._free_block_ids.append(table[0])  # referenced and free at once
    with pytest.raises(BlockManagerError, match="also free"):
        manager.check_invariants()
    manager._free_block_ids.pop()
    manager._ref_counts[table[0]] = -1
    with pytest.raises(BlockManagerError, match="ref count -1"):
        manager.check_invariants()
    manager._ref_counts[table[0]] = 0  # hashed and unreferenced, but not in the LRU
    with pytest.raises(BlockManagerError, match="not in the LRU"):
        manager.check_invariants()
    manager._lru_block_ids[table[0]] = None
    manager.check_invariants()
    manager._hash_to_block_id[b"x" * HASH_SIZE] = 3
    with pytest.raises(BlockManagerError, match="does not carry it"):
        manager.check_invariants()
    del manager._hash_to_block_id[b"x" * HASH_SIZE]
    manager._free_block_ids.append(manager._free_block_ids[0])
    with pytest.raises(BlockManagerError, match="duplicates"):
        manager.check_invariants()


# ---- state machine -------------------------------------------------------------------------

SM_BLOCK_SIZE = 2
SM_NUM_BLOCKS = 10
SALTS = (b"", b"tenant-a")
MAX_NUM_SEQS = 6


@dataclass(slots=True)
class LiveSequence:
    salt: bytes
    token_ids: list[int]
    block_table: list[int]
    num_registered: int  # leading full blocks already registered
    hashes: list[bytes] = field(default_factory=list)


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like an engine and keeps a model of the KV tensor.

    ``contents[block_id]`` is what the test last "wrote" into a block: (salt, the sequence's tokens
    up to the block's end). A prefix hit must return blocks whose content is exactly the prefix
    asked for, so a block reused while held, a cross-salt hit, or a stale hash all fail here.
    """

    sequences = Bundle("sequences")

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(SM_NUM_BLOCKS, SM_BLOCK_SIZE)
        self.num_held = [0] * SM_NUM_BLOCKS  # references the test holds, per block
        self.contents: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self.num_live = 0

    def _expected_content(self, seq: LiveSequence, index: int) -> tuple[bytes, tuple[int, ...]]:
        return seq.salt, tuple(seq.token_ids[: (index + 1) * SM_BLOCK_SIZE])

    def _take_fresh(self, num_blocks: int) -> list[int] | None:
        num_free_before = self.manager.num_free_blocks
        fresh = self.manager.allocate(num_blocks)
        if fresh is None:
            assert num_free_before < num_blocks
            assert self.manager.num_free_blocks == num_free_before
            return None
        assert len(set(fresh)) == num_blocks
        for block_id in fresh:
            assert self.num_held[block_id] == 0, "allocate handed out a block still referenced"
            self.num_held[block_id] = 1
            self.contents.pop(block_id, None)  # about to be overwritten
        return fresh

    def _write_and_register(self, seq: LiveSequence) -> None:
        """Write every block the sequence owns (its own content) and register new full blocks."""
        seq.hashes = self.manager.hash_blocks(seq.token_ids, seq.salt)
        for index in range(seq.num_registered, len(seq.block_table)):
            block_id = seq.block_table[index]
            # Shared blocks are full and registered, and a shared partial block was copied.
            assert self.num_held[block_id] == 1
            self.contents[block_id] = self._expected_content(seq, index)
        for index in range(seq.num_registered, len(seq.hashes)):
            block_id = seq.block_table[index]
            canonical = self.manager.register(block_id, seq.hashes[index])
            assert self.contents[canonical] == self._expected_content(seq, index)
        seq.num_registered = len(seq.hashes)

    @precondition(lambda self: self.num_live < MAX_NUM_SEQS)
    @rule(
        target=sequences,
        salt=st.sampled_from(SALTS),
        token_ids=st.lists(st.integers(0, 2), min_size=1, max_size=8),
    )
    def add_sequence(self, salt: bytes, token_ids: list[int]) -> LiveSequence:
        hashes = self.manager.hash_blocks(token_ids, salt)
        num_peeked = self.manager.peek_prefix(hashes)
        cached = self.manager.match_prefix(hashes)
        assert len(cached) == num_peeked
        seq = LiveSequence(salt, token_ids, cached, num_registered=len(cached))
        for index, block_id in enumerate(cached):
            assert self.contents.get(block_id) == self._expected_content(seq, index)
            self.num_held[block_id] += 1
        fresh = self._take_fresh(-(-len(token_ids) // SM_BLOCK_SIZE) - len(cached))
        if fresh is None:
            self._release(cached)
            return LiveSequence(salt, [], [], 0)  # a dead handle: rules skip empty tables
        seq.block_table = cached + fresh
        self._write_and_register(seq)
        self.num_live += 1
        return seq

    @rule(seq=sequences, new_token_ids=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def append_tokens(self, seq: LiveSequence, new_token_ids: list[int]) -> None:
        if not seq.block_table:
            return
        last_index = len(seq.block_table) - 1
        last_block_id = seq.block_table[last_index]
        if len(seq.token_ids) % SM_BLOCK_SIZE and self.num_held[last_block_id] > 1:
            # Copy-on-write: the partial last block is shared with a fork.
            copy = self._take_fresh(1)
            if copy is None:
                return
            self._release([last_block_id])
            seq.block_table[last_index] = copy[0]
        token_ids = seq.token_ids + new_token_ids
        num_new = -(-len(token_ids) // SM_BLOCK_SIZE) - len(seq.block_table)
        fresh = self._take_fresh(num_new)
        if fresh is None:
            return
        seq.token_ids = token_ids
        seq.block_table += fresh
        self._write_and_register(seq)

    @precondition(lambda self: self.num_live < MAX_NUM_SEQS)
    @rule(target=sequences, parent=sequences)
    def fork(self, parent: LiveSequence) -> LiveSequence:
        if not parent.block_table:
            return LiveSequence(parent.salt, [], [], 0)
        table = self.manager.fork(parent.block_table)
        for block_id in table:
            self.num_held[block_id] += 1
        self.num_live += 1
        return LiveSequence(parent.salt, list(parent.token_ids), table, parent.num_registered)

    @rule(seq=consumes(sequences))
    def finish(self, seq: LiveSequence) -> None:
        if not seq.block_table:
            return
        self._release(seq.block_table)
        self.num_live -= 1

    @rule(data=st.data())
    def double_free_raises(self, data: st.DataObject) -> None:
        unheld = [b for b in range(SM_NUM_BLOCKS) if self.num_held[b] == 0]
        if not unheld:
            return
        block_id = data.draw(st.sampled_from(unheld))
        num_free_before = self.manager.num_free_blocks
        with pytest.raises(BlockManagerError):
            self.manager.free([block_id])
        assert self.manager.num_free_blocks == num_free_before

    @rule()
    def drain(self) -> None:
        for block_hash in self.manager.drain_evicted_hashes():
            assert self.manager.peek_prefix([block_hash]) == 0

    @rule()
    def reset(self) -> None:
        is_reset = self.manager.reset_prefix_cache()
        assert is_reset == (sum(self.num_held) == 0)
        if is_reset:
            assert self.manager.num_cached_blocks == 0

    def _release(self, block_ids: list[int]) -> None:
        self.manager.free(block_ids)
        for block_id in block_ids:
            self.num_held[block_id] -= 1
            assert self.num_held[block_id] >= 0

    @invariant()
    def bookkeeping_matches_the_model(self) -> None:
        self.manager.check_invariants()
        for block_id in range(SM_NUM_BLOCKS):
            assert self.manager.ref_count(block_id) == self.num_held[block_id]
        num_referenced = sum(1 for n in self.num_held if n > 0)
        assert self.manager.num_free_blocks == SM_NUM_BLOCKS - num_referenced


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_block_manager_state_machine = BlockManagerMachine.TestCase
