"""Workers found by DNS: ``gateway.prefill_dns`` / ``decode_dns`` name ``host:port`` pairs that
resolve to one address per worker (a Kubernetes headless Service: one per ready pod). Every
``dns_refresh_s`` each name is resolved again; each IPv4 address is a worker at
``http://ADDRESS:PORT`` (worker URLs take no IPv6 literals: ``transfer.registration``), added to
the registry (source ``dns``) when it appears. One that is no longer in the answer (its pod
terminating, or not ready) is drained, so it finishes what it holds, and removed once drained
or once it stops answering; back in the answer, it is undrained. Every gateway replica resolves
the same names, so they all see the same pool, with no restart and no registration. A name with
no address (a headless Service whose last pod went) drains its workers; one that does not
resolve for another reason keeps them (a DNS outage is no reason to drain the pool).
Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Mapping, Sequence

from gateway.errors import ClientError, Conflict
from gateway.workers import WorkerRegistry
from transfer.messages import WorkerRole

__all__ = ["DnsDiscovery", "split_host_port"]

logger = logging.getLogger(__name__)

# The name exists with no address, or does not exist: the answer is "no worker" (a temporary
# failure, EAI_AGAIN and the rest, keeps the workers known).
_NO_ADDRESSES = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def split_host_port(name: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too); ``ValueError`` when the port is missing or bad."""
    host, sep, port = name.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _url(address: str, port: int) -> str:
    return f"http://{ipaddress.IPv4Address(address)}:{port}"


class DnsDiscovery:
    """The names of each role, resolved into the registry (module docstring)."""

    def __init__(
        self,
        registry: WorkerRegistry,
        names: Mapping[WorkerRole, Sequence[str]],
        *,
        refresh_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self.names = {role: [split_host_port(n) for n in ns] for role, ns in names.items() if ns}
        self.refresh_s = refresh_s
        self._task: asyncio.Task[None] | None = None
        self._drained: set[str] = set()  # the URLs this drained (gone from the answer)

    async def start(self) -> None:
        """One round now (the first workers are known before the gateway says it is ready),
        then one every ``refresh_s``."""
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="dns-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        for role, names in self.names.items():
            found: set[str] = set()
            answered = True
            for host, port in names:
                addresses = await self._resolve(host, port)
                if addresses is None:
                    answered = False
                    continue
                found |= {_url(address, port) for address in addresses}
            for url in sorted(found):
                try:
                    handle, is_new = self.registry.add(url, role, source="dns")
                except (ClientError, Conflict) as exc:
                    logger.warning("worker %s from DNS not added: %s", url, exc)
                    continue
                if not is_new and url in self._drained:
                    self._drained.discard(url)
                    self.registry.undrain(handle)  # back in the answer (ready again)
            if answered:
                self._retire(role, found)

    async def _resolve(self, host: str, port: int) -> set[str] | None:
        """The addresses ``host`` resolves to, None when it does not resolve now."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            if exc.errno in _NO_ADDRESSES:
                # A headless Service with no ready pod: an empty pool, not an outage.
                return set()
            logger.warning("DNS: %s does not resolve now: %s", host, exc)
            return None
        except OSError as exc:
            logger.warning("DNS: %s does not resolve now: %s", host, exc)
            return None
        return {str(info[4][0]) for info in infos}

    def _retire(self, role: WorkerRole, found: set[str]) -> None:
        """DNS workers of ``role`` gone from the answer: drained, then removed."""
        for handle in list(self.registry.handles):
            if handle.source != "dns" or handle.expected_role != role or handle.url in found:
                continue
            if handle.state in ("drained", "dead", "unknown", "incompatible"):
                self._drained.discard(handle.url)
                self.registry.remove(handle, reason="gone from DNS", by_admin=False)
            elif not handle.drain_requested:
                self._drained.add(handle.url)  # (an admin's drain is the admin's to undo)
                self.registry.drain(handle)
