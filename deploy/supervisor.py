"""Keeping ``fairgate up``'s workers up: a worker that exits, for any reason, is started again
after a backoff while the others go on serving; the stack stops only when the gateway exits or a
worker crash-loops.

One worker's life under the supervisor::

    running ──exits──▶ waiting (backoff) ──delay over──▶ starting ──ready──▶ running
                          ▲                                 │ exits, fails or is not
                          └─────────────────────────────────┘ ready in time: an exit too

A worker comes back as the same endpoint: the HTTP port and (decode) KV store port it announced
when it first started (``WorkerProcess.same_endpoint_spec``), because the gateway knows its
workers by URL and prefill workers pair with a decode worker at its KV port. Both ports were
handed out by the kernel at the first start, so nothing else was told to use them; while the
worker is down another process could still take one, and then the restart fails like any other
and counts towards the crash-loop limit (both sockets set ``SO_REUSEADDR``, so the dead
process's connections in ``TIME_WAIT`` do not block it).

``RestartPolicy`` decides (pure, time passed in); ``Supervisor`` does, on the caller's thread,
never blocking for long: it reads the starting worker's ``ready`` event without waiting, so
``stop`` (Ctrl-C, SIGTERM) is seen within one tick, backoff or not. Torch-free.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from deploy.launcher import LaunchError, WorkerSpec, launch_worker

if TYPE_CHECKING:
    from deploy.stack import Stack

__all__ = ["GiveUp", "Restart", "RestartHistory", "RestartPolicy", "Supervisor", "describe_status"]

logger = logging.getLogger(__name__)

TICK_S = 0.1  # how often the supervisor looks at its children


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """When a worker that exited starts again, and when the stack gives up on it.

    The delay before a restart starts at ``initial_backoff_s`` and doubles with each exit, up to
    ``max_backoff_s``; it starts over once a worker has been ready for ``stable_after_s``. More
    than ``max_restarts`` exits of one worker within ``window_s`` is a crash loop: the stack
    stops (``max_restarts=0``: the first exit stops it). The defaults let a worker die six times
    in two minutes; a worker that fails right away reaches that in about 20 s (tiny model) to a
    minute (a model that takes 10 s to load and then fails)."""

    max_restarts: int = 5
    window_s: float = 120.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    stable_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts must be 0 or more, got {self.max_restarts}")
        if self.window_s <= 0:
            raise ValueError(f"--restart-window must be positive, got {self.window_s:g}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("the restart backoff must be positive and at most its cap")


@dataclass(frozen=True, slots=True)
class Restart:
    """Start the worker again after ``delay_s``; ``num_recent`` exits (this one too) so far
    within the policy's window."""

    delay_s: float
    num_recent: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """A crash loop: stop the stack, saying ``reason``."""

    reason: str


@dataclass(slots=True)
class RestartHistory:
    """One worker's recent exits, and what to do about the next one."""

    policy: RestartPolicy
    exit_times: deque[float] = field(default_factory=deque)
    next_backoff_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_backoff_s = self.policy.initial_backoff_s

    def on_exit(self, now: float, ready_since: float | None) -> Restart | GiveUp:
        """The worker exited at ``now``; it had been ready since ``ready_since`` (None: it
        never became ready since its last start)."""
        policy = self.policy
        self.exit_times.append(now)
        while self.exit_times[0] < now - policy.window_s:
            self.exit_times.popleft()
        num_recent = len(self.exit_times)
        if num_recent > policy.max_restarts:
            return GiveUp(
                f"exited {num_recent} times within {policy.window_s:g} s "
                f"(--max-restarts {policy.max_restarts}, --restart-window {policy.window_s:g})"
            )
        if ready_since is not None and now - ready_since >= policy.stable_after_s:
            self.next_backoff_s = policy.initial_backoff_s  # it had recovered: start over
        delay_s = self.next_backoff_s
        self.next_backoff_s = min(2 * delay_s, policy.max_backoff_s)
        return Restart(delay_s, num_recent)


def describe_status(code: int) -> str:
    """An exit status as a person reads it: ``1``, ``-9 (SIGKILL)``."""
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)


_SlotState = Literal["running", "waiting", "starting"]


@dataclass(slots=True, eq=False)
class _Slot:
    """One worker of the stack: where ``stack.workers[index]`` is in its life."""

    index: int  # in stack.workers
    name: str  # "decode worker 1": the role and its number among that role's workers
    spec: WorkerSpec  # how to start it again as the same endpoint
    history: RestartHistory
    state: _SlotState = "running"
    ready_since: float | None = None
    restart_at: float = 0.0  # waiting: when to start it
    launched_at: float = 0.0  # starting: when it was started


class Supervisor:
    """Watches a started stack's processes (see the module docstring). ``run`` owns
    ``stack.workers`` while it runs: it puts each restarted worker in its dead predecessor's
    place, so ``stack.stop()`` afterwards stops whatever is there then."""

    def __init__(self, stack: Stack, policy: RestartPolicy, *, ready_timeout_s: float) -> None:
        self.stack = stack
        self.policy = policy
        self.ready_timeout_s = ready_timeout_s
        now = time.monotonic()
        numbers: dict[str, int] = {}
        self._slots: list[_Slot] = []
        for index, worker in enumerate(stack.workers):
            number = numbers[worker.spec.role] = numbers.get(worker.spec.role, -1) + 1
            self._slots.append(
                _Slot(
                    index=index,
                    name=f"{worker.spec.role} worker {number}",
                    spec=worker.same_endpoint_spec(),
                    history=RestartHistory(policy),
                    ready_since=now,
                )
            )

    def run(self, stop: threading.Event) -> str | None:
        """Until ``stop`` is set (None) or the stack must stop (why)."""
        while not stop.wait(TICK_S):
            reason = self.step(time.monotonic())
            if reason is not None:
                return reason
        return None

    def step(self, now: float) -> str | None:
        """Look at every child once: why the stack must stop, or None."""
        code = self.stack.gateway.process.poll()
        if code is not None:
            return f"the gateway exited with status {describe_status(code)}"
        for slot in self._slots:
            reason = self._step(slot, now)
            if reason is not None:
                return reason
        return None

    def _step(self, slot: _Slot, now: float) -> str | None:
        worker = self.stack.workers[slot.index]
        if slot.state == "running":
            code = worker.process.poll()
            if code is None:
                return None
            worker.stop()  # reaped already; this closes our ends of its pipes
            return self._on_exit(slot, now, f"exited with status {describe_status(code)}")
        if slot.state == "waiting":
            if now >= slot.restart_at:
                return self._launch(slot, now)
            return None
        try:
            event = worker.poll_event("ready")
        except LaunchError as exc:
            worker.stop()
            return self._on_exit(slot, now, f"did not come back: {exc}")
        if event is None:
            if now - slot.launched_at <= self.ready_timeout_s:
                return None
            worker.stop()
            return self._on_exit(
                slot, now, f"did not come back: not ready within {self.ready_timeout_s:g} s"
            )
        worker.ready = event
        slot.state, slot.ready_since = "running", now
        logger.info(
            "%s is back (pid %d) at %s, ready %.1f s after its restart",
            slot.name,
            worker.process.pid,
            worker.http_url,
            now - slot.launched_at,
        )
        return None

    def _launch(self, slot: _Slot, now: float) -> str | None:
        try:
            worker = launch_worker(slot.spec)
        except OSError as exc:  # no process at all (out of memory, of descriptors)
            return self._on_exit(slot, now, f"could not be started: {exc}")
        self.stack.workers[slot.index] = worker
        slot.state, slot.launched_at = "starting", now
        return None

    def _on_exit(self, slot: _Slot, now: float, what: str) -> str | None:
        pid = self.stack.workers[slot.index].process.pid
        decision = slot.history.on_exit(now, slot.ready_since)
        slot.ready_since = None
        if isinstance(decision, GiveUp):
            return f"{slot.name} {decision.reason}; the last time (pid {pid}) it {what}"
        slot.state, slot.restart_at = "waiting", now + decision.delay_s
        logger.warning(
            "%s (pid %d) %s; restarting in %g s (restart %d of at most %d within %g s)",
            slot.name,
            pid,
            what,
            decision.delay_s,
            decision.num_recent,
            self.policy.max_restarts,
            self.policy.window_s,
        )
        return None
