"""Start worker (and gateway) processes on this machine and wait until they are ready.

A worker announces itself on stdout (``engine.process_events``), so waiting is reading a pipe with
a deadline, not polling. Each worker is started with ``--exit-with-parent``: it holds the read end
of a pipe whose write end only we hold, and shuts down when that pipe closes, so workers never
outlive whoever started them (a killed test run, an interrupted ``fairgate generate``).
``start_child`` starts any other child that keeps both conventions (the benchmark's OTLP receiver).
``launch_worker`` and ``ChildProcess.poll_event`` start one without waiting, for a caller that
watches several at once (``deploy.supervisor``). Torch-free.
"""

from __future__ import annotations

import enum
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = [
    "ChildProcess",
    "LaunchError",
    "WorkerProcess",
    "WorkerSpec",
    "exit_when_stdin_closes",
    "launch_worker",
    "start_child",
    "start_workers",
]

Role = Literal["prefill", "decode", "colocated", "gateway"]


class _Stdout(enum.Enum):
    ENDED = "ended"  # what ``_read_line`` returns once the child's stdout has ended


class LaunchError(RuntimeError):
    """A worker (or another child) did not come up."""


# A child whose stdout ended is exiting: how long to wait for its exit status, for the error.
EXIT_GRACE_S = 2.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    role: Role
    model: str = "default"
    args: Sequence[str] = ()  # more `fairgate *-worker` flags
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    log_path: str | None = None  # its stderr (the logs) appended here; None: ours
    port: int = 0  # its HTTP port; 0: a free one, announced in its ready event
    kv_port: int = 0  # decode and colocated: its KV store's port; 0: a free one, announced too

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "deploy.cli"]
        if self.role == "gateway":
            command.append("gateway")
        elif self.role == "prefill":
            command.append("prefill-worker")
        else:
            command.append("decode-worker")
            if self.role == "colocated":
                command.append("--colocated")
            command += ["--kv-port", str(self.kv_port)]
        return [
            *command,
            "--model",
            self.model,
            "--port",
            str(self.port),
            "--exit-with-parent",
            *self.args,
        ]


class ChildProcess:
    """A started child: its process, its ``ready`` event, and the events after it (JSON lines on
    its stdout). ``name`` says which child in errors, e.g. "decode worker"."""

    def __init__(self, name: str, process: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.process = process
        self.ready: dict[str, Any] = {}
        self._buffer = b""
        assert process.stdout is not None
        self._stdout = process.stdout
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout, selectors.EVENT_READ)
        self._is_closed = False

    def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """The next event called ``name`` (earlier ones are skipped); ``LaunchError`` if the
        process exits or ``timeout_s`` passes first."""
        event = self._next_event(name, time.monotonic() + timeout_s)
        if event is None:
            raise LaunchError(f"{self.name}: no {name!r} event within {timeout_s:g} s")
        return event

    def poll_event(self, name: str) -> dict[str, Any] | None:
        """The next event called ``name`` if it has arrived, else None, without waiting;
        ``LaunchError`` as ``wait_event`` when the process has exited or failed."""
        return self._next_event(name, time.monotonic())

    def _next_event(self, name: str, deadline: float) -> dict[str, Any] | None:
        """The next event called ``name``, None once ``deadline`` passes without it."""
        while True:
            line = self._read_line(deadline)
            if line is None:
                return None
            if line is _Stdout.ENDED:
                # stdout ends because the child is exiting: its status says why.
                try:
                    code: int | None = self.process.wait(
                        max(EXIT_GRACE_S, deadline - time.monotonic())
                    )
                except subprocess.TimeoutExpired:
                    code = None
                raise LaunchError(
                    f"{self.name}: no {name!r} event "
                    + (f"(exited with {code})" if code is not None else "(its output ended)")
                )
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not ours (a library printed to stdout)
            if event.get("event") == "failed" and name == "ready":
                raise LaunchError(f"{self.name} failed to start: {event['reason']}")
            if event.get("event") == name:
                return dict(event)

    def _read_line(self, deadline: float) -> bytes | Literal[_Stdout.ENDED] | None:
        """A whole line, ``ENDED`` when stdout has ended, None when none came by ``deadline``
        (what has already arrived is read even when the deadline has passed)."""
        while b"\n" not in self._buffer:
            remaining = max(0.0, deadline - time.monotonic())
            if not self._selector.select(remaining):
                return None
            chunk = os.read(self._stdout.fileno(), 65536)
            if not chunk:
                return _Stdout.ENDED
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (graceful), then SIGKILL after ``timeout_s``; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, like a crash."""
        self.process.kill()
        self.process.wait()
        self._close()

    def _close(self) -> None:
        """Our ends of its pipes (idempotent: a process is stopped once more on the way out)."""
        if self._is_closed:
            return
        self._is_closed = True
        self._selector.close()
        self._stdout.close()
        if self.process.stdin is not None:
            self.process.stdin.close()


class WorkerProcess(ChildProcess):
    """A started worker: its process, its ``ready`` event, and the events after it."""

    def __init__(self, spec: WorkerSpec, process: subprocess.Popen[bytes]) -> None:
        super().__init__(f"{spec.role} worker", process)
        self.spec = spec

    @property
    def http_url(self) -> str:
        return str(self.ready["http_url"])

    @property
    def worker_id(self) -> str:
        return str(self.ready["worker_id"])

    @property
    def kv_port(self) -> int:
        return int(self.ready["kv_port"])

    def same_endpoint_spec(self) -> WorkerSpec:
        """Its spec with the ports it announced: started again from this, it comes back at the
        same HTTP URL (where the gateway polls it) and, for a decode worker, the same KV store
        port (where prefill workers pair with it)."""
        port = urlsplit(self.http_url).port
        assert port is not None, self.http_url  # the worker's URL always names its port
        kv_port = self.kv_port if self.spec.role in ("decode", "colocated") else 0
        return replace(self.spec, port=port, kv_port=kv_port)


def _popen(
    command: Sequence[str], env: dict[str, str], log_path: str | None
) -> subprocess.Popen[bytes]:
    """``command`` with a stdin only we write to (see the module docstring), its events on a
    pipe to us and its stderr appended to ``log_path`` (None: ours). In a session of its own: a
    terminal's Ctrl-C reaches us alone, and we stop the children in order (the gateway drains
    while the workers still serve); it still dies with us (``--exit-with-parent``)."""
    log = None if log_path is None else open(log_path, "ab")  # noqa: SIM115
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **env},
            start_new_session=True,
        )
    finally:
        if log is not None:
            log.close()  # the child has its own descriptor


def start_child(name: str, command: Sequence[str], *, timeout_s: float) -> ChildProcess:
    """Start ``command`` and wait for its ``ready`` event. It must announce itself as the
    workers do and exit when its stdin closes (``--exit-with-parent``). On failure the child is
    stopped and ``LaunchError`` is raised."""
    child = ChildProcess(name, _popen(command, {}, None))
    try:
        child.ready = child.wait_event("ready", timeout_s)
    except BaseException:
        child.stop()
        raise
    return child


def launch_worker(spec: WorkerSpec) -> WorkerProcess:
    """Start one worker and return at once; its ``ready`` event is the caller's to wait for
    (``wait_event`` / ``poll_event``), then to store in ``ready``."""
    return WorkerProcess(spec, _popen(spec.command(), spec.env, spec.log_path))


def start_workers(specs: Sequence[WorkerSpec], *, timeout_s: float = 300.0) -> list[WorkerProcess]:
    """Start every worker at once (they load their models side by side), then wait for each to
    be ready. On any failure the ones started are stopped and ``LaunchError`` is raised."""
    workers: list[WorkerProcess] = []
    try:
        for spec in specs:
            workers.append(launch_worker(spec))
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.ready = worker.wait_event("ready", max(0.0, deadline - time.monotonic()))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


def exit_when_stdin_closes() -> None:
    """The child's side of ``--exit-with-parent``: a thread that turns the end of standard input
    (its parent's write end closing, when the parent exits for any reason) into SIGTERM, a
    graceful shutdown."""

    def watch() -> None:
        # os.read, not sys.stdin: a buffered read would hold a lock the interpreter's shutdown
        # needs when the process ends for another reason.
        while os.read(0, 65536):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
