"""The shape of a paged KV cache as the data plane sees it, and how one request's blocks travel.

The cache is the runner's tensor (see ``engine.runner``)::

    kv_cache[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]

so for one layer, the keys (or values) of a run of consecutive block ids are one contiguous slice
``kv_cache[kv, layer, first:first + count]``. A transfer moves ``n`` blocks from the sender's ids
``src[0..n)`` to the receiver's ids ``dst[0..n)``. Where both ``src`` and ``dst`` go up by one
over a long enough stretch, that stretch is a *direct run*: sent from and received into the
caches in place, no copy on either side. Every other index goes into one *rest* piece: gathered
into a staging buffer by the sender and scattered from one by the receiver::

    index   0   1   2   3   4   5   6   7   8
    src    10  11  12  13  40   7  20  21  22
    dst     3   4   5   6   7   9  11  12  13
            └── run (0, 4) ─┘  rest  └ run (6, 3) ┘     (with min_direct_blocks = 3)

Messages go layer by layer, keys before values, runs in order, then the rest piece.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from transfer.messages import PROTOCOL_VERSION, KvHello, KvLayoutInfo, TransferHeader

__all__ = [
    "KvMessage",
    "TransferPlan",
    "backend_for",
    "layout_mismatches",
    "layout_of",
    "plan_transfer",
    "receiver_plan",
]

# Below this many blocks a message's fixed cost outweighs the copy it saves (measured on loopback
# TCP: ~30 µs a message against ~5 µs to copy a block of SmolLM2's keys of one layer).
DEFAULT_MIN_DIRECT_BLOCKS = 8


def backend_for(device: torch.device) -> str:
    """``nccl`` for KV on CUDA, ``gloo`` for KV in host memory."""
    return "nccl" if device.type == "cuda" else "gloo"


def layout_of(kv_cache: torch.Tensor, model_id: str) -> KvLayoutInfo:
    """The layout a peer must match to exchange blocks with ``kv_cache``."""
    if kv_cache.dim() != 6 or kv_cache.shape[0] != 2:
        raise ValueError(
            "a KV cache is [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    _, num_layers, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    return KvLayoutInfo(
        model_id=model_id,
        backend=backend_for(kv_cache.device),
        dtype=str(kv_cache.dtype).removeprefix("torch."),
        block_size=block_size,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def layout_mismatches(hello: KvHello, local: KvLayoutInfo) -> list[str]:
    """Why a peer cannot pair with us, one line per difference (empty: compatible)."""
    problems: list[str] = []
    if hello.protocol_version != PROTOCOL_VERSION:
        problems.append(
            f"protocol_version {hello.protocol_version} (peer) != {PROTOCOL_VERSION} (here)"
        )
    problems += hello.layout.differences(local, labels=("peer", "here"))
    return problems


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """Which indices of a transfer's block list travel in place (``direct_runs``) and which are
    staged (``rest``)."""

    num_blocks: int
    direct_runs: tuple[tuple[int, int], ...]  # (start index, count)
    rest: tuple[int, ...]  # indices, ascending

    @property
    def pieces_per_layer_kv(self) -> int:
        return len(self.direct_runs) + (1 if self.rest else 0)

    def messages(self, num_layers: int) -> Iterator[KvMessage]:
        index = 0
        for layer in range(num_layers):
            for kv in (0, 1):
                for start, count in self.direct_runs:
                    yield KvMessage(index, layer, kv, start, count, is_rest=False)
                    index += 1
                if self.rest:
                    yield KvMessage(index, layer, kv, 0, len(self.rest), is_rest=True)
                    index += 1


@dataclass(frozen=True, slots=True)
class KvMessage:
    """One message of a transfer: ``count`` blocks of one layer's keys (kv 0) or values (kv 1),
    either the direct run starting at index ``start`` or the rest piece."""

    index: int
    layer: int
    kv: int
    start: int
    count: int
    is_rest: bool


def _is_consecutive(block_ids: Sequence[int], start: int, count: int) -> bool:
    first = block_ids[start]
    return all(block_ids[start + i] == first + i for i in range(count))


def plan_transfer(
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    *,
    min_direct_blocks: int = DEFAULT_MIN_DIRECT_BLOCKS,
) -> TransferPlan:
    """Split a transfer into maximal runs contiguous on both ends (kept when at least
    ``min_direct_blocks`` long) and the rest."""
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(
            f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks"
        )
    num_blocks = len(src_block_ids)
    runs: list[tuple[int, int]] = []
    rest: list[int] = []
    start = 0
    while start < num_blocks:
        end = start + 1
        while (
            end < num_blocks
            and src_block_ids[end] == src_block_ids[end - 1] + 1
            and dst_block_ids[end] == dst_block_ids[end - 1] + 1
        ):
            end += 1
        if end - start >= min_direct_blocks:
            runs.append((start, end - start))
        else:
            rest.extend(range(start, end))
        start = end
    return TransferPlan(num_blocks, tuple(runs), tuple(rest))


def receiver_plan(header: TransferHeader) -> TransferPlan:
    """The plan a header describes, checked: runs in order, disjoint, in range, and contiguous in
    the destination. Raises ``ValueError`` naming the problem."""
    num_blocks = len(header.dst_block_ids)
    covered: list[int] = []
    previous_end = 0
    for start, count in header.direct_runs:
        if count < 1 or start < previous_end or start + count > num_blocks:
            raise ValueError(f"direct run ({start}, {count}) is out of order or out of range")
        if not _is_consecutive(header.dst_block_ids, start, count):
            raise ValueError(f"direct run ({start}, {count}) is not contiguous in the destination")
        covered.extend(range(start, start + count))
        previous_end = start + count
    covered_set = set(covered)
    rest = tuple(index for index in range(num_blocks) if index not in covered_set)
    return TransferPlan(num_blocks, tuple(header.direct_runs), rest)
