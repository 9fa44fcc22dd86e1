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

A policy that orders a long queue by longest match (DLPM) tracks its queued prompts instead
(``track``): the index keeps a tree of their chains (a chain hash names its whole prefix, so
prompts sharing a document share nodes), each node marked with the workers that hold it *and*
all its ancestors. Marks change only where a block is added or removed, so a queued prompt's
match is a binary search over its own path (marks are prefix-closed along it) and nothing is
rescanned for the thousands of prompts an index change does not touch; the paths whose longest
match over all workers may have changed are handed out by ``take_changed`` (with
``report_each_worker``, those whose match at any one worker may have changed: for a policy that
orders each worker's queue by its own match)::

    doc0/b0 ─ doc0/b1 ─ … ─ doc0/b127 ─┬─ q17/b0 …      a node: {workers holding it and its
      {w0,w3}  {w0,w3}       {w3}      └─ q42/b0 …              ancestors}; paths end at leaves

Torch-free; pure (no clock, no I/O).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_manager import block_hashes

__all__ = ["PrefixIndex", "PrefixMatcher", "PrefixPath"]


@dataclass(slots=True)
class _WorkerBlocks:
    """One worker's blocks in LRU order (oldest first). ``num_removals`` counts removals (LRU
    pruning and reported evictions): a cached match made before a removal may be too long."""

    hashes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    num_removals: int = 0


class PrefixIndex:
    """Per worker, the block hashes it probably holds, at most ``max_blocks_per_worker`` each."""

    def __init__(self, max_blocks_per_worker: int, *, report_each_worker: bool = False) -> None:
        if max_blocks_per_worker < 1:
            raise ValueError(
                f"max_blocks_per_worker must be at least 1, got {max_blocks_per_worker}"
            )
        self.max_blocks_per_worker = max_blocks_per_worker
        self.num_evictions_total = 0  # reported evictions over every worker
        self._workers: dict[str, _WorkerBlocks] = {}
        self._tree = _Tree(self._workers, report_each_worker)

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
        tree = self._tree
        for block_hash in reversed(hashes):  # deepest first: prefixes end up the most recent
            if block_hash in held:
                held.move_to_end(block_hash)
            else:
                held[block_hash] = None
                tree.added(worker_id, block_hash)
        if len(held) > self.max_blocks_per_worker:
            worker.num_removals += 1
            while len(held) > self.max_blocks_per_worker:
                tree.removed(worker_id, held.popitem(last=False)[0])

    def evict(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        """The worker reported that it evicted these blocks."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        worker.num_removals += 1
        self.num_evictions_total += 1
        for block_hash in hashes:
            if worker.hashes.pop(block_hash, 0) is None:  # it was held
                self._tree.removed(worker_id, block_hash)

    def worker_ids(self) -> set[str]:
        """The workers the index has blocks for (or had)."""
        return set(self._workers)

    def track(self, hashes: Sequence[bytes], max_blocks: int, owner: object) -> PrefixPath:
        """Follow the first ``max_blocks`` blocks of a queued prompt's chain until ``untrack``;
        ``owner`` comes back from ``take_changed``."""
        return self._tree.track(hashes[:max_blocks], owner)

    def untrack(self, path: PrefixPath) -> None:
        self._tree.untrack(path)

    def take_changed(self) -> list[PrefixPath]:
        """The tracked paths whose longest match over all workers (with ``report_each_worker``:
        whose match at some worker) may have changed since the last call (at least those;
        ``PrefixPath.longest`` and ``num_blocks_at`` tell)."""
        return self._tree.take_changed()


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


class _Node:
    """A block of one or more tracked chains. ``workers``: those holding it and every ancestor."""

    __slots__ = ("block_hash", "children", "num_paths", "parent", "paths", "workers")

    def __init__(self, block_hash: bytes, parent: _Node | None, workers: set[str]) -> None:
        self.block_hash = block_hash
        self.parent = parent
        self.children: dict[bytes, _Node] = {}
        self.workers = workers
        self.num_paths = 0  # tracked paths through this node
        self.paths: list[PrefixPath] = []  # tracked paths ending here


class PrefixPath:
    """A tracked prompt's chain in the index's tree (``PrefixIndex.track``)."""

    __slots__ = ("_frontier", "_tree", "is_changed", "nodes", "owner")

    def __init__(self, nodes: list[_Node], owner: object, tree: _Tree) -> None:
        self.nodes = nodes
        self.owner = owner
        self.is_changed = False
        self._tree = tree
        self._frontier: tuple[int, _Node | None] = (-1, None)  # (tree's num_changes, node)

    def num_blocks_at(self, worker_id: str) -> int:
        """Leading blocks the worker holds: as ``PrefixIndex.match`` over the path."""
        # Marks are prefix-closed along a path: the held nodes are a leading run.
        nodes = self.nodes
        low, high = 0, len(nodes)
        while low < high:
            mid = (low + high) // 2
            if worker_id in nodes[mid].workers:
                low = mid + 1
            else:
                high = mid
        return low

    def longest(self) -> int:
        """Leading blocks held by the worker that holds the most of them."""
        nodes = self.nodes
        low, high = 0, len(nodes)
        while low < high:
            mid = (low + high) // 2
            if nodes[mid].workers:
                low = mid + 1
            else:
                high = mid
        return low

    def frontier(self) -> object | None:
        """The deepest block any worker holds (None: none). Paths with the same frontier have
        the same match at every worker: they share every block up to it, and no worker holds
        a block beyond it."""
        num_changes, node = self._frontier
        if num_changes != self._tree.num_changes:
            longest = self.longest()
            node = self.nodes[longest - 1] if longest else None
            self._frontier = (self._tree.num_changes, node)
        return node


class _Tree:
    """The tracked chains and their marks (see the module docstring). Invariant: ``w`` is in
    ``node.workers`` exactly when worker ``w`` holds the node's block and ``w`` is in its
    parent's (a root: no parent condition). ``report_each_worker``: report the paths through
    any node whose marks change, not only through those held by some worker or by none."""

    def __init__(self, workers: dict[str, _WorkerBlocks], report_each_worker: bool) -> None:
        self._held = workers
        self._report_each_worker = report_each_worker
        self._nodes: dict[bytes, _Node] = {}
        self._changed: list[PrefixPath] = []
        self.num_changes = 0  # at least of the set of blocks some worker holds (tracked ones)

    def track(self, hashes: Sequence[bytes], owner: object) -> PrefixPath:
        nodes: list[_Node] = []
        parent: _Node | None = None
        for block_hash in hashes:
            node = self._nodes.get(block_hash)
            if node is None:
                candidates = self._held.keys() if parent is None else parent.workers
                holders = {w for w in candidates if block_hash in self._held[w].hashes}
                node = self._nodes[block_hash] = _Node(block_hash, parent, holders)
                if parent is not None:
                    parent.children[block_hash] = node
            node.num_paths += 1
            nodes.append(node)
            parent = node
        path = PrefixPath(nodes, owner, self)
        if nodes:
            nodes[-1].paths.append(path)
        return path

    def untrack(self, path: PrefixPath) -> None:
        if not path.nodes:
            return
        path.nodes[-1].paths.remove(path)
        for node in reversed(path.nodes):
            node.num_paths -= 1
            if node.num_paths == 0:  # then its children are gone already: deepest first
                del self._nodes[node.block_hash]
                if node.parent is not None:
                    del node.parent.children[node.block_hash]
        path.nodes = []

    def take_changed(self) -> list[PrefixPath]:
        changed, self._changed = self._changed, []
        for path in changed:
            path.is_changed = False
        return changed

    def added(self, worker_id: str, block_hash: bytes) -> None:
        node = self._nodes.get(block_hash)
        if node is None or worker_id in node.workers:
            return
        if node.parent is not None and worker_id not in node.parent.workers:
            return  # marked once its parent is (below)
        held = self._held[worker_id].hashes
        is_new_anywhere = False
        start = node
        stack = [node]
        while stack:
            node = stack.pop()
            is_new_anywhere |= not node.workers
            node.workers.add(worker_id)
            stack.extend(
                child
                for child in node.children.values()
                if worker_id not in child.workers and child.block_hash in held
            )
        if is_new_anywhere or self._report_each_worker:
            self._mark_changed(start)

    def removed(self, worker_id: str, block_hash: bytes) -> None:
        start = self._nodes.get(block_hash)
        if start is None or worker_id not in start.workers:
            return
        is_gone_anywhere = False
        stack = [start]
        while stack:
            node = stack.pop()
            node.workers.discard(worker_id)
            is_gone_anywhere |= not node.workers
            stack.extend(c for c in node.children.values() if worker_id in c.workers)
        if is_gone_anywhere or self._report_each_worker:
            self._mark_changed(start)

    def _mark_changed(self, start: _Node) -> None:
        """Every path through ``start``: its longest match may have changed."""
        self.num_changes += 1
        stack = [start]
        while stack:
            node = stack.pop()
            for path in node.paths:
                if not path.is_changed:
                    path.is_changed = True
                    self._changed.append(path)
            stack.extend(node.children.values())
