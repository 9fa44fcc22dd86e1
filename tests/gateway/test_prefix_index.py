"""The gateway's prefix index: tenant-scoped hash chains, LRU bound, eviction reports, the cap."""

from __future__ import annotations

import pytest

from engine.block_manager import block_hashes
from gateway.prefix_index import PrefixIndex, PrefixMatcher

BLOCK = 4


def _matcher(token_ids: list[int], salt: bytes = b"tenant-a") -> PrefixMatcher:
    return PrefixMatcher(token_ids, len(token_ids), BLOCK, salt)


def test_a_prompt_matches_the_full_blocks_it_shares_with_what_the_worker_was_sent() -> None:
    index = PrefixIndex(max_blocks_per_worker=100)
    sent = list(range(20))  # 5 blocks
    index.insert("w0", _matcher(sent).hashes)
    shared_then_new = [*range(10), 99, 98, 97, 96, 95, 94]  # shares blocks 0-1 and half of 2
    assert _matcher(shared_then_new).num_cached_tokens(index, "w0") == 8
    assert _matcher(shared_then_new).num_cached_tokens(index, "w1") == 0  # other worker


def test_the_match_leaves_at_least_one_token_to_compute_as_the_engine_does() -> None:
    index = PrefixIndex(max_blocks_per_worker=100)
    prompt = list(range(16))  # exactly 4 blocks
    index.insert("w0", _matcher(prompt).hashes)
    # Everything is cached, but the engine recomputes the last block to get logits.
    assert _matcher(prompt).num_cached_tokens(index, "w0") == 12
    assert _matcher([*prompt, 7]).num_cached_tokens(index, "w0") == 16


def test_tenant_b_never_matches_tenant_a_blocks() -> None:
    index = PrefixIndex(max_blocks_per_worker=100)
    prompt = list(range(40))
    index.insert("w0", _matcher(prompt, salt=b"tenant-a").hashes)
    assert _matcher(prompt, salt=b"tenant-a").num_cached_tokens(index, "w0") == 36
    assert _matcher(prompt, salt=b"tenant-b").num_cached_tokens(index, "w0") == 0


def test_reported_evictions_correct_the_index_and_a_cached_match() -> None:
    index = PrefixIndex(max_blocks_per_worker=100)
    prompt = list(range(40))
    hashes = block_hashes(prompt, BLOCK, b"tenant-a")
    index.insert("w0", hashes)
    matcher = _matcher(prompt)
    assert matcher.num_cached_tokens(index, "w0") == 36
    index.evict("w0", hashes[3:4])  # a hole at block 3: blocks 4.. no longer count
    assert matcher.num_cached_tokens(index, "w0") == 12
    assert index.num_blocks("w0") == 9


def test_the_lru_bound_prunes_chain_tails_first() -> None:
    index = PrefixIndex(max_blocks_per_worker=6)
    first = list(range(16))  # 4 blocks
    second = [*range(8), 50, 51, 52, 53, 54, 55, 56, 57]  # shares 2 blocks, 2 of its own
    index.insert("w0", _matcher(first).hashes)
    index.insert("w0", _matcher(second).hashes)
    assert index.num_blocks("w0") == 6
    index.insert("w0", _matcher([*range(8), 70, 71, 72, 73, 74]).hashes)  # 1 new block
    # The oldest block was the tail of the first prompt; its shared prefix was touched since.
    assert index.num_blocks("w0") == 6
    assert _matcher([*first, 1]).num_cached_tokens(index, "w0") == 12
    assert _matcher([*second, 1]).num_cached_tokens(index, "w0") == 16


def test_a_cached_match_grows_with_inserts_without_a_rescan() -> None:
    index = PrefixIndex(max_blocks_per_worker=100)
    prompt = list(range(41))
    matcher = _matcher(prompt)
    index.insert("w0", matcher.hashes[:3])
    assert matcher.num_cached_tokens(index, "w0") == 12
    index.insert("w0", matcher.hashes)
    assert matcher.num_cached_tokens(index, "w0") == 40


def test_a_prompt_shorter_than_a_block_never_matches() -> None:
    index = PrefixIndex(max_blocks_per_worker=100)
    assert _matcher([1, 2, 3]).num_cached_tokens(index, "w0") == 0
    assert _matcher([]).num_cached_tokens(index, "w0") == 0


@pytest.mark.parametrize("report_each_worker", [False, True])
def test_tracked_paths_match_like_a_scan_through_inserts_pruning_and_evictions(
    report_each_worker: bool,
) -> None:
    import random

    rng = random.Random(0)
    index = PrefixIndex(max_blocks_per_worker=40, report_each_worker=report_each_worker)
    documents = [[rng.randrange(1000) for _ in range(32)] for _ in range(4)]

    def prompt() -> list[int]:
        document = documents[rng.randrange(len(documents))]
        return [*document[: rng.randrange(4, 33)], *(rng.randrange(1000) for _ in range(6))]

    workers = ["w0", "w1", "w2"]
    tracked = []
    for _ in range(30):
        hashes = block_hashes(prompt(), BLOCK, b"tenant-a")
        tracked.append((hashes, index.track(hashes, len(hashes) - 1, owner=len(tracked))))
    longest = {id(path): path.longest() for _, path in tracked}
    matches = {id(path): [path.num_blocks_at(w) for w in workers] for _, path in tracked}
    for step in range(400):
        worker = rng.choice(workers)
        if rng.random() < 0.8:
            index.insert(worker, block_hashes(prompt(), BLOCK, b"tenant-a"))
        else:
            hashes, _ = rng.choice(tracked)
            index.evict(worker, [rng.choice(hashes)])
        if step % 50 == 0:  # paths come and go
            hashes, path = tracked.pop(rng.randrange(len(tracked)))
            index.untrack(path)
        changed = {id(path) for path in index.take_changed()}
        for hashes, path in tracked:
            stop = len(hashes) - 1
            scans = [index.match(w, hashes, 0, stop) for w in workers]
            assert [path.num_blocks_at(w) for w in workers] == scans
            assert path.longest() == max(scans)
            # Whose longest match changed was reported.
            assert longest.get(id(path), -1) == path.longest() or id(path) in changed
            longest[id(path)] = path.longest()
            if report_each_worker:  # and whose match at any one worker changed
                assert matches.get(id(path)) == scans or id(path) in changed
            matches[id(path)] = scans


def test_changes_at_one_worker_are_reported_only_when_asked_for() -> None:
    for report_each_worker in (False, True):
        index = PrefixIndex(max_blocks_per_worker=100, report_each_worker=report_each_worker)
        hashes = block_hashes(list(range(41)), BLOCK, b"tenant-a")
        path = index.track(hashes, 10, owner="queued")
        index.insert("w0", hashes)
        assert index.take_changed() == [path]  # its longest match grew
        index.insert("w1", hashes[:4])  # w1 now holds 4 of the 10 blocks: the longest is w0's
        assert path.num_blocks_at("w1") == 4
        assert index.take_changed() == ([path] if report_each_worker else [])
        index.evict("w1", hashes[2:3])
        assert path.num_blocks_at("w1") == 2
        assert index.take_changed() == ([path] if report_each_worker else [])
