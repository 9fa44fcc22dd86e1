"""Transfer plans: which blocks travel in place and which are staged, and the checks a receiver
applies to a plan it is sent."""

from __future__ import annotations

import pytest
import torch

from transfer.kv_layout import layout_mismatches, layout_of, plan_transfer, receiver_plan
from transfer.messages import PROTOCOL_VERSION, KvHello, KvLayoutInfo, TransferHeader


def test_runs_contiguous_on_both_ends_travel_in_place() -> None:
    src = [10, 11, 12, 13, 40, 7, 20, 21, 22]
    dst = [3, 4, 5, 6, 7, 9, 11, 12, 13]
    plan = plan_transfer(src, dst, min_direct_blocks=3)
    assert plan.direct_runs == ((0, 4), (6, 3))
    assert plan.rest == (4, 5)
    # index 4: 40 -> 7 does not extend either run (src jumps from 13 to 40)
    assert plan.pieces_per_layer_kv == 3
    messages = list(plan.messages(num_layers=2))
    assert len(messages) == 2 * 2 * 3
    assert [(m.layer, m.kv, m.start, m.count, m.is_rest) for m in messages[:3]] == [
        (0, 0, 0, 4, False),
        (0, 0, 6, 3, False),
        (0, 0, 0, 2, True),
    ]
    assert [m.index for m in messages] == list(range(12))


def test_short_runs_and_one_sided_runs_are_staged() -> None:
    assert plan_transfer([1, 2], [5, 6], min_direct_blocks=3).rest == (0, 1)
    one_sided = plan_transfer([1, 2, 3, 4], [9, 3, 7, 1], min_direct_blocks=2)
    assert one_sided.direct_runs == () and one_sided.rest == (0, 1, 2, 3)
    whole = plan_transfer(list(range(64)), list(range(100, 164)))
    assert whole.direct_runs == ((0, 64),) and whole.rest == ()
    with pytest.raises(ValueError, match="3 source blocks for 2"):
        plan_transfer([1, 2, 3], [1, 2])


def _header(dst: list[int], runs: list[tuple[int, int]]) -> TransferHeader:
    return TransferHeader("r", 0, len(dst) * 4, 1, 2, 0, dst, runs, (4, 2, 8), "float32", 3)


def test_the_receiver_recomputes_the_rest_and_checks_the_runs() -> None:
    plan = receiver_plan(_header([5, 6, 7, 1, 2], [(0, 3)]))
    assert plan.direct_runs == ((0, 3),) and plan.rest == (3, 4)
    with pytest.raises(ValueError, match="not contiguous in the destination"):
        receiver_plan(_header([5, 7, 8], [(0, 2)]))
    with pytest.raises(ValueError, match="out of order or out of range"):
        receiver_plan(_header([5, 6, 7], [(1, 3)]))
    with pytest.raises(ValueError, match="out of order or out of range"):
        receiver_plan(_header([1, 2, 3, 4], [(2, 2), (0, 2)]))


def test_layout_mismatches_name_every_difference() -> None:
    ours = layout_of(torch.zeros(2, 3, 8, 4, 2, 8), "model-a")
    assert (ours.backend, ours.dtype, ours.block_size, ours.num_layers) == ("gloo", "float32", 4, 3)
    theirs = layout_of(torch.zeros(2, 3, 8, 16, 2, 8, dtype=torch.float16), "model-a")
    problems = layout_mismatches(KvHello(PROTOCOL_VERSION + 1, "p", "s", theirs), ours)
    assert problems == [
        f"protocol_version {PROTOCOL_VERSION + 1} (peer) != {PROTOCOL_VERSION} (here)",
        "dtype 'float16' (peer) != 'float32' (here)",
        "block_size 16 (peer) != 4 (here)",
    ]
    assert layout_mismatches(KvHello(PROTOCOL_VERSION, "p", "s", ours), ours) == []
    with pytest.raises(ValueError, match="a KV cache is"):
        layout_of(torch.zeros(3, 8), "m")


def test_layout_differences_name_each_differing_field_with_both_values() -> None:
    """``KvLayoutInfo.differences``: the rule ``layout_mismatches`` applies in the handshake,
    torch-free, so a caller comparing two workers' announced layouts judges as the handshake
    would."""
    ours = KvLayoutInfo("model-a", "gloo", "float32", 16, 30, 3, 64)
    theirs = KvLayoutInfo("model-b", "gloo", "bfloat16", 16, 30, 3, 32)
    assert theirs.differences(ours) == [
        "model_id 'model-b' (this) != 'model-a' (other)",
        "dtype 'bfloat16' (this) != 'float32' (other)",
        "head_dim 32 (this) != 64 (other)",
    ]
    assert ours.differences(theirs, labels=("new worker", "pool"))[1] == (
        "dtype 'float32' (new worker) != 'bfloat16' (pool)"
    )
    assert ours.differences(KvLayoutInfo("model-a", "gloo", "float32", 16, 30, 3, 64)) == []
    # The handshake says the same, plus what only the handshake has (the protocol version).
    hello = KvHello(PROTOCOL_VERSION, "p", "s", theirs)
    assert layout_mismatches(hello, ours) == theirs.differences(ours, labels=("peer", "here"))
