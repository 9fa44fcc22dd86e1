"""engine.process_heap: freezing what startup built."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from engine.process_heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's other tests expect a normal collector


def test_freezing_keeps_what_is_alive_out_of_collections_and_frees_garbage_first(
    unfrozen: None,
) -> None:
    garbage = weakref.ref(_Node())  # unreachable at once, but in a cycle
    alive = _Node()
    freeze_startup_heap()
    assert garbage() is None  # collected before freezing, not frozen forever
    assert gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects())  # out of the collector's view
    later = weakref.ref(_Node())
    gc.collect()
    assert later() is None  # what is made after is collected as before
