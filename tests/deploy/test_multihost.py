"""Several hosts (issue 19): the gateway, a prefill worker, a decode worker and a colocated
worker each on a host of its own — a network namespace with one address on a shared bridge
(``tests.netns``) — and the client on another. Each process listens on its host's address only
(torch's KV store aside: see the last test); the gateway reaches the workers, and the prefill
worker ships the KV to the decode worker over gloo, across the bridge; greedy output through the
gateway is the colocated worker's.

Nothing here can take a shortcut through loopback: each namespace's loopback is its own, so a
process that bound or advertised 127.0.0.1 could not be reached from another host at all."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.launcher import Role, WorkerProcess, WorkerSpec
from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway.streaming import TextStream
from tests import netns
from tests.workers.conftest import TINY_ARGS, colocated
from transfer.messages import SamplingSpec

HOSTS = ("gw", "pf", "dc", "co", "client")  # addresses .1 to .5 of the test's /24
READY_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = 60.0
MAX_TOKENS = 16


@dataclass(slots=True)
class HostStack:
    """The processes of the test, each started on its host."""

    network: netns.Network
    gateway: WorkerProcess
    prefill: WorkerProcess
    decode: WorkerProcess
    colocated: WorkerProcess
    admin_token: str

    @property
    def processes(self) -> dict[str, WorkerProcess]:
        """By host name."""
        return {"gw": self.gateway, "pf": self.prefill, "dc": self.decode, "co": self.colocated}


@pytest.fixture(scope="module")
def network() -> Iterator[netns.Network]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with netns.network(HOSTS) as hosts:
        yield hosts


def _start(host: netns.Host, spec: WorkerSpec, log_dir: Path) -> WorkerProcess:
    return host.launch_worker(spec, log_dir / f"{host.name}.log")


def _wait_ready(processes: list[WorkerProcess], deadline: float) -> None:
    for process in processes:
        process.ready = process.wait_event("ready", max(0.0, deadline - time.monotonic()))


@pytest.fixture(scope="module")
def stack(network: netns.Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostStack]:
    """The workers (side by side), then the gateway in front of the prefill and decode ones;
    the gateway stopped first, as ``deploy.stack`` does."""
    log_dir = tmp_path_factory.mktemp("multihost")
    started: list[WorkerProcess] = []
    try:
        workers = []
        roles: list[tuple[str, Role]] = [("pf", "prefill"), ("dc", "decode"), ("co", "colocated")]
        for name, role in roles:
            host = network[name]
            # --kv-host: where its KV peers reach it (the decode side's store, gloo on both).
            args = [*TINY_ARGS, "--host", host.address, "--kv-host", host.address]
            spec = WorkerSpec(role, "tiny", [*args, "--log-level", "warning"])
            workers.append(_start(host, spec, log_dir))
            started.append(workers[-1])
        _wait_ready(workers, time.monotonic() + READY_TIMEOUT_S)
        prefill, decode, colocated_worker = workers
        admin_token = "fga-" + secrets.token_urlsafe(32)
        gateway_args = [
            "--host",
            network["gw"].address,
            "--store",
            str(log_dir / "fairgate.db"),
            "--prefill",
            prefill.http_url,
            "--decode",
            decode.http_url,
            "--log-level",
            "warning",
        ]
        gateway_spec = WorkerSpec(
            "gateway", "tiny", gateway_args, {"FAIRGATE_GATEWAY_ADMIN_TOKEN": admin_token}
        )
        gateway = _start(network["gw"], gateway_spec, log_dir)
        started.insert(0, gateway)
        _wait_ready([gateway], time.monotonic() + READY_TIMEOUT_S)
        yield HostStack(network, gateway, prefill, decode, colocated_worker, admin_token)
    finally:
        for process in started:
            process.stop()


Endpoint = tuple[str, int]  # (IPv4 address, or "*" for every address; port)


def _endpoint(text: str) -> Endpoint:
    """``ss``'s ``10.0.0.1:80``, ``[::ffff:10.0.0.1]:80``, ``*:80`` as (``10.0.0.1``, 80)."""
    address, _, port = text.rpartition(":")
    address = address.strip("[]").removeprefix("::ffff:")
    return ("*" if address in ("*", "::", "0.0.0.0") else address, int(port))


def _listening(host: netns.Host) -> list[Endpoint]:
    """Every TCP socket listening on ``host``."""
    lines = host.run(["ss", "-Hltn"]).splitlines()
    return [_endpoint(line.split()[3]) for line in lines]  # State Recv-Q Send-Q Local Peer


def _connections(host: netns.Host) -> list[tuple[Endpoint, Endpoint]]:
    """Every established TCP connection of ``host``: (local end, peer end)."""
    lines = host.run(["ss", "-Htn", "state", "established"]).splitlines()
    return [(_endpoint(f[2]), _endpoint(f[3])) for f in map(str.split, lines)]  # Recv-Q Send-Q


async def _admin_key(client: httpx.AsyncClient, admin_token: str) -> str:
    admin = {"authorization": f"Bearer {admin_token}"}
    created = await client.post("/admin/v1/tenants", json={"name": "multihost"}, headers=admin)
    assert created.status_code == 201, created.text
    key = await client.post("/admin/v1/tenants/multihost/keys", json={"name": "k"}, headers=admin)
    assert key.status_code == 201, key.text
    return str(key.json()["secret"])


async def _transfers(url: str) -> dict[str, float]:
    """A worker's ``fairgate_kv_transfers_total`` by outcome, and its bytes sent."""
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        response = await client.get(url + "/metrics")
    response.raise_for_status()
    counts = {"ok": 0.0, "failed": 0.0, "bytes": 0.0}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "fairgate_kv_transfers_total":
                counts[sample.labels["outcome"]] = sample.value
            elif sample.name == "fairgate_kv_transfer_bytes_total":
                counts["bytes"] = sample.value
    return counts


async def _through_the_gateway(
    stack: HostStack, prompts: list[list[int]]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """On the client host: each prompt through the gateway at once (greedy); the choices and
    usage, and the prefill and decode workers' transfer counts before and after."""
    async with httpx.AsyncClient(
        base_url=stack.gateway.http_url, timeout=30.0, trust_env=False
    ) as client:
        key = await _admin_key(client, stack.admin_token)
        auth = {"authorization": f"Bearer {key}"}
        models = await client.get("/v1/models", headers=auth)
        assert models.status_code == 200, models.text
        model = models.json()["data"][0]["id"]
        before = {
            "pf": await _transfers(stack.prefill.http_url),
            "dc": await _transfers(stack.decode.http_url),
        }
        answers = await asyncio.gather(
            *(
                client.post(
                    "/v1/completions",
                    json={
                        "model": model,
                        "prompt": prompt,
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                    },
                    headers=auth,
                )
                for prompt in prompts
            )
        )
        assert [a.status_code for a in answers] == [200] * len(prompts), [a.text for a in answers]
        after = {
            "pf": await _transfers(stack.prefill.http_url),
            "dc": await _transfers(stack.decode.http_url),
        }
    delta = {
        name: {field: after[name][field] - before[name][field] for field in after[name]}
        for name in after
    }
    return [answer.json() for answer in answers], delta


async def _colocated(stack: HostStack, prompts: list[list[int]]) -> list[list[int]]:
    sampling = SamplingSpec(max_tokens=MAX_TOKENS, temperature=0)
    url = stack.colocated.http_url
    return list(
        await asyncio.gather(
            *(colocated(url, f"ref-{i}", prompt, sampling) for i, prompt in enumerate(prompts))
        )
    )


def _text(tokenizer: Tokenizer, token_ids: list[int]) -> str:
    """What the gateway makes of these tokens (no stop strings)."""
    stream = TextStream(tokenizer)
    return stream.push(token_ids) + stream.finish()


@dataclass(frozen=True, slots=True)
class Served:
    """Greedy requests through the gateway, and the same prompts on the colocated worker."""

    answers: list[dict[str, Any]]  # the gateway's, one per prompt
    references: list[list[int]]  # the colocated worker's output tokens, one per prompt
    transfers: dict[str, dict[str, float]]  # "pf", "dc": what the requests added to `_transfers`


@pytest.fixture(scope="module")
def served(stack: HostStack) -> Served:
    rng = random.Random(19)
    # Lengths across block boundaries (block size 16), as token ids: no tokenizer in the way.
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (5, 16, 47, 130)]
    client = stack.network["client"]
    answers, transfers = client.call(
        lambda: asyncio.run(_through_the_gateway(stack, prompts)), CLIENT_TIMEOUT_S
    )
    references = client.call(lambda: asyncio.run(_colocated(stack, prompts)), CLIENT_TIMEOUT_S)
    return Served(answers, references, transfers)


def test_greedy_through_the_gateway_equals_colocated(served: Served) -> None:
    tokenizer = Tokenizer.load(tokenizer_path(resolve_model("tiny", pull=False)))
    for answer, reference in zip(served.answers, served.references, strict=True):
        [choice] = answer["choices"]
        assert answer["usage"]["completion_tokens"] == len(reference), (answer, reference)
        assert choice["text"] == _text(tokenizer, reference), (answer, reference)
        assert choice["finish_reason"] == ("length" if len(reference) == MAX_TOKENS else "stop")


def test_the_kv_moved_between_the_hosts_over_gloo(stack: HostStack, served: Served) -> None:
    # Every request was long enough to need a transfer (one token ends at the prefill worker).
    assert all(len(reference) > 1 for reference in served.references), served.references
    # Each request's KV left the prefill host and landed on the decode host: one transfer each,
    # none failed.
    transfers = served.transfers
    assert transfers["pf"]["ok"] == transfers["dc"]["ok"] == len(served.answers), transfers
    assert transfers["pf"]["failed"] == transfers["dc"]["failed"] == 0, transfers
    assert transfers["pf"]["bytes"] > 0, transfers
    # Gloo's connection (the one that is not to the KV store) runs between the two addresses.
    pf, dc = stack.network["pf"].address, stack.network["dc"].address
    connections = _connections(stack.network["pf"])
    gloo = [
        (local, peer)
        for local, peer in connections
        if local[0] == pf and peer[0] == dc and peer[1] != stack.decode.kv_port
    ]
    assert gloo, connections


@pytest.mark.usefixtures("served")  # after a transfer: gloo listens once a pair exists
def test_each_process_listens_on_its_own_host_address_only(stack: HostStack) -> None:
    for name, process in stack.processes.items():
        address = stack.network[name].address
        assert process.http_url.startswith(f"http://{address}:"), (name, process.ready)
        if process.spec.role in ("decode", "colocated"):
            assert process.ready["kv_host"] == address, process.ready
        # HTTP and gloo listen on its address alone. The KV store is the one exception: torch's
        # TCPStore server listens on every address whatever host it is given (torch 2.13), here
        # its host's own address and loopback.
        listening = _listening(stack.network[name])
        http_port = int(process.http_url.rpartition(":")[2])
        assert (address, http_port) in listening, listening
        kv_port = process.ready.get("kv_port")
        assert all(a == address or port == kv_port for a, port in listening), listening
