"""A real Redis server on loopback for tests, one per test session, and a fresh logical database
per test.

``deploy/redis.sh`` finds ``redis-server`` (or installs Debian's ``redis-server`` package, as
root); ``require_redis()`` turns its failure into a failed test, or into a skipped one where
``FAIRGATE_SKIP_REDIS=1``. The fixtures::

    redis_server   (session) the running ``RedisServer``
    redis_url      (function) ``redis://127.0.0.1:PORT/N``: a logical database of its own for
                   this test, empty (flushed before the test)

A test module uses them by importing them under their own names (``from tests.redis_server
import redis_url as redis_url``), or the suite registers this module as a plugin. Either way there
is one server per session: it is kept in pytest's config, started by the first test that needs it
and stopped when pytest ends. Processes that outlive one test (a module's stack) use
``redis_server.url()`` (database 0, which ``redis_url`` never hands out) or a database of their
own from ``redis_server.fresh_database()``.

The server: ``redis-server`` bound to 127.0.0.1 at a free port (another try at a new port when
that one was taken meanwhile), no persistence (``--save ''``, ``--appendonly no``), its working
directory and log in a new directory under the system's temporary directory, deleted when it
stops; on Linux the server is killed when the process that started it dies, however it dies.
``RedisServer`` can also be used on its own, as a context manager, by a test that needs to stop
or kill its server.
"""

from __future__ import annotations

import ctypes
import itertools
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
import redis

from tests.deploy_scripts import require_path

__all__ = [
    "RedisError",
    "RedisServer",
    "redis_server",
    "redis_url",
    "require_redis",
    "shared_server",
]

FETCH_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "redis.sh"
SKIP_ENV = "FAIRGATE_SKIP_REDIS"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PORT_TRIES = 5
NUM_DATABASES = 1024  # a fresh one per test; after that they are reused, flushed

_SERVER_KEY = pytest.StashKey["RedisServer | RedisError"]()


class RedisError(RuntimeError):
    """The server could not be started, or died; the message carries its log."""


def require_redis() -> Path:
    """The ``redis-server`` binary. Without one the calling test fails with the script's error,
    or is skipped with it where FAIRGATE_SKIP_REDIS=1."""
    return require_path(FETCH_SCRIPT, SKIP_ENV, "Redis")


class RedisServer:
    """A redis-server of its own: ``start`` starts it and returns once it answers, ``stop``
    stops it (``kill`` with SIGKILL) and deletes its directory."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.port = 0
        self.root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._databases = itertools.count(1)  # 0 is left to `url()`: a module's stack, say

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "the server is not set up"
        return self.root / "redis.log"

    def url(self, database: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def fresh_database(self) -> str:
        """The URL of a logical database no other caller got (cycling after ``NUM_DATABASES``),
        flushed."""
        database = 1 + (next(self._databases) - 1) % (NUM_DATABASES - 1)
        with self._client(database) as client:
            client.flushdb()
        return self.url(database)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fairgate-redis-"))
        try:
            for attempt in range(1, PORT_TRIES + 1):
                self.port = _free_port()
                if self._start_at_port():
                    return
                if attempt == PORT_TRIES or "Address already in use" not in self._log_tail():
                    raise RedisError(
                        f"redis-server did not start at port {self.port}; its log:\n"
                        f"{self._log_tail()}"
                    )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; then delete the directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; ``start`` may follow (a new port, everything lost)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()

    def _start_at_port(self) -> bool:
        """Start at ``self.port``; True once it answers PING, False when it exited first."""
        command = [
            str(self.binary),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--databases", str(NUM_DATABASES),
            "--dir", str(self.root),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                with self._client(0) as client:
                    if client.ping():
                        return True
            except redis.RedisError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise RedisError(
                    f"redis-server at port {self.port} did not answer within "
                    f"{START_TIMEOUT_S:g} s; its log:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def _client(self, database: int) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            db=database,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
        )

    def _log_tail(self, num_lines: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(unreadable: {exc})"
        return "\n".join(lines[-num_lines:])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends (a test run
    killed with SIGKILL leaves no server behind; start it from a thread that lives as long)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def shared_server(config: pytest.Config) -> RedisServer:
    """The session's server, started on first use and stopped when pytest ends. A start that
    failed is not tried again: each later test fails at once with the same error."""
    found = config.stash.get(_SERVER_KEY, None)
    if found is None:
        server = RedisServer(require_redis())
        try:
            server.start()
        except RedisError as exc:
            config.stash[_SERVER_KEY] = exc
            raise
        config.stash[_SERVER_KEY] = found = server
        config.add_cleanup(server.stop)
    if isinstance(found, RedisError):
        raise RedisError(f"the session's Redis server did not start: {found}")
    return found


@pytest.fixture(scope="session")
def redis_server(pytestconfig: pytest.Config) -> RedisServer:
    return shared_server(pytestconfig)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A logical database of this test's own, empty."""
    return redis_server.fresh_database()
