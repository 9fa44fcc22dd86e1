"""What a process has started and holds, read from ``/proc``: for tests that check a supervisor
leaves no child and no descriptor behind."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Child:
    pid: int
    state: str  # R, S, Z (a zombie: exited, not reaped), ...
    cmdline: str


def children(parent_pid: int) -> list[Child]:
    found: list[Child] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it ended while we looked
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == parent_pid:
            found.append(Child(int(entry.name), state, cmdline.strip()))
    return found


def pipe_fds() -> int:
    """Our pipes and epoll instances: what each launched child costs us (stdin, stdout and the
    selector that reads it)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor
        count += target.startswith(("pipe:", "anon_inode:[eventpoll]"))
    return count


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.05)
    return time.monotonic() - started
