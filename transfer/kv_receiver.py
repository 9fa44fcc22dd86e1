"""The decode worker's end of the KV data plane: hosts the ``TCPStore`` on ``kv_port``, accepts
pair requests, and lands incoming blocks in the reserved slots of the KV cache.

Threads, each with its own store connection (a store client runs one operation at a time):

- the *acceptor* takes pair requests (``KvHello``) in slot order, refuses incompatible peers with
  every mismatch named, ends older pairs of the same sender (it restarted), and starts a pair
  thread;
- one *pair thread* per pair builds the process group (rank 1) and then receives transfers one at
  a time: header → ``destination.claim`` → receives posted → reply "ready" → blocks land →
  ``destination.landed`` (or ``failed``) → ack. A pair idle for ``pair_idle_timeout_s`` ends
  itself; the sender pairs again when it next needs to.

Idle waits do not block in the store past their time: c10d logs a warning for every store
``wait`` that times out, so an idle worker would log one a minute. The acceptor polls its slot
instead (``check``, backing off to ``HELLO_POLL_MAX_S``: a pair is set up at most that much
later), and a pair outlives the sender's own idle timeout (``kv_sender``), so a live sender ends
it first with CLOSED and the pair thread's timeout only reaps pairs whose sender died.

The ``KvDestination`` (the decode worker) decides whether a header's request and blocks are the
ones it reserved, and owns what happens once blocks land or fail; its methods are called on pair
threads. Every wait has a timeout; an error on a pair fails the transfer in flight for its owner
and ends the pair.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import torch
import torch.distributed as dist

from transfer.errors import TransferError, TransferTimeout
from transfer.kv_layout import layout_mismatches, receiver_plan
from transfer.kv_pair import (
    CLOSED,
    HELLO_COUNTER,
    PairStore,
    Store,
    TCPStore,
    connect_store,
    create_process_group,
    hello_key,
    recv_blocks,
    shutdown_process_group,
    translate_dist_error,
)
from transfer.messages import (
    KvHello,
    KvHelloReply,
    KvLayoutInfo,
    TransferAck,
    TransferHeader,
    TransferReply,
    decode_message,
    encode_message,
)

__all__ = ["KvDestination", "KvReceiver", "ReceiverConfig"]

logger = logging.getLogger(__name__)

HELLO_POLL_MIN_S = 0.002  # the acceptor's first look again at an empty pair-request slot…
HELLO_POLL_MAX_S = 0.05  # …and its slowest: about 20 local store round trips a second idle


class KvDestination(Protocol):
    """The owner of incoming blocks. Called on pair threads; must not block for long."""

    def claim(self, header: TransferHeader) -> None:
        """Accept the transfer into the blocks it names, or raise ``TransferError`` saying why
        not (unknown request, blocks that are not the reserved ones). Nothing is sent before
        this returns."""
        ...

    def landed(self, header: TransferHeader) -> None:
        """Every block of a claimed transfer is in the cache."""
        ...

    def failed(self, header: TransferHeader, error: TransferError) -> None:
        """A claimed transfer failed; its blocks hold garbage."""
        ...


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    host: str = "127.0.0.1"  # the address senders reach this worker at (store and gloo)
    port: int = 0  # the store's port (kv_port); 0 picks a free one
    timeout_s: float = 30.0  # every wait inside a pairing or a transfer
    # Longer than ``SenderConfig.idle_timeout_s`` (module docstring).
    pair_idle_timeout_s: float = 900.0
    # How long the acceptor waits on one pair-request slot before it checks whether the slot
    # was abandoned.
    hello_wait_s: float = 60.0
    max_pairs: int = 64  # NCCL communicators cost GPU memory: pairs are bounded


@dataclass(slots=True)
class _Pair:
    pair_id: str
    sender_id: str
    thread: threading.Thread | None = None
    closing: bool = False
    next_seq: int = 0  # the header slot the pair thread waits on


@dataclass(slots=True)
class ReceiverStats:
    num_transfers: int = 0
    num_failed: int = 0
    num_bytes: int = 0
    seconds: float = 0.0


class KvReceiver:
    """See the module docstring. ``start`` binds the port; ``stop`` ends every thread."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KvLayoutInfo,
        destination: KvDestination,
        config: ReceiverConfig | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.layout = layout
        self.destination = destination
        self.config = config or ReceiverConfig()
        self._store: Store | None = None  # the master; never used for blocking waits
        self._lock = threading.Lock()
        self._pairs: dict[str, _Pair] = {}
        self._acceptor: threading.Thread | None = None
        self._acceptor_slot = 0
        self._stopping = False
        self.stats = ReceiverStats()

    @property
    def port(self) -> int:
        if self._store is None:
            raise RuntimeError("the KV receiver is not started")
        return int(self._store.port)

    @property
    def num_pairs(self) -> int:
        with self._lock:
            return len(self._pairs)

    def start(self) -> None:
        try:
            self._store = TCPStore(
                self.config.host,
                self.config.port,
                None,
                True,
                datetime.timedelta(seconds=self.config.timeout_s),
                wait_for_workers=False,
            )
        except dist.DistError as exc:
            raise translate_dist_error(exc, f"listening on KV port {self.config.port}") from exc
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-acceptor", daemon=True)
        self._acceptor.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the acceptor and every pair (a transfer in flight finishes or times out first)."""
        store = self._store
        if store is None:
            return
        with self._lock:
            self._stopping = True
            pairs = list(self._pairs.values())
            acceptor_slot = self._acceptor_slot
        # Wakes the acceptor at once (it would see ``_stopping`` within ``HELLO_POLL_MAX_S``
        # anyway); if our own store is gone, its next check fails and it exits.
        with contextlib.suppress(dist.DistError):
            store.compare_set(hello_key(acceptor_slot), b"", CLOSED)
        for pair in pairs:
            self._close_pair(pair)
        deadline = time.monotonic() + timeout_s
        threads = [self._acceptor] + [pair.thread for pair in pairs]
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    # ---- accepting pairs --------------------------------------------------------------------

    def _accept_loop(self) -> None:
        try:
            store = connect_store("127.0.0.1", self.port, self.config.timeout_s)
        except TransferError:
            logger.exception("the KV acceptor cannot reach its own store")
            return
        slot = 0
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._acceptor_slot = slot
            key = hello_key(slot)
            try:
                if not self._poll(store, key):
                    # Nobody came to this slot. A requester that took it and died before writing
                    # it would block later ones: skip it once a later slot is taken.
                    if int(store.add(HELLO_COUNTER, 0)) > slot + 1:
                        logger.warning("KV pair request slot %d was taken but never filled", slot)
                        slot += 1
                    continue
                data = bytes(store.get(key))
                store.delete_key(key)
            except dist.DistError:
                return  # the store is gone (stopping)
            if data == CLOSED:
                return
            reply = self._accept(data)
            try:
                store.set(key + "/reply", encode_message(reply))
            except dist.DistError:
                return
            slot += 1

    def _poll(self, store: Store, key: str) -> bool:
        """Whether ``key`` was set within ``hello_wait_s``: checked every ``HELLO_POLL_MIN_S``,
        backing off to ``HELLO_POLL_MAX_S`` (module docstring). False early when stopping."""
        deadline = time.monotonic() + self.config.hello_wait_s
        delay = HELLO_POLL_MIN_S
        while not store.check([key]):
            if self._stopping or time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(2 * delay, HELLO_POLL_MAX_S)
        return True

    def _accept(self, data: bytes) -> KvHelloReply:
        try:
            hello = decode_message(data, KvHello)
        except msgspec.MsgspecError as exc:
            return KvHelloReply(accepted=False, reason=f"malformed pair request: {exc}")
        problems = layout_mismatches(hello, self.layout)
        if problems:
            reason = f"incompatible KV peer {hello.sender_id}: " + "; ".join(problems)
            logger.warning("refused %s", reason)
            return KvHelloReply(accepted=False, reason=reason, incompatible=True)
        with self._lock:
            if self._stopping:
                return KvHelloReply(accepted=False, reason="the decode worker is stopping")
            superseded = [p for p in self._pairs.values() if p.sender_id == hello.sender_id]
            if len(self._pairs) - len(superseded) >= self.config.max_pairs:
                return KvHelloReply(
                    accepted=False, reason=f"too many KV pairs (at most {self.config.max_pairs})"
                )
            pair = _Pair(hello.pair_id, hello.sender_id)
            self._pairs[pair.pair_id] = pair
            pair.thread = threading.Thread(
                target=self._pair_main, args=(pair,), name=f"kv-pair-{pair.pair_id}", daemon=True
            )
        for old in superseded:
            logger.info("KV pair %s replaced by %s (sender restarted)", old.pair_id, pair.pair_id)
            self._close_pair(old)
        pair.thread.start()
        logger.info("KV pair %s with %s accepted", pair.pair_id, hello.sender_id)
        return KvHelloReply(accepted=True)

    def _close_pair(self, pair: _Pair) -> None:
        """Ask a pair thread to finish: wakes it if it waits for a header."""
        pair.closing = True
        store = self._store
        if store is not None:
            PairStore(store, pair.pair_id).close(pair.next_seq)

    # ---- one pair ---------------------------------------------------------------------------

    def _pair_main(self, pair: _Pair) -> None:
        process_group: Any = None
        try:
            store = PairStore(
                connect_store("127.0.0.1", self.port, self.config.timeout_s), pair.pair_id
            )
            if self.layout.backend == "nccl":
                torch.cuda.set_device(self.kv_cache.device)
            process_group = create_process_group(
                store.process_group_store,
                rank=1,
                backend=self.layout.backend,
                host=self.config.host,
                timeout_s=self.config.timeout_s,
            )
            self._receive_loop(pair, store, process_group)
        except TransferError as exc:
            logger.warning("KV pair %s ended: %s", pair.pair_id, exc)
        except Exception:
            logger.exception("KV pair %s failed", pair.pair_id)
        finally:
            if process_group is not None:
                shutdown_process_group(process_group)
            with self._lock:
                self._pairs.pop(pair.pair_id, None)

    def _receive_loop(self, pair: _Pair, store: PairStore, process_group: Any) -> None:
        while not pair.closing:
            seq = pair.next_seq
            try:
                data = store.wait_header(seq, self.config.pair_idle_timeout_s)
            except TransferTimeout:
                raced = store.close(seq)
                if raced is None:
                    logger.info("KV pair %s idle: closed", pair.pair_id)
                    return
                data = raced
            if data == CLOSED:
                return
            pair_ok = self._receive_one(store, process_group, seq, data)
            pair.next_seq = seq + 1
            if not pair_ok:
                store.close(seq + 1)
                return

    def _receive_one(self, store: PairStore, process_group: Any, seq: int, data: bytes) -> bool:
        """One transfer; False when the process group can no longer be trusted."""
        try:
            header = decode_message(data, TransferHeader)
            plan = receiver_plan(header)
            self._check_header(header, seq)
        except (msgspec.MsgspecError, ValueError) as exc:
            self._refuse(store, seq, str(exc))
            return True
        try:
            self.destination.claim(header)
        except TransferError as exc:
            self._refuse(store, seq, exc.message)
            return True
        started = time.perf_counter()
        try:
            num_bytes = recv_blocks(
                process_group,
                self.kv_cache,
                header.dst_block_ids,
                plan,
                timeout_s=self.config.timeout_s,
                on_posted=lambda: self._ready(store, seq),
            )
        except TransferError as exc:
            logger.warning(
                "KV transfer of %s on pair %s failed: %s", header.request_id, store.pair_id, exc
            )
            with self._lock:
                self.stats.num_failed += 1
            self.destination.failed(header, exc)
            with contextlib.suppress(TransferError):  # else the sender's own timeout tells it
                store.put_ack(seq, encode_message(TransferAck(ok=False, reason=exc.message)))
            return False
        except BaseException as exc:
            self.destination.failed(header, TransferError(f"receiver failed: {exc!r}"))
            raise
        with self._lock:
            self.stats.num_transfers += 1
            self.stats.num_bytes += num_bytes
            self.stats.seconds += time.perf_counter() - started
        self.destination.landed(header)
        store.put_ack(seq, encode_message(TransferAck(ok=True)))
        return True

    @staticmethod
    def _refuse(store: PairStore, seq: int, reason: str) -> None:
        store.put_reply(seq, encode_message(TransferReply(ready=False, reason=reason)))
        store.forget(seq)

    @staticmethod
    def _ready(store: PairStore, seq: int) -> None:
        store.put_reply(seq, encode_message(TransferReply(ready=True)))
        store.forget(seq)  # while the blocks travel

    def _check_header(self, header: TransferHeader, seq: int) -> None:
        layout = self.layout
        expected_shape = (layout.block_size, layout.num_kv_heads, layout.head_dim)
        if header.seq != seq:
            raise ValueError(f"header for transfer {header.seq} in slot {seq}")
        if tuple(header.block_shape) != expected_shape or header.dtype != layout.dtype:
            raise ValueError(
                f"blocks of {tuple(header.block_shape)} {header.dtype}, expected "
                f"{expected_shape} {layout.dtype}"
            )
        if header.num_layers != layout.num_layers:
            raise ValueError(f"{header.num_layers} layers, expected {layout.num_layers}")
        num_blocks = self.kv_cache.shape[2]
        if any(not 0 <= block_id < num_blocks for block_id in header.dst_block_ids):
            raise ValueError(f"destination block ids must be in [0, {num_blocks})")
        if -(-header.num_tokens // layout.block_size) != len(header.dst_block_ids):
            raise ValueError(
                f"{header.num_tokens} tokens do not fill {len(header.dst_block_ids)} blocks"
            )
