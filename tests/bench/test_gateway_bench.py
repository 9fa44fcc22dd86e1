"""``bench.gateway_bench``: the OTLP receiver it runs in its own process for ``--tracing``."""

from __future__ import annotations

from typing import Any

import httpx

from bench.gateway_bench import _ReceiverProcess
from bench.otlp_receiver import TRACES_PATH

# Counting reads only the structure, so empty spans do.
TWO_SPANS: dict[str, Any] = {"resourceSpans": [{"scopeSpans": [{"spans": [{}, {}]}]}]}


def test_the_receiver_process_reports_what_it_counted() -> None:
    with _ReceiverProcess() as receiver:
        answer = httpx.post(receiver.endpoint + TRACES_PATH, json=TWO_SPANS)
        assert answer.status_code == 200
        assert receiver.stop() == 2
        assert receiver.child.process.returncode == 0
        assert receiver.stop() == 2  # reported once, remembered


def test_the_receiver_process_exits_with_its_parent() -> None:
    with _ReceiverProcess() as receiver:
        process = receiver.child.process
        assert process.stdin is not None
        process.stdin.close()  # as it is when this process dies
        assert process.wait(timeout=10) == 0
