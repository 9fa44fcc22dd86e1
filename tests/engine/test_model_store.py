"""The default model's cache: pulls that run at once (``fairgate up`` starts its workers
together, and on a fresh home each pulls) leave one whole, checked file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.model_store import DEFAULT_MODEL

# Each process imports first, says so, then waits for the go file: the copies overlap.
PULL = """
import sys, time
from pathlib import Path
from engine.model_store import pull_default_model
Path(sys.argv[2]).touch()
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
pull_default_model(progress=False)
"""


def test_pulls_at_once_leave_one_whole_file(tmp_path: Path) -> None:
    home, go = tmp_path / "home", tmp_path / "go"
    env = {**os.environ, "FAIRGATE_HOME": str(home)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PULL, str(go), str(tmp_path / f"ready-{index}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(3)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{index}").exists() for index in range(3)):
        assert time.monotonic() < deadline, "the pulling processes did not start"
        assert all(p.poll() is None for p in processes)
        time.sleep(0.01)
    go.touch()
    outcomes = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in processes]
    for process in processes:
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert [code for code, _ in outcomes] == [0, 0, 0], [err[-2000:] for _, err in outcomes]
    models = home / "models"
    assert sorted(p.name for p in models.iterdir()) == [DEFAULT_MODEL.filename]
    digest = hashlib.sha256((models / DEFAULT_MODEL.filename).read_bytes()).hexdigest()
    assert digest == DEFAULT_MODEL.sha256
