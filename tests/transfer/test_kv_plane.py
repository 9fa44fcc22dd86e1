"""The KV data plane between real processes: bitwise-equal blocks, the handshake, refusals, and
peers killed in the middle of a transfer (gloo over loopback, as on a CPU machine)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from tests.transfer.kv_peers import block_digest, random_cache, run_receiver, run_sender
from transfer.errors import IncompatiblePeer, TransferError
from transfer.kv_layout import layout_of
from transfer.kv_sender import KvSender, SenderConfig, TransferJob, TransferResult
from transfer.messages import KvTarget

CONTEXT = multiprocessing.get_context("spawn")
TIMEOUT_S = 4.0  # every data-plane wait in these tests
SHAPE = (2, 3, 64, 4, 2, 8)  # [kv, layers, blocks, block_size, kv heads, head dim]


@dataclass
class Peer:
    process: Any
    conn: Connection

    def expect(self, kind: str, timeout_s: float = 30.0) -> tuple[Any, ...]:
        if not self.conn.poll(timeout_s):
            raise AssertionError(f"no {kind!r} message from the peer within {timeout_s} s")
        message = self.conn.recv()
        assert message[0] == kind, message
        return tuple(message)

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send(("stop",))
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()


def start_receiver(
    shape: tuple[int, ...] = SHAPE,
    dtype: str = "float32",
    *,
    model_id: str = "m",
    port: int = 0,
    failpoints: str = "",
    device: str = "cpu",
) -> tuple[Peer, int]:
    ours, theirs = CONTEXT.Pipe()
    process = CONTEXT.Process(
        target=run_receiver,
        args=(theirs, shape, dtype, model_id, port, failpoints, TIMEOUT_S, device),
        daemon=True,
    )
    process.start()
    peer = Peer(process, ours)
    _, bound_port = peer.expect("port")
    return peer, bound_port


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for peer in started:
        peer.stop()


class Sender:
    """A sender in this process, its results on a queue."""

    def __init__(self, cache: torch.Tensor, *, model_id: str = "m", min_direct: int = 8) -> None:
        self.cache = cache
        self.kv = KvSender(
            cache,
            layout_of(cache, model_id),
            "test-sender",
            SenderConfig(timeout_s=TIMEOUT_S, min_direct_blocks=min_direct),
        )
        self.results: queue.SimpleQueue[TransferResult] = queue.SimpleQueue()

    def send(
        self, request_id: str, port: int, src: list[int], dst: list[int], num_tokens: int = 0
    ) -> TransferResult:
        block_size = self.cache.shape[3]
        target = KvTarget("receiver", "127.0.0.1", port, dst)
        job = TransferJob(request_id, target, src, num_tokens or len(src) * block_size, 5, 9, 0)
        self.kv.submit(job, self.results.put)
        return self.results.get(timeout=60)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [SHAPE, (2, 30, 40, 16, 3, 64)], ids=["small", "smollm2-layers"])
def test_blocks_land_bitwise_equal(peers: list[Peer], dtype: str, shape: tuple[int, ...]) -> None:
    receiver, port = start_receiver(shape, dtype)
    peers.append(receiver)
    cache = random_cache(shape, getattr(torch, dtype), seed=1)
    sender = Sender(cache, min_direct=3)
    generator = torch.Generator().manual_seed(2)
    layouts = {
        "contiguous": (list(range(4, 20)), list(range(10, 26))),
        "scattered": (
            torch.randperm(shape[2], generator=generator)[:13].tolist(),
            torch.randperm(shape[2], generator=generator)[:13].tolist(),
        ),
        # runs of 5 and 4 on both ends, the rest scattered
        "mixed": (
            [30, 31, 32, 33, 34, 2, 9, 0, 20, 21, 22, 23],
            [1, 2, 3, 4, 5, 7, 6, 12, 30, 31, 32, 33],
        ),
        "one-block": ([7], [0]),
    }
    try:
        for name, (src, dst) in layouts.items():
            block_size = shape[3]
            result = sender.send(name, port, src, dst, num_tokens=len(src) * block_size - 1)
            assert result.error is None, result.error
            assert receiver.expect("claimed")[1] == name
            _, request_id, landed, first_token_id, seed = receiver.expect("landed")
            assert request_id == name and (first_token_id, seed) == (5, 9)
            num_bytes, digest = block_digest(cache, src)
            assert landed == (num_bytes, digest), f"{name}: bytes differ after transfer"
            assert result.num_bytes == num_bytes
    finally:
        sender.kv.stop()


def test_incompatible_peer_is_refused_with_the_mismatch_named(peers: list[Peer]) -> None:
    receiver, port = start_receiver(SHAPE, "float32", model_id="model-a")
    peers.append(receiver)
    other_shape = (2, 3, 64, 8, 2, 8)  # block size 8 instead of 4
    sender = Sender(torch.zeros(other_shape, dtype=torch.bfloat16), model_id="model-b")
    try:
        result = sender.send("r", port, [0], [0])
    finally:
        sender.kv.stop()
    assert isinstance(result.error, IncompatiblePeer)
    message = result.error.message
    assert "block_size 8 (peer) != 4 (here)" in message
    assert "dtype 'bfloat16' (peer) != 'float32' (here)" in message
    assert "model_id 'model-b' (peer) != 'model-a' (here)" in message


def test_a_refused_transfer_leaves_the_pair_usable(peers: list[Peer]) -> None:
    receiver, port = start_receiver()
    peers.append(receiver)
    cache = random_cache(SHAPE, torch.float32, seed=3)
    sender = Sender(cache)
    try:
        refused = sender.send("unknown-1", port, [1, 2], [3, 4])
        assert isinstance(refused.error, TransferError)
        assert "no reservation for unknown-1" in refused.error.message
        ok = sender.send("known-1", port, [1, 2], [3, 4])
        assert ok.error is None
        receiver.expect("claimed")
        assert receiver.expect("landed")[2] == block_digest(cache, [1, 2])
        receiver.conn.send(("num_pairs",))
        assert receiver.expect("num_pairs")[1] == 1  # no second pairing was needed
    finally:
        sender.kv.stop()


def test_receiver_killed_mid_transfer_fails_the_sender_in_time_and_a_restart_pairs_again(
    peers: list[Peer],
) -> None:
    receiver, port = start_receiver(failpoints="kv.recv.mid_transfer=pause")
    peers.append(receiver)
    cache = random_cache(SHAPE, torch.float32, seed=4)
    sender = Sender(cache)
    try:
        target = KvTarget("receiver", "127.0.0.1", port, list(range(20)))
        job = TransferJob("doomed", target, list(range(20, 40)), 80, 1, 2, 0)
        sender.kv.submit(job, sender.results.put)
        receiver.expect("claimed")
        receiver.expect("failpoint")
        receiver.kill()
        started = time.monotonic()
        result = sender.results.get(timeout=60)
        assert isinstance(result.error, TransferError)
        assert time.monotonic() - started < 3 * TIMEOUT_S
        # The same port, a new process: the sender's next job pairs with it.
        restarted, same_port = start_receiver(port=port)
        peers.append(restarted)
        assert same_port == port
        again = sender.send("again", port, list(range(20, 40)), list(range(20)))
        assert again.error is None, again.error
        restarted.expect("claimed")
        assert restarted.expect("landed")[2] == block_digest(cache, list(range(20, 40)))
    finally:
        sender.kv.stop()


def test_hand_offs_queued_behind_a_failed_pairing_fail_at_once() -> None:
    """A decode worker that died: connecting to its store retries for about 2.5 timeouts. The
    first pairing waits that out; what is queued behind it on the link fails at once, rather
    than one more wait each while its KV stays held (three here: 3 x 2.5 s more before)."""
    with socket.socket() as probe:  # a port nothing listens on any more
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cache = random_cache(SHAPE, torch.float32, seed=5)
    timeout_s = 1.0
    sender = KvSender(
        cache, layout_of(cache, "m"), "test-sender", SenderConfig(timeout_s=timeout_s)
    )
    results: queue.SimpleQueue[TransferResult] = queue.SimpleQueue()
    try:
        target = KvTarget("gone", "127.0.0.1", port, list(range(4)))
        started = time.monotonic()
        paired = sender.connect(target)
        for index in range(3):
            job = TransferJob(f"queued-{index}", target, list(range(4, 8)), 16, 1, 2, 0)
            sender.submit(job, results.put)
        with pytest.raises(TransferError):
            paired.result(timeout=60)
        first_s = time.monotonic() - started
        queued = [results.get(timeout=60) for _ in range(3)]
        assert time.monotonic() - started < first_s + timeout_s
        assert [r.request_id for r in queued] == ["queued-0", "queued-1", "queued-2"]
        for result in queued:
            assert isinstance(result.error, TransferError)
            assert "failed at once" in str(result.error)
    finally:
        sender.stop()


def test_sender_killed_mid_transfer_fails_the_landing_and_a_new_sender_pairs(
    peers: list[Peer],
) -> None:
    receiver, port = start_receiver()
    peers.append(receiver)
    ours, theirs = CONTEXT.Pipe()
    layout = layout_of(torch.empty(SHAPE), "m")
    process = CONTEXT.Process(
        target=run_sender,
        args=(theirs, SHAPE, "float32", 5, layout, "kv.send.mid_transfer=pause", TIMEOUT_S),
        daemon=True,
    )
    process.start()
    doomed_sender = Peer(process, ours)
    peers.append(doomed_sender)
    doomed_sender.expect("ready")
    target = KvTarget("receiver", "127.0.0.1", port, list(range(30)))
    ours.send(("send", "doomed", target, list(range(30)), 120))
    receiver.expect("claimed")
    doomed_sender.expect("failpoint")
    doomed_sender.kill()
    started = time.monotonic()
    _, request_id, reason = receiver.expect("failed", timeout_s=6 * TIMEOUT_S)
    assert request_id == "doomed" and reason
    assert time.monotonic() - started < 3 * TIMEOUT_S
    cache = random_cache(SHAPE, torch.float32, seed=6)
    sender = Sender(cache)
    try:
        result = sender.send("next", port, list(range(30)), list(range(30)))
        assert result.error is None, result.error
        receiver.expect("claimed")
        assert receiver.expect("landed")[2] == block_digest(cache, list(range(30)))
    finally:
        sender.kv.stop()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL pairs need two CUDA devices")
def test_nccl_blocks_land_bitwise_equal_between_gpus(peers: list[Peer]) -> None:
    """KV on CUDA travels over NCCL (one process, one GPU each: NCCL refuses two ranks on one
    device)."""
    shape = (2, 30, 64, 16, 3, 64)
    receiver, port = start_receiver(shape, "bfloat16", device="cuda:1")
    peers.append(receiver)
    cache = random_cache(shape, torch.bfloat16, seed=7).to("cuda:0")
    sender = Sender(cache, min_direct=3)
    try:
        src, dst = [*range(10, 30), 3, 50, 41], [*range(0, 20), 40, 33, 21]
        result = sender.send("nccl", port, src, dst)
        assert result.error is None, result.error
        receiver.expect("claimed")
        assert receiver.expect("landed")[2] == block_digest(cache, src)
    finally:
        sender.kv.stop()
