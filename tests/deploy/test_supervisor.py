"""``deploy.supervisor``: a worker of the stack that exits comes back at the same ports while the
others serve, and only a crash loop stops the stack. First the policy's arithmetic, then real
processes: stacks whose workers are killed with SIGKILL under a running supervisor (what
``fairgate up`` runs), driven through the gateway's OpenAI API with the demo key."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.launcher import WorkerProcess
from deploy.stack import Stack, StackConfig, start_stack
from deploy.supervisor import (
    GiveUp,
    Restart,
    RestartHistory,
    RestartPolicy,
    Supervisor,
    describe_status,
)
from tests.deploy.processes import children, pipe_fds, wait_for

BACK_WITHIN_S = 15.0
WORKER_ARGS = ["--log-level", "warning", "--threads", "1", "--num-blocks", "512"]

# ---- the policy ---------------------------------------------------------------------------------


def _delay(history: RestartHistory, now: float, ready_since: float | None) -> float:
    decision = history.on_exit(now, ready_since)
    assert isinstance(decision, Restart), decision
    return decision.delay_s


def test_the_backoff_doubles_to_its_cap_and_starts_over_once_the_worker_was_stable() -> None:
    policy = RestartPolicy(max_restarts=100, window_s=1000.0, max_backoff_s=4.0)
    history = RestartHistory(policy)
    assert [_delay(history, float(t), None) for t in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert _delay(history, 100.0, ready_since=90.0) == 4  # up 10 s: not recovered yet
    assert _delay(history, 200.0, ready_since=170.0) == 0.5  # up 30 s: starts over
    assert _delay(history, 201.0, ready_since=None) == 1


def test_more_exits_than_allowed_within_the_window_is_a_crash_loop() -> None:
    history = RestartHistory(RestartPolicy(max_restarts=2, window_s=60.0))
    assert [_delay(history, t, None) for t in (0.0, 50.0)] == [0.5, 1]
    decision = history.on_exit(70.0, None)  # the exit at 0 has left the window
    assert decision == Restart(2.0, num_recent=2)
    decision = history.on_exit(100.0, None)  # 50, 70, 100: three within 60 s
    assert decision == GiveUp("exited 3 times within 60 s (--max-restarts 2, --restart-window 60)")


def test_no_restarts_allowed_stops_at_the_first_exit() -> None:
    assert isinstance(RestartHistory(RestartPolicy(max_restarts=0)).on_exit(0.0, None), GiveUp)


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="--max-restarts"):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError, match="--restart-window"):
        RestartPolicy(window_s=0.0)


def test_exit_statuses_read_as_people_read_them() -> None:
    assert describe_status(1) == "1"
    assert describe_status(-signal.SIGKILL) == "-9 (SIGKILL)"


# ---- real processes -----------------------------------------------------------------------------


@dataclass(slots=True)
class Supervised:
    """A started stack and the supervisor thread watching it; ``outcome`` gets what ``run``
    returned once it has."""

    stack: Stack
    stop: threading.Event
    thread: threading.Thread
    outcome: list[str | None] = field(default_factory=list)


@contextmanager
def supervised(state_dir: Path, policy: RestartPolicy, **config: Any) -> Iterator[Supervised]:
    stack = start_stack(
        StackConfig(
            state_dir=state_dir,
            port=0,
            worker_args=WORKER_ARGS,
            ready_timeout_s=120.0,
            **config,
        )
    )
    supervisor = Supervisor(stack, policy, ready_timeout_s=60.0)
    stop = threading.Event()
    outcome: list[str | None] = []
    thread = threading.Thread(
        target=lambda: outcome.append(supervisor.run(stop)), name="supervisor"
    )
    thread.start()
    try:
        yield Supervised(stack, stop, thread, outcome)
    finally:
        stop.set()
        thread.join(30.0)
        stack.stop()


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    """One prefill and two decode workers (tiny model), supervised with the default policy."""
    with supervised(
        tmp_path_factory.mktemp("supervised"),
        RestartPolicy(),
        engine="tiny",
        num_prefill_workers=1,
        num_decode_workers=2,
        threads_per_worker=1,
    ) as started:
        yield started


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=stack.demo_key, max_retries=0)


def _ask(client: openai.OpenAI, max_tokens: int = 8) -> None:
    """One request through the gateway; it must complete."""
    answer = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=max_tokens,
        temperature=0,
    )
    assert answer.usage is not None and answer.usage.completion_tokens == max_tokens


def _gateway_state(stack: Stack, url: str) -> str:
    response = httpx.get(
        stack.base_url + "/admin/v1/workers",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        timeout=10.0,
    )
    [state] = [w["state"] for w in response.json()["data"] if w["url"] == url]
    return str(state)


def _is_back(stack: Stack, index: int, old_pid: int) -> bool:
    """A new process in the killed one's place has announced itself ready (not only started)."""
    worker = stack.workers[index]
    return worker.process.pid != old_pid and worker.ready.get("pid") == worker.process.pid


def _kv_transfers(worker: WorkerProcess, outcome: str) -> float:
    text = httpx.get(worker.http_url + "/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fairgate_kv_transfers_total" and sample.labels == {
                "outcome": outcome
            }:
                return sample.value
    return 0.0


def _kill_and_wait_until_back(
    stack: Stack, index: int, *, ask: openai.OpenAI | None = None
) -> tuple[WorkerProcess, int]:
    """SIGKILL ``stack.workers[index]``; until a new process is ready in its place and the
    gateway, having seen the old one gone, counts it ready again. With ``ask``, requests go
    through the gateway all along and each must complete. Returns the worker that came back and
    how many requests completed meanwhile."""
    killed = stack.workers[index]
    pipes_before, children_before = pipe_fds(), len(children(os.getpid()))
    os.kill(killed.process.pid, signal.SIGKILL)
    states_seen: set[str] = set()
    num_asked = 0

    def is_back() -> bool:
        nonlocal num_asked
        if ask is not None:
            _ask(ask)
            num_asked += 1
        states_seen.add(state := _gateway_state(stack, killed.http_url))
        return (
            _is_back(stack, index, killed.process.pid)
            and state == "ready"
            and (states_seen != {"ready"})
        )

    wait_for(is_back, BACK_WITHIN_S, f"{killed.name} back")
    back = stack.workers[index]
    # The same endpoint: the gateway's URL for it, and (decode) the KV port prefill pairs at.
    assert back.http_url == killed.http_url
    if back.spec.role == "decode":
        assert back.kv_port == killed.kv_port
    # Nothing left behind: the killed process reaped, our ends of its pipes closed.
    mine = children(os.getpid())
    assert killed.process.pid not in {c.pid for c in mine}
    assert not [c for c in mine if c.state == "Z"]
    assert (len(mine), pipe_fds()) == (children_before, pipes_before)
    return back, num_asked


def test_a_killed_decode_worker_comes_back_while_the_other_serves(tiny_stack: Supervised) -> None:
    stack = tiny_stack.stack
    assert [w.spec.role for w in stack.workers] == ["prefill", "decode", "decode"]
    with _client(stack) as client:
        _ask(client)
        back, num_asked = _kill_and_wait_until_back(stack, 2, ask=client)
        assert num_asked >= 1
        # The restarted decode worker takes requests again, their KV shipped to it by the
        # prefill worker, which paired with the old instance and must pair with this one.
        # Requests at once go to both decode workers (the gateway places on the one with the
        # most free KV).
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                list(pool.map(lambda _: _ask(client, max_tokens=32), range(4)))
                if _kv_transfers(back, "ok") > 0:
                    break
        assert _kv_transfers(back, "ok") > 0
        assert _kv_transfers(back, "failed") == 0
        assert tiny_stack.outcome == []  # the supervisor goes on


def test_the_killed_only_prefill_worker_comes_back(tiny_stack: Supervised) -> None:
    stack = tiny_stack.stack
    _kill_and_wait_until_back(stack, 0)
    with _client(stack) as client, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _ask(client, max_tokens=32), range(8)))
    for decode in stack.workers[1:]:  # the new prefill instance paired with both
        assert _kv_transfers(decode, "ok") > 0
    assert tiny_stack.outcome == []


def test_a_worker_that_keeps_dying_stops_the_stack(tmp_path: Path) -> None:
    """Its port taken while it is down: every restart fails at once (a real crash loop)."""
    policy = RestartPolicy(max_restarts=2, window_s=60.0, initial_backoff_s=1.0)
    with supervised(tmp_path, policy, engine="null") as started:
        stack = started.stack
        decode = stack.workers[1]
        port = int(decode.http_url.rsplit(":", 1)[1])
        os.kill(decode.process.pid, signal.SIGKILL)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

        def took_port() -> bool:
            try:
                squatter.bind(("127.0.0.1", port))
            except OSError:
                return False  # the killed worker is not gone yet
            return True

        with squatter:
            wait_for(took_port, 1.0, "the killed worker's port free")
            squatter.listen()
            wait_for(lambda: not started.thread.is_alive(), 60.0, "the supervisor gives up")
        [reason] = started.outcome
        assert reason is not None
        assert reason.startswith(
            "decode worker 0 exited 3 times within 60 s (--max-restarts 2, --restart-window 60)"
            "; the last time (pid "
        )
        assert reason.endswith("did not come back: decode worker: no 'ready' event (exited with 1)")
        # It stops only its own watch: stopping the rest is the caller's (``run_up``).
        assert stack.gateway.process.poll() is None


def test_stop_during_a_restart_backoff_is_prompt_and_starts_nothing(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_backoff_s=60.0, max_backoff_s=60.0)
    with supervised(tmp_path, policy, engine="null") as started:
        stack = started.stack
        killed = stack.workers[1]
        os.kill(killed.process.pid, signal.SIGKILL)
        # Reaped: the supervisor saw the exit and is waiting out the backoff.
        wait_for(lambda: killed.process.returncode is not None, 5.0, "the killed worker reaped")
        stopping = time.monotonic()
        started.stop.set()
        started.thread.join(5.0)
        assert time.monotonic() - stopping < 1.0
        assert started.outcome == [None]
        assert stack.workers[1] is killed  # no restart was begun
        pids = {p.process.pid for p in stack.processes}
        stack.stop()
        assert not pids & {c.pid for c in children(os.getpid())}


def test_the_gateway_exiting_stops_the_stack(tmp_path: Path) -> None:
    with supervised(tmp_path, RestartPolicy(), engine="null") as started:
        stack = started.stack
        workers = list(stack.workers)
        os.kill(stack.gateway.process.pid, signal.SIGKILL)
        wait_for(lambda: not started.thread.is_alive(), 5.0, "the supervisor stops")
        assert started.outcome == ["the gateway exited with status -9 (SIGKILL)"]
        assert stack.workers == workers  # the workers are left for the caller to stop
        assert all(w.process.poll() is None for w in workers)
