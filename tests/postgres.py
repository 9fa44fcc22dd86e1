"""A real PostgreSQL server on loopback for tests, one per test session, and a fresh database per
test.

``deploy/postgres.sh`` finds the server binaries (or installs Debian's ``postgresql`` package,
as root); ``require_postgres()`` turns its failure into a failed test, or into a skipped one where
``FAIRGATE_SKIP_POSTGRES=1``. The fixtures::

    postgres_server   (session) the running ``PostgresServer``
    postgres_url      (function) ``postgresql://…/test_N``: a new, empty database for this test,
                      dropped after it

A test module uses them by importing them under their own names (``from tests.postgres import
postgres_url as postgres_url``), or the suite registers this module as a plugin. Either way there
is one server per session: it is kept in pytest's config, started by the first test that needs
it and stopped (``pg_ctl stop -m fast``) when pytest ends.

The server: ``initdb`` into a new directory under the system's temporary directory (not pytest's
``tmp_path``, which is private to the user running pytest), with a password of its own (SCRAM) for
its superuser ``fairgate``; then ``pg_ctl start`` listening on 127.0.0.1 at a free port, its
Unix socket in that directory, with durability off (``fsync``, ``full_page_writes``,
``synchronous_commit``), which tests do not need. PostgreSQL refuses to run as root: as root, the
directory is given to the unprivileged ``nobody`` user and ``initdb``, ``pg_ctl`` and the server
run as ``nobody`` (a system without that user gets a ``fairgate-pg`` system user, made with
``useradd``). The directory is deleted when the server stops. A session killed before it could
stop its server (SIGKILL, a CI timeout) leaves it running: the next session stops such orphans
(their directory names a pytest process that is gone) before it starts its own.
"""

from __future__ import annotations

import itertools
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.deploy_scripts import require_path

__all__ = [
    "PostgresError",
    "PostgresServer",
    "postgres_server",
    "postgres_url",
    "require_postgres",
    "shared_server",
]

FETCH_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "postgres.sh"
SKIP_ENV = "FAIRGATE_SKIP_POSTGRES"
SUPERUSER = "fairgate"
DIR_PREFIX = "fairgate-pg-"
OWNER_FILE = "owner.pid"  # the pid of the pytest process whose server this is
UNPRIVILEGED_USERS = ("nobody", "fairgate-pg")  # as root: the first that exists, else the last
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
PORT_TRIES = 5  # a free port can be taken by another process before the server binds it
# Tests do not need durability; these make initdb, CREATE DATABASE and commits much cheaper.
SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "shared_buffers": "32MB",
    "max_connections": "100",
    "listen_addresses": "'127.0.0.1'",
}

_SERVER_KEY = pytest.StashKey["PostgresServer | PostgresError"]()


class PostgresError(RuntimeError):
    """The server could not be set up, started or stopped; the message carries its log."""


def require_postgres() -> Path:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``. Without them the calling test
    fails with the script's error, or is skipped with it where FAIRGATE_SKIP_POSTGRES=1."""
    return require_path(FETCH_SCRIPT, SKIP_ENV, "PostgreSQL")


class PostgresServer:
    """A PostgreSQL server of its own: ``start`` creates and starts it, ``stop`` stops it and
    deletes its files. ``create_database`` gives each test a database of its own."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = 0
        self.password = secrets.token_hex(16)
        self.root: Path | None = None
        self._run_as: pwd.struct_passwd | None = None
        self._database_ids = itertools.count(1)
        self._started = False

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "the server is not set up"
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "the server is not set up"
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """initdb, then pg_ctl start at a free port (another try at a new port when the port
        was taken meanwhile); returns once the server accepts connections."""
        self._run_as = _unprivileged_user() if os.geteuid() == 0 else None
        base = _shared_temp_dir()
        _stop_orphans(self.bin_dir, base)
        self.root = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
        try:
            (self.root / OWNER_FILE).write_text(str(os.getpid()))
            self._initdb()
            for attempt in range(1, PORT_TRIES + 1):
                self.port = _free_port()
                if self._pg_ctl_start():
                    self._started = True
                    return
                if attempt == PORT_TRIES or "could not bind" not in self._log_tail():
                    raise PostgresError(
                        f"pg_ctl start failed (port {self.port}); the server's log:\n"
                        f"{self._log_tail()}"
                    )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """pg_ctl stop -m fast (its connections are ended), then the directory goes."""
        try:
            if self._started:
                self._started = False
                done = self._run(
                    "pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                    "-t", str(STOP_TIMEOUT_S),
                )  # fmt: skip
                if done.returncode != 0:
                    raise PostgresError(f"pg_ctl stop failed:\n{done.stdout}{done.stderr}")
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def create_database(self) -> str:
        """A new empty database (``test_N``); its name."""
        name = f"test_{next(self._database_ids)}"
        self.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        """Drops the database, ending any connection a test left open to it."""
        self.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Runs one statement as the superuser, outside a transaction; its rows, if any."""
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as db:
            cursor = db.execute(sql.encode())
            return cursor.fetchall() if cursor.description is not None else []

    def _initdb(self) -> None:
        assert self.root is not None
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self._run_as is not None:
            for path in (self.root, password_file):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
        done = self._run(
            "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--pwfile", str(password_file),
            "--auth", "scram-sha-256", "--no-locale", "--encoding", "UTF8", "--no-sync",
        )  # fmt: skip
        password_file.unlink()
        if done.returncode != 0:
            raise PostgresError(f"initdb failed:\n{done.stdout}{done.stderr}")
        settings = {**SERVER_SETTINGS, "unix_socket_directories": f"'{self.root}'"}
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _pg_ctl_start(self) -> bool:
        done = self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
            "-t", str(START_TIMEOUT_S), "-o", f"-p {self.port}",
        )  # fmt: skip
        return done.returncode == 0

    def _run(self, binary: str, *args: str) -> subprocess.CompletedProcess[str]:
        """One of the server's programs, as the unprivileged user when we are root."""
        assert self.root is not None
        return _run_program(self.bin_dir / binary, args, self.root, self._run_as)

    def _log_tail(self, num_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(unreadable: {exc})"
        return "\n".join(lines[-num_lines:])


def shared_server(config: pytest.Config) -> PostgresServer:
    """The session's server, started on first use and stopped when pytest ends. A start that
    failed is not tried again: each later test fails at once with the same error."""
    found = config.stash.get(_SERVER_KEY, None)
    if found is None:
        server = PostgresServer(require_postgres())
        try:
            server.start()
        except PostgresError as exc:
            config.stash[_SERVER_KEY] = exc
            raise
        config.stash[_SERVER_KEY] = found = server
        config.add_cleanup(server.stop)
    if isinstance(found, PostgresError):
        raise PostgresError(f"the session's PostgreSQL server did not start: {found}")
    return found


@pytest.fixture(scope="session")
def postgres_server(pytestconfig: pytest.Config) -> PostgresServer:
    return shared_server(pytestconfig)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new, empty database for this test, dropped after it."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


def _run_program(
    program: Path, args: Sequence[str], cwd: Path, run_as: pwd.struct_passwd | None
) -> subprocess.CompletedProcess[str]:
    user: dict[str, Any] = {}
    if run_as is not None:
        user = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
    return subprocess.run(
        [str(program), *args],
        cwd=cwd,  # a directory the unprivileged user may enter
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S + 30,
        check=False,
        **user,
    )


def _stop_orphans(bin_dir: Path, base: str) -> None:
    """Stops (``-m immediate``) and deletes the servers under ``base`` whose pytest process is
    gone; those of live sessions, and directories we may not touch, stay."""
    for root in Path(base).glob(f"{DIR_PREFIX}*"):
        try:
            owner = int((root / OWNER_FILE).read_text())
            data_uid = (root / "data").stat().st_uid
        except (OSError, ValueError):
            continue  # being set up, or not a server of ours
        if _is_alive(owner) or os.geteuid() not in (0, data_uid):
            continue
        run_as = None
        if os.geteuid() == 0:
            try:
                run_as = pwd.getpwuid(data_uid)
            except KeyError:
                continue
        program = bin_dir / "pg_ctl"
        _run_program(program, ["stop", "-D", str(root / "data"), "-m", "immediate"], root, run_as)
        shutil.rmtree(root, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _unprivileged_user() -> pwd.struct_passwd:
    """The user the server runs as when we are root: ``nobody``, or a system user made for it."""
    for name in UNPRIVILEGED_USERS:
        with_name = _user(name)
        if with_name is not None:
            return with_name
    name = UNPRIVILEGED_USERS[-1]
    # Two sessions may race to make it: whichever loses finds it made.
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        check=False,
    )
    made = _user(name)
    if made is None:
        raise PostgresError(
            f"running as root, PostgreSQL must run as another user, and there is no "
            f"{' or '.join(UNPRIVILEGED_USERS)} user (useradd {name} failed)"
        )
    return made


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _shared_temp_dir() -> str:
    """The system's temporary directory if every directory above it lets others through (the
    unprivileged user must reach its data directory), else /tmp."""
    path = Path(tempfile.gettempdir()).resolve()
    for directory in (path, *path.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return "/tmp"
    return str(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
