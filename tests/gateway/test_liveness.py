"""``ProgressWatch``: a worker whose engine has work and completes no step past its deadline is
named stalled; an idle one, one whose reports are slow, one computing a long prompt in chunks,
and a decode worker waiting for KV are not (timelines of load reports, the gateway's clock in
hand)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from gateway.liveness import ProgressWatch
from transfer.messages import WorkerLoad

POLL_S = 0.5  # the registry's poll interval


def _report(
    num_steps: int,
    *,
    has_work: bool = True,
    since_step_s: float = 0.0,
    max_step_s: float = 0.02,
    ready: bool = True,
    **fields: Any,
) -> WorkerLoad:
    return WorkerLoad(
        "decode-0",
        "decode",
        ready,
        num_steps=num_steps,
        has_work=has_work,
        since_step_s=since_step_s,
        max_step_s=max_step_s,
        **fields,
    )


@dataclass
class Engine:
    """A worker's engine as its reports show it: steps completed, and when the last one ended
    (or the work was taken up), on the worker's clock, which here is the gateway's."""

    num_steps: int = 0
    progress_at: float = 0.0
    max_step_s: float = 0.0

    def step(self, ended: float, step_s: float) -> None:
        self.num_steps += 1
        self.progress_at = ended
        self.max_step_s = max(self.max_step_s, step_s)

    def report(self, now: float, *, num_running: int = 1) -> WorkerLoad:
        return _report(
            self.num_steps,
            since_step_s=now - self.progress_at,
            max_step_s=self.max_step_s,
            num_running=num_running,
        )


def _first_stall(watch: ProgressWatch, reports: list[tuple[float, WorkerLoad]]) -> float | None:
    """The time of the first report the watch names a stall on, or None."""
    for now, load in reports:
        if watch.observe(load, now) is not None:
            return now
    return None


def _polls(until_s: float, start_s: float = 0.0) -> list[float]:
    return [start_s + index * POLL_S for index in range(int((until_s - start_s) / POLL_S) + 1)]


def test_a_wedged_engine_is_stalled_past_its_deadline_and_not_before() -> None:
    watch = ProgressWatch()  # fast decode steps: the 5 s floor is the deadline
    engine = Engine(num_steps=812, max_step_s=0.02)
    reasons = [(now, watch.observe(engine.report(now), now)) for now in _polls(8.0)]
    assert all(reason is None for now, reason in reasons if now <= 5.0)
    first_now, first = next((now, reason) for now, reason in reasons if reason is not None)
    assert first_now == 5.5
    assert first == (
        "no engine step for 5.5 s with work pending (deadline 5.0 s; longest recent step "
        "0.020 s; 812 steps since its start)"
    )
    # Named on every report while it lasts.
    assert all(reason is not None for now, reason in reasons if now >= 5.5)


def test_the_deadline_scales_with_the_longest_recent_step() -> None:
    watch = ProgressWatch(deadline_steps=50.0, min_deadline_s=5.0)
    assert watch.deadline_s(_report(1, max_step_s=0.4)) == pytest.approx(20.0)
    assert watch.deadline_s(_report(1, max_step_s=0.001)) == 5.0
    engine = Engine(num_steps=40, max_step_s=0.4)
    assert _first_stall(watch, [(now, engine.report(now)) for now in _polls(30.0)]) == 20.5


def test_reports_without_work_never_stall() -> None:
    """An idle worker; a decode worker whose reservations wait for their KV; a prefill worker
    holding finished prefills for their target: the engine waits for a command, and the
    worker says it has no work, however long it lasts. ``has_work`` decides, not the time since
    the last step (which a worker reports as 0 then; here it is not, to show it is not read)."""
    waiting_for_work: list[dict[str, Any]] = [
        {},
        {"num_reserved": 4},
        {"num_pending_transfers": 3},
        {"num_waiting": 2, "num_free_blocks": 0},
    ]
    for fields in waiting_for_work:
        watch = ProgressWatch(min_deadline_s=1.0)
        reports = [
            (now, _report(7, has_work=False, since_step_s=now, **fields)) for now in _polls(600.0)
        ]
        assert _first_stall(watch, reports) is None


def test_a_long_prompt_computed_in_chunks_is_not_stalled() -> None:
    """A 4,000-token prompt on two busy cores: 45 s in chunks, the first (not time-capped yet,
    before any step time is known) 9 s, the others 2 to 4 s each. Steps keep completing."""
    chunk_ends = [9.0, 12.0, 14.5, 18.5, 21.0, 24.0, 28.0, 30.5, 33.0, 36.5, 40.0, 42.0, 45.0]
    engine = Engine()
    watch = ProgressWatch()
    reports = []
    for now in _polls(50.0):
        while chunk_ends and chunk_ends[0] <= now:
            ended = chunk_ends.pop(0)
            engine.step(ended, ended - engine.progress_at)
        reports.append((now, engine.report(now)))
    assert engine.num_steps == 13
    assert _first_stall(watch, reports) is None


def test_before_its_first_step_a_worker_has_the_unmeasured_deadline() -> None:
    watch = ProgressWatch(unmeasured_deadline_s=60.0)
    assert watch.deadline_s(_report(0, max_step_s=0.0)) == 60.0
    engine = Engine()  # wedged in its very first step
    stalled_at = _first_stall(watch, [(now, engine.report(now)) for now in _polls(70.0)])
    assert stalled_at == 60.5
    assert "no step completed yet" in (watch.observe(engine.report(61.0), 61.0) or "")


def test_a_slow_report_does_not_stretch_the_stall() -> None:
    """The second report took 8 s to arrive: by the gateway's clock no step for 8 s, but the
    worker made it 1 s after its last step, which is what counts."""
    watch = ProgressWatch()
    assert watch.observe(_report(50, since_step_s=0.2), 0.0) is None
    assert watch.observe(_report(50, since_step_s=1.0), 8.0) is None
    # And the worker's word alone is not enough either: the watch sees a stall for itself.
    fresh = ProgressWatch()
    assert fresh.observe(_report(50, since_step_s=300.0), 0.0) is None
    assert fresh.observe(_report(50, since_step_s=301.0), 1.0) is None
    assert fresh.observe(_report(50, since_step_s=306.0), 6.0) is not None


def test_work_taken_up_again_starts_the_watch_afresh() -> None:
    """Work, then none (the engine waited for a command), then work again at the same step
    count: the deadline runs from the second taking up."""
    watch = ProgressWatch()
    assert watch.observe(_report(9, since_step_s=0.0), 0.0) is None
    assert watch.observe(_report(9, since_step_s=4.0), 4.0) is None
    assert watch.observe(_report(9, has_work=False), 4.5) is None
    reports = [(now, _report(9, since_step_s=now - 5.0)) for now in _polls(12.0, start_s=5.0)]
    assert _first_stall(watch, reports) == 10.5


def test_a_step_after_a_stall_clears_it_and_a_restart_counts_as_progress() -> None:
    watch = ProgressWatch()
    assert _first_stall(watch, [(now, _report(3, since_step_s=now)) for now in _polls(6.0)])
    assert watch.observe(_report(4, since_step_s=0.1), 6.5) is None
    assert watch.observe(_report(4, since_step_s=0.6), 7.0) is None
    # A restarted worker counts from 0 again: a different count, not a stall.
    assert watch.observe(_report(0, since_step_s=30.0), 7.5) is None


def test_reset_and_an_unready_report_forget_what_was_seen() -> None:
    watch = ProgressWatch()
    for now in _polls(4.5):
        assert watch.observe(_report(3, since_step_s=now), now) is None
    watch.reset()
    assert watch.observe(_report(3, since_step_s=5.5), 5.5) is None
    assert watch.observe(_report(3, since_step_s=6.0), 6.0) is None
    assert watch.observe(_report(3, since_step_s=11.0), 11.0) is not None
    assert watch.observe(_report(3, ready=False, since_step_s=11.5), 11.5) is None
    assert watch.observe(_report(3, since_step_s=12.0), 12.0) is None


@pytest.mark.parametrize(
    "settings",
    [{"deadline_steps": 0.0}, {"min_deadline_s": -1.0}, {"unmeasured_deadline_s": float("inf")}],
)
def test_settings_must_be_positive_and_finite(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive and finite"):
        ProgressWatch(**settings)
