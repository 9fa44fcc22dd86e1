"""The deploy scripts that provide the servers some tests need (``deploy/prometheus.sh``,
``deploy/postgres.sh``, ``deploy/redis.sh``): each run once per test session, its last stdout
line a path; without it a test fails with the script's error, or skips where the server's
``FAIRGATE_SKIP_*`` variable is 1."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

__all__ = ["require_path"]

SCRIPT_TIMEOUT_S = 900.0  # an apt-get install of the package included


@functools.cache
def _run(script: Path, *args: str) -> tuple[Path | None, str]:
    """``(path, "")`` or ``(None, why)``."""
    try:
        done = subprocess.run(
            ["bash", str(script), *args],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return None, f"{script} did not finish within {exc.timeout:g} s"
    except OSError as exc:
        return None, f"cannot run bash {script}: {exc}"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return None, f"{script} exited with status {done.returncode}:\n{done.stderr.strip()}"
    return Path(lines[-1]), ""


def require_path(script: Path, skip_env: str, what: str, *args: str) -> Path:
    """The path ``script`` (given ``args``) prints; without one the calling test fails with the
    script's error, or is skipped with it where ``skip_env`` is 1 (``what`` names the server in
    messages)."""
    path, why = _run(script, *args)
    if path is not None:
        return path
    if os.environ.get(skip_env) == "1":
        pytest.skip(f"{skip_env}=1 and no {what}: {why}")
    pytest.fail(f"{why}\n(with {skip_env}=1 the tests that need {what} skip)", pytrace=False)
