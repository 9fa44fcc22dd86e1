"""Workers found by DNS (``gateway.discovery``): names resolved into the registry, addresses
that leave the answer drained and then removed, a name that stops resolving keeping its
workers."""

from __future__ import annotations

import socket

import pytest

from gateway.discovery import DnsDiscovery, split_host_port
from gateway.workers import WorkerRegistry


class ScriptedDns(DnsDiscovery):
    """Resolves from ``answers`` (host -> addresses, None: does not resolve) instead of the
    system resolver, so a test can change the answer between rounds."""

    answers: dict[str, set[str] | None]

    async def _resolve(self, host: str, port: int) -> set[str] | None:
        return self.answers[host]


def _urls(registry: WorkerRegistry) -> dict[str, str]:
    return {h.url: h.state for h in registry.handles}


async def test_addresses_become_workers_and_leave_drained_then_removed() -> None:
    registry = WorkerRegistry([], [])
    dns = ScriptedDns(registry, {"decode": ["decode.svc:8201"], "prefill": ["prefill.svc:8101"]})
    dns.answers = {"decode.svc": {"10.0.0.1", "10.0.0.2"}, "prefill.svc": {"10.0.0.3"}}
    try:
        await dns.refresh()
        assert set(_urls(registry)) == {
            "http://10.0.0.1:8201",
            "http://10.0.0.2:8201",
            "http://10.0.0.3:8101",
        }
        assert {h.source for h in registry.handles} == {"dns"}
        [ten_two] = [h for h in registry.handles if h.url == "http://10.0.0.2:8201"]
        ten_two.state = "ready"  # as a poll would find it
        # Its pod is going: drained first (it finishes what it holds)...
        dns.answers["decode.svc"] = {"10.0.0.1"}
        await dns.refresh()
        assert ten_two in registry.handles
        assert ten_two.state == "draining"  # type: ignore[comparison-overlap]
        # ... back in the answer: ready again.
        dns.answers["decode.svc"] = {"10.0.0.1", "10.0.0.2"}
        await dns.refresh()
        assert ten_two.state == "ready"
        # Gone, and drained: removed.
        dns.answers["decode.svc"] = {"10.0.0.1"}
        await dns.refresh()
        ten_two.state = "drained"
        await dns.refresh()
        assert "http://10.0.0.2:8201" not in _urls(registry)
        # A name that stops resolving keeps its workers.
        dns.answers["decode.svc"] = None
        await dns.refresh()
        assert "http://10.0.0.1:8201" in _urls(registry)
    finally:
        await registry.stop()


async def test_a_name_with_no_address_is_an_empty_pool() -> None:
    registry = WorkerRegistry([], [])
    try:
        dns = DnsDiscovery(registry, {"decode": ["no-such-worker.invalid:8201"]})
        assert await dns._resolve("no-such-worker.invalid", 8201) == set()
    finally:
        await registry.stop()


async def test_a_real_name_resolves_to_its_addresses() -> None:
    registry = WorkerRegistry([], [])
    try:
        await DnsDiscovery(registry, {"decode": ["localhost:8201"]}).refresh()
        infos = socket.getaddrinfo("localhost", 8201, socket.AF_INET, socket.SOCK_STREAM)
        expected = {f"http://{info[4][0]}:8201" for info in infos}
        assert set(_urls(registry)) == expected and expected
    finally:
        await registry.stop()


def test_names_need_a_port() -> None:
    assert split_host_port("[fd00::1]:80") == ("fd00::1", 80)
    for bad in ("decode.svc", "decode.svc:", "decode.svc:x", "decode.svc:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            split_host_port(bad)
