"""The far ends of KV data-plane tests, each in a process of its own (``spawn``).

A peer talks to the test over a ``multiprocessing`` pipe: it sends ``("port", n)`` or
``("ready",)`` once started, then one message per event (``landed``, ``failed``, ``result``,
``failpoint``), and stops on ``("stop",)``. Failpoints are armed through the environment the test
passes in; their hits are sent over the pipe instead of stdout.
"""

from __future__ import annotations

import hashlib
import logging
import os
from multiprocessing.connection import Connection
from typing import Any

import torch

from transfer.errors import TransferError
from transfer.messages import KvLayoutInfo, KvTarget, TransferHeader


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included): equality is checked on bytes."""
    element_size = torch.empty((), dtype=dtype).element_size()
    num_bytes = element_size * int(torch.Size(shape).numel())
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def block_digest(cache: torch.Tensor, block_ids: list[int]) -> tuple[int, str]:
    """(size, SHA-256) of the bytes of ``block_ids`` across all layers, keys and values, in
    order. A digest, not the bytes: a destination's callbacks must not block on a full pipe."""
    index = torch.tensor(block_ids, dtype=torch.int64, device=cache.device)
    data = cache[:, :, index].contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _arm_failpoints(conn: Connection, failpoints: str) -> None:
    if not failpoints:
        return
    os.environ["FAIRGATE_FAILPOINTS"] = failpoints
    import transfer.failpoints

    def report(event: str, **fields: Any) -> None:
        conn.send((event, fields["name"]))

    transfer.failpoints.emit_event = report  # type: ignore[assignment]


class _Destination:
    """Accepts any request id except ``unknown-*``; reports landings over the pipe."""

    def __init__(self, conn: Connection, cache: torch.Tensor) -> None:
        self.conn = conn
        self.cache = cache

    def claim(self, header: TransferHeader) -> None:
        if header.request_id.startswith("unknown-"):
            raise TransferError(f"no reservation for {header.request_id}")
        self.conn.send(("claimed", header.request_id))

    def landed(self, header: TransferHeader) -> None:
        data = block_digest(self.cache, header.dst_block_ids)
        self.conn.send(("landed", header.request_id, data, header.first_token_id, header.seed))

    def failed(self, header: TransferHeader, error: TransferError) -> None:
        self.conn.send(("failed", header.request_id, error.message))


def run_receiver(
    conn: Connection,
    shape: tuple[int, ...],
    dtype_name: str,
    model_id: str,
    port: int,
    failpoints: str,
    timeout_s: float,
    device: str = "cpu",
) -> None:
    from transfer.kv_layout import layout_of
    from transfer.kv_receiver import KvReceiver, ReceiverConfig

    logging.basicConfig(level=logging.INFO)
    _arm_failpoints(conn, failpoints)
    cache = torch.zeros(shape, dtype=getattr(torch, dtype_name), device=device)
    receiver = KvReceiver(
        cache,
        layout_of(cache, model_id),
        _Destination(conn, cache),
        ReceiverConfig(port=port, timeout_s=timeout_s),
    )
    receiver.start()
    conn.send(("port", receiver.port))
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        if command[0] == "num_pairs":
            conn.send(("num_pairs", receiver.num_pairs))
    receiver.stop()


def run_sender(
    conn: Connection,
    shape: tuple[int, ...],
    dtype_name: str,
    seed: int,
    layout: KvLayoutInfo,
    failpoints: str,
    timeout_s: float,
) -> None:
    """Ships one job per ``("send", request_id, target, src_block_ids, num_tokens)`` command."""
    from transfer.kv_sender import KvSender, SenderConfig, TransferJob

    logging.basicConfig(level=logging.INFO)
    _arm_failpoints(conn, failpoints)
    cache = random_cache(shape, getattr(torch, dtype_name), seed)
    sender = KvSender(cache, layout, "sender-process", SenderConfig(timeout_s=timeout_s))
    conn.send(("ready",))
    while True:
        command = conn.recv()
        if command[0] == "stop":
            break
        _, request_id, target, src_block_ids, num_tokens = command
        assert isinstance(target, KvTarget)
        job = TransferJob(request_id, target, src_block_ids, num_tokens, 7, 11, 0)
        sender.submit(job, lambda result: conn.send(("result", result.request_id, result.error)))
    sender.stop()
