"""Hung workers: a worker that answers its polls while its engine, with work to do, gets nowhere.

A worker that stops answering (killed, ``SIGSTOP``) is found by its failed polls
(``gateway.workers``). One whose HTTP server answers but whose engine thread is wedged (stuck in
a step, or in a command) is not: its load reports tell it instead, through the progress the
worker reads live off its engine thread (``engine.engine_thread.StepProgress``, in
``WorkerLoad.num_steps``, ``has_work``, ``since_step_s`` and ``max_step_s``). ``ProgressWatch``
judges those reports, one watch per worker: the registry hands it every successful report and
ejects the worker when it names a reason.

Torch-free; used on the event loop only, no locks.
"""

from __future__ import annotations

import math

from transfer.messages import WorkerLoad

__all__ = ["ProgressWatch"]


class ProgressWatch:
    """Whether one worker's engine is stalled: it has had work it could do now and completed no
    engine step for longer than its deadline.

    The deadline is ``max(min_deadline_s, deadline_steps × max_step_s)``, ``max_step_s`` being
    the longest of the worker's recent steps: a step may well take as long as the longest recent
    one (a prefill chunk among decodes), and the multiple covers the rest (a busier machine, a
    longer context). Before the worker's first step there is no step time to scale, and its first
    prefill step is not time-capped yet (``EngineConfig.max_prefill_step_s`` needs a measured
    speed): up to ``max_num_batched_tokens`` prompt tokens, 20 s and more on a busy CPU; so the
    deadline is then ``unmeasured_deadline_s``.

    The stall is measured by two clocks, and both must pass the deadline:

    - the worker's (``since_step_s``): taken when the worker made the report, so a report that
      is merely slow to arrive does not stretch it;
    - the gateway's: how long this watch's own reports have shown the same step count with work
      (from the first that did). One report alone never ejects, and after ``reset`` the watch sees
      a stall for itself before it believes one.

    A step count that moves is progress, however slow the reports or the steps: a long prompt
    computed in chunks completes a step per chunk. A report without work (an idle engine; a decode
    worker whose requests wait for their KV; a prefill worker holding finished prefills for their
    target; requests no block is free for, swapped-out ones that cannot come back) starts the
    watch afresh: such an engine waits for a command, which nothing but the callers can send. A
    report of a worker that is not ready carries no progress and starts it afresh too (the
    registry handles such a worker).

    ``observe`` names the stall on every report while it lasts. After ejecting a worker for it,
    keep observing without ``reset``: the first report not named (a step completed, or the work
    is gone) is the good health check that takes it back. A ``reset`` there would let a worker
    still wedged back in for a whole deadline."""

    def __init__(
        self,
        *,
        deadline_steps: float = 50.0,
        min_deadline_s: float = 5.0,
        unmeasured_deadline_s: float = 120.0,
    ) -> None:
        for name, value in (
            ("deadline_steps", deadline_steps),
            ("min_deadline_s", min_deadline_s),
            ("unmeasured_deadline_s", unmeasured_deadline_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        self.deadline_steps = deadline_steps
        self.min_deadline_s = min_deadline_s
        self.unmeasured_deadline_s = unmeasured_deadline_s
        self._num_steps = 0  # the step count of the reports since ``_seen_since``
        self._seen_since: float | None = None  # None: the last report showed no work

    def observe(self, load: WorkerLoad, now: float) -> str | None:
        """One successful load report, received at ``now`` (the gateway's monotonic clock).
        Returns why the worker counts as stalled (for logs and the admin API), or None."""
        if not (load.ready and load.has_work):
            self._seen_since = None
            return None
        if self._seen_since is None or load.num_steps != self._num_steps:
            self._seen_since, self._num_steps = now, load.num_steps
            return None
        stalled_s = min(load.since_step_s, now - self._seen_since)
        deadline_s = self.deadline_s(load)
        if not stalled_s > deadline_s:
            return None
        step = (
            "no step completed yet"
            if load.max_step_s <= 0.0
            else f"longest recent step {load.max_step_s:.3f} s"
        )
        return (
            f"no engine step for {stalled_s:.1f} s with work pending (deadline "
            f"{deadline_s:.1f} s; {step}; {load.num_steps} steps since its start)"
        )

    def deadline_s(self, load: WorkerLoad) -> float:
        """How long the worker of ``load`` may have work and complete no step."""
        if load.max_step_s <= 0.0:
            return max(self.min_deadline_s, self.unmeasured_deadline_s)
        return max(self.min_deadline_s, self.deadline_steps * load.max_step_s)

    def reset(self) -> None:
        """Forget what was seen: for a worker whose polls failed in between (restarted, or
        stopped and continued), what the watch saw before says nothing of now."""
        self._num_steps = 0
        self._seen_since = None
