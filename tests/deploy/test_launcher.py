"""``deploy.launcher.start_child``: a child that never announces itself, or dies first, is an
error within the deadline, not a hang."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from deploy.launcher import LaunchError, start_child


def test_a_silent_child_times_out_and_is_stopped(tmp_path: Path) -> None:
    pid_path = tmp_path / "pid"
    # sh writes its pid at once; exec keeps that pid for the sleep.
    command = ["sh", "-c", f"echo $$ > {pid_path}; exec sleep 60"]
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"^sleeper: no 'ready' event within 1 s$"):
        start_child("sleeper", command, timeout_s=1.0)
    assert time.monotonic() - started < 10  # stopped by SIGTERM, not waited for
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_path.read_text()), 0)  # stopped and reaped


def test_a_child_that_dies_first_is_reported_at_once() -> None:
    command = [sys.executable, "-c", "import sys; print('not an event'); sys.exit(3)"]
    started = time.monotonic()
    with pytest.raises(LaunchError, match=r"^quitter: no 'ready' event \(exited with 3\)$"):
        start_child("quitter", command, timeout_s=60.0)
    assert time.monotonic() - started < 30
