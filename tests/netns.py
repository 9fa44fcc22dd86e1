"""Several hosts on one machine, for tests: Linux network namespaces joined by a bridge.

Each host is a namespace with loopback and one interface, ``eth0``, holding its address in a
private /24; the other end of its veth pair is a port of the bridge ``br0``, which lives in a
namespace of its own. Every link is created inside the test's namespaces (``ip -n``), so the
root namespace's interfaces, addresses and routes are never touched::

    fg-<pid>-<tag>-br                     fg-<pid>-<tag>-<host>
    ┌───────────────────────┐             ┌──────────────────────────┐
    │ br0 ── <host> (veth) ─┼─────────────┼─ eth0  10.213.N.<k>/24   │
    │   └─── ...            │             │  lo    127.0.0.1         │
    └───────────────────────┘             └──────────────────────────┘

A process runs on a host through ``ip netns exec`` (which execs it: its pid is the process's
own); the test's own client code runs on a host through ``Host.call``, on a thread that has
joined the namespace. Deleting the namespaces deletes every link with them: ``network`` does it
on the way out, however the test ends, and a run that was killed outright leaves namespaces that
name its dead pid, which the next run deletes first. Needs root and iproute2 (``unavailable``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import random
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from deploy.launcher import WorkerProcess, WorkerSpec

__all__ = ["Host", "Network", "network", "unavailable"]

T = TypeVar("T")

PREFIX = "fg-"  # every namespace this module creates: fg-<pid>-<tag>-<host>
BRIDGE_HOST = "br"  # the bridge's namespace's suffix
SUPERNET = ipaddress.IPv4Network("10.213.0.0/16")  # the test subnets are /24s of it
NETNS_DIR = Path("/var/run/netns")  # where `ip netns add` names a namespace
CLONE_NEWNET = 0x40000000  # <sched.h>
IP_TIMEOUT_S = 10.0  # one `ip` command (it only talks to the kernel)

_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-[a-z0-9]+$")  # group 1: the creator's pid
_HOST_NAME = re.compile(r"^[a-z0-9]{1,15}$")  # it names the host's veth end too (IFNAMSIZ)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=IP_TIMEOUT_S
    )
    if listing.returncode != 0:
        return f"`ip netns` is not available: {listing.stderr.strip()}"
    return None


def _ip(*args: str) -> str:
    """``ip ARGS``; its stdout. A failure raises with its stderr (never a secret: links only)."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True, slots=True)
class Host:
    """One host: a namespace and its address on the test's bridge."""

    name: str  # the test's name for it, e.g. "gw"
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: Sequence[str]) -> str:
        """Run ``argv`` on this host to the end (at most ``IP_TIMEOUT_S``); its stdout."""
        result = subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=True
        )
        return result.stdout

    def launch_worker(self, spec: WorkerSpec, log_path: Path) -> WorkerProcess:
        """Start ``spec`` (any role, the gateway too) on this host and return at once, with the
        launcher's conventions (``deploy.launcher._popen``): a stdin only we hold, so that it
        exits with us (``--exit-with-parent``), its events on a pipe to us, its own session;
        its logs go to ``log_path``. Its ``ready`` event is the caller's to wait for."""
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                self.command(spec.command()),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, **spec.env},
                start_new_session=True,
            )
        return WorkerProcess(spec, process)

    def call(self, function: Callable[[], T], timeout_s: float) -> T:
        """``function()`` on a thread of this process that has joined this host's namespace
        (a thread's network namespace is its own; the caller's stays where it is), so that
        every socket it opens is this host's. Returns its result or raises its exception;
        ``TimeoutError`` when it has not returned within ``timeout_s`` (it should have its
        own, shorter, timeouts: the thread is left to finish)."""
        outcome: list[T] = []
        failure: list[BaseException] = []

        def main() -> None:
            try:
                _enter_namespace(self.namespace)
                outcome.append(function())
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=main, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"{self.name}: still running after {timeout_s:g} s")
        if failure:
            raise failure[0]
        return outcome[0]


def _enter_namespace(namespace: str) -> None:
    """Move the calling thread into ``namespace`` (``setns(2)``; ``os.setns`` is 3.12+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Network:
    """The hosts of one test, by name, and their subnet."""

    subnet: ipaddress.IPv4Network
    hosts: dict[str, Host]

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


@contextlib.contextmanager
def network(names: Sequence[str]) -> Iterator[Network]:
    """Hosts ``names`` (lower-case letters and digits, at most 15 characters) on one bridge,
    addresses .1, .2, ... in their order; all of it deleted on the way out."""
    bad = [n for n in names if not _HOST_NAME.match(n) or n == BRIDGE_HOST]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"host names must be distinct, [a-z0-9]{{1,15}} and not {BRIDGE_HOST!r}")
    _remove_stale()
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    subnet = _free_subnet()
    bridge = f"{tag}-{BRIDGE_HOST}"
    hosts = {
        name: Host(name, f"{tag}-{name}", str(subnet.network_address + index))
        for index, name in enumerate(names, start=1)
    }
    created: list[str] = []
    try:
        for namespace in [bridge, *(host.namespace for host in hosts.values())]:
            _ip("netns", "add", namespace)
            created.append(namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for host in hosts.values():
            # Both ends made where they live: nothing passes through the root namespace.
            peer = ("peer", "name", "eth0", "netns", host.namespace)
            _ip("-n", bridge, "link", "add", host.name, "type", "veth", *peer)
            _ip("-n", bridge, "link", "set", host.name, "master", "br0", "up")
            cidr = f"{host.address}/{subnet.prefixlen}"
            _ip("-n", host.namespace, "addr", "add", cidr, "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
        yield Network(subnet, hosts)
    finally:
        for namespace in reversed(created):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "delete", namespace)


def _remove_stale() -> None:
    """Delete the namespaces of runs whose process is gone (killed before it could)."""
    for line in _ip("netns", "list").splitlines():
        namespace = line.split(" ", 1)[0]
        match = _NAME.match(namespace)
        if match is None or _is_alive(int(match.group(1))):
            continue
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            _ip("netns", "delete", namespace)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: it exists
    return True


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 of ``SUPERNET`` that no address or route of this machine's own namespace
    overlaps. The test's namespaces are isolated from it anyway: this keeps the test's traffic
    unmistakable for anything real, in packet captures and in the kernel's tables."""
    used: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        fields = line.split()
        used.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show", "table", "all").splitlines():
        # "10.1.0.0/16 dev ...", "local 10.1.2.3 dev ..."; "default via ..." is skipped (it
        # covers every address, and is what a subnet of our own is chosen not to need).
        destination = next((word for word in line.split()[:2] if word[0].isdigit()), None)
        if destination is not None:
            used.append(ipaddress.IPv4Network(destination, strict=False))
    subnets = list(SUPERNET.subnets(new_prefix=24))
    random.shuffle(subnets)
    for subnet in subnets:
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError(f"every /24 of {SUPERNET} is in use here")
