"""``deploy.stack``: how the stack shares this machine's cores among its workers."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from deploy.stack import StackConfig, worker_specs


def _threads(args: Sequence[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "--threads"]


@pytest.fixture
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


@pytest.mark.usefixtures("eight_cores")
def test_the_cores_are_shared_among_the_workers() -> None:
    config = StackConfig(num_prefill_workers=2, num_decode_workers=1)
    assert config.worker_threads() == 2
    specs = worker_specs(config, {})
    assert [spec.role for spec in specs] == ["prefill", "prefill", "decode"]
    assert all(_threads(spec.args) == ["2"] for spec in specs)


@pytest.mark.usefixtures("eight_cores")
def test_more_workers_than_cores_get_one_thread_each() -> None:
    assert StackConfig(num_prefill_workers=5, num_decode_workers=4).worker_threads() == 1


def test_threads_given_win() -> None:
    assert StackConfig(threads_per_worker=3).worker_threads() == 3
    specs = worker_specs(StackConfig(threads_per_worker=3), {})
    assert all(_threads(spec.args) == ["3"] for spec in specs)
    # a worker flag given by the caller is left alone, not doubled
    given = StackConfig(worker_args=["--threads", "5"], decode_worker_args=["--preemption", "swap"])
    assert [_threads(spec.args) for spec in worker_specs(given, {})] == [["5"], ["5"]]
    joined = StackConfig(worker_args=["--threads=5"])
    assert all("--threads" not in spec.args for spec in worker_specs(joined, {}))


def test_fewer_than_one_thread_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        StackConfig(threads_per_worker=0)
