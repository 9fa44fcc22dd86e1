"""The host pool swapped-out KV waits in (preemption by ``swap``). Torch-free: it hands out host
block ids and tells the runner which runs of blocks to copy; the runner owns the tensors.

Blocks move in runs: ``block_runs`` turns a block-to-block mapping into ``(src_start, dst_start,
count)`` runs over which both ends are consecutive, so a request whose blocks are mostly
consecutive (both allocators hand out the lowest free ids first) moves in a few slice copies
rather than one copy per block (FastSwitch: fine-grained copies waste the link).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from engine.block_manager import BlockManager
from engine.sequence import Sequence

__all__ = ["BlockRun", "SwapRunner", "SwapSpace", "block_runs"]

BlockRun = tuple[int, int, int]  # (first source block, first destination block, block count)


def block_runs(mapping: Iterable[tuple[int, int]]) -> list[BlockRun]:
    """Group ``(src_block, dst_block)`` pairs, in order, into runs consecutive on both ends::

    [(4, 0), (5, 1), (6, 2), (9, 3), (10, 4)]  ->  [(4, 0, 3), (9, 3, 2)]
    """
    runs: list[BlockRun] = []
    for src, dst in mapping:
        if runs:
            run_src, run_dst, count = runs[-1]
            if src == run_src + count and dst == run_dst + count:
                runs[-1] = (run_src, run_dst, count + 1)
                continue
        runs.append((src, dst, 1))
    return runs


class SwapRunner(Protocol):
    """What swapping needs from the runner (part of ``engine.engine.Runner``)."""

    def swap_out(self, runs: list[BlockRun]) -> None: ...
    def swap_in(self, runs: list[BlockRun]) -> None: ...


class SwapSpace:
    """Moves a sequence's KV between device blocks (``blocks``) and host blocks. The engine
    decides who goes and moves the sequence between its queues; this only moves blocks."""

    def __init__(
        self,
        runner: SwapRunner,
        blocks: BlockManager,
        num_host_blocks: int,
        *,
        enable_prefix_cache: bool,
    ) -> None:
        self.runner = runner
        self.blocks = blocks
        self.host_blocks = BlockManager(num_host_blocks, 1)  # ids only: the runner owns the pool
        self.enable_prefix_cache = enable_prefix_cache

    def swap_out(self, seq: Sequence) -> bool:
        """Copy the blocks holding ``seq``'s computed tokens to the host and free its device
        blocks; False (nothing changed) when it is still computing its prompt, or the pool is
        full."""
        if seq.num_tokens - seq.num_computed_tokens > 1:
            return False
        num_kv_blocks = -(-seq.num_computed_tokens // self.blocks.block_size)
        host_block_ids = self.host_blocks.allocate(num_kv_blocks)
        if host_block_ids is None:
            return False
        device_block_ids = seq.block_table[:num_kv_blocks]
        self.runner.swap_out(block_runs(zip(device_block_ids, host_block_ids, strict=True)))
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.host_block_table = host_block_ids
        return True

    def swap_in(self, seq: Sequence, may_take: Callable[[int], bool]) -> bool:
        """Device blocks for all of ``seq``'s tokens, its KV copied back into them, its host
        blocks freed; its full blocks still in the prefix cache are reused, not copied. False
        (nothing changed) when there is no room, or ``may_take(num_blocks)`` says no."""
        num_kv_blocks = len(seq.host_block_table)
        num_blocks = -(-seq.num_tokens // self.blocks.block_size)
        cached = self.blocks.match_prefix(seq.block_hashes) if self.enable_prefix_cache else []
        num_fresh = num_blocks - len(cached)
        fresh = self.blocks.allocate(num_fresh) if may_take(num_fresh) else None
        if fresh is None:
            self.blocks.free(cached)
            return False
        block_table = cached + fresh
        copies = zip(
            seq.host_block_table[len(cached) :],
            block_table[len(cached) : num_kv_blocks],
            strict=True,
        )
        self.runner.swap_in(block_runs(copies))
        for index in range(len(cached), len(seq.block_hashes)):
            self.blocks.register(block_table[index], seq.block_hashes[index])
        self.free(seq)
        seq.block_table = block_table
        return True

    def free(self, seq: Sequence) -> None:
        """Give ``seq``'s host blocks back (after a swap-in, or when it is dropped)."""
        if seq.host_block_table:
            self.host_blocks.free(seq.host_block_table)
        seq.host_block_table = []
