"""The prefill worker's end of the KV data plane: ships a request's blocks to a decode worker.

One *link* per decode worker endpoint (``kv_host:kv_port``): a thread with a queue of transfer
jobs and, once needed, a pair (store connection + process group, rank 0). Jobs on a link run one
after another (transfers on a pair are ordered); links run side by side. A link idle for
``idle_timeout_s`` ends its pair and its thread.

A transfer: post the header (if the receiver closed the pair, pair anew and post again) → wait
until the receiver has claimed the blocks and posted its receives → send → wait for its ack.
Every wait has ``timeout_s``. A failure is reported to the job's ``on_done`` as a
``TransferError``; one that leaves the process group in doubt also ends the pair, so the next job
pairs anew (a restarted decode worker is met again this way).
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from transfer.errors import IncompatiblePeer, TransferError
from transfer.kv_layout import DEFAULT_MIN_DIRECT_BLOCKS, plan_transfer
from transfer.kv_pair import (
    HELLO_COUNTER,
    PairStore,
    connect_store,
    create_process_group,
    hello_key,
    send_blocks,
    shutdown_process_group,
    translate_dist_error,
)
from transfer.messages import (
    PROTOCOL_VERSION,
    KvHello,
    KvHelloReply,
    KvLayoutInfo,
    KvTarget,
    TransferAck,
    TransferHeader,
    TransferReply,
    decode_message,
    encode_message,
)

__all__ = ["KvSender", "SenderConfig", "TransferJob", "TransferResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SenderConfig:
    host: str = "127.0.0.1"  # the address this worker's gloo connections bind to
    timeout_s: float = 30.0  # every wait of a pairing or a transfer
    idle_timeout_s: float = 600.0
    min_direct_blocks: int = DEFAULT_MIN_DIRECT_BLOCKS


@dataclass(frozen=True, slots=True)
class TransferJob:
    """Ship the KV of ``num_tokens`` prompt tokens held in ``src_block_ids`` to ``target``."""

    request_id: str
    target: KvTarget
    src_block_ids: list[int]
    num_tokens: int
    first_token_id: int
    seed: int
    num_cached_tokens: int


@dataclass(frozen=True, slots=True)
class TransferResult:
    request_id: str
    error: TransferError | None
    num_bytes: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class _Pair:
    pair_id: str
    store: PairStore
    process_group: Any
    next_seq: int = 0


_LinkItem = tuple[TransferJob, Callable[[TransferResult], None]] | Future[None] | None


@dataclass(slots=True)
class _Link:
    host: str
    port: int
    jobs: queue.SimpleQueue[_LinkItem]  # transfers, connects, None to stop
    worker_id: str  # the decode worker's, for messages
    thread: threading.Thread | None = None
    pair: _Pair | None = None


class KvSender:
    """See the module docstring. ``submit`` is thread-safe; ``on_done`` runs on a link thread."""

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KvLayoutInfo,
        sender_id: str,
        config: SenderConfig | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.layout = layout
        self.sender_id = sender_id
        self.config = config or SenderConfig()
        self._lock = threading.Lock()
        self._links: dict[tuple[str, int], _Link] = {}
        self._stopping = False

    def submit(self, job: TransferJob, on_done: Callable[[TransferResult], None]) -> None:
        self._enqueue(job.target, (job, on_done))

    def connect(self, target: KvTarget) -> Future[None]:
        """Pair with ``target`` ahead of its first transfer, so that a peer that refuses (an
        incompatible layout) or cannot be reached fails the request before its first token goes
        out. Done at once when the pair exists; otherwise queued on the link."""
        future: Future[None] = Future()
        self._enqueue(target, future)
        return future

    def _enqueue(self, target: KvTarget, item: _LinkItem) -> None:
        """Queue ``item`` on the link to ``target``, starting one if needed. Under the lock, so
        that a link ending itself for idleness never leaves an item behind."""
        key = (target.kv_host, target.kv_port)
        with self._lock:
            if self._stopping:
                raise TransferError("the KV sender is stopping")
            link = self._links.get(key)
            if link is None:
                link = _Link(key[0], key[1], queue.SimpleQueue(), target.worker_id)
                link.thread = threading.Thread(
                    target=self._link_main,
                    args=(link,),
                    name=f"kv-link-{key[0]}:{key[1]}",
                    daemon=True,
                )
                self._links[key] = link
                link.thread.start()
            if isinstance(item, Future) and link.pair is not None:
                item.set_result(None)
            else:
                link.jobs.put(item)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            links = list(self._links.values())
        for link in links:
            link.jobs.put(None)
        deadline = time.monotonic() + timeout_s
        for link in links:
            if link.thread is not None:
                link.thread.join(max(0.0, deadline - time.monotonic()))

    # ---- a link -----------------------------------------------------------------------------

    def _link_main(self, link: _Link) -> None:
        if self.layout.backend == "nccl":
            torch.cuda.set_device(self.kv_cache.device)
        try:
            while True:
                try:
                    item = link.jobs.get(timeout=self.config.idle_timeout_s)
                except queue.Empty:
                    with self._lock:
                        if link.jobs.empty():  # nothing was submitted while we timed out
                            self._links.pop((link.host, link.port), None)
                            return
                    continue
                if item is None:
                    return
                if isinstance(item, Future):
                    self._connect(link, item)
                    continue
                job, on_done = item
                on_done(self._run_job(link, job))
        finally:
            self._end_pair(link)

    def _run_job(self, link: _Link, job: TransferJob) -> TransferResult:
        started = time.perf_counter()
        try:
            num_bytes = self._transfer(link, job)
        except TransferError as exc:
            logger.warning(
                "KV transfer of %s to %s failed: %s", job.request_id, job.target.worker_id, exc
            )
            return TransferResult(job.request_id, exc, seconds=time.perf_counter() - started)
        except Exception as exc:  # a bug: fail this job loudly, keep the link serving
            logger.exception("KV transfer of %s crashed", job.request_id)
            self._end_pair(link)
            error = TransferError(f"KV transfer crashed: {exc!r}")
            return TransferResult(job.request_id, error, seconds=time.perf_counter() - started)
        return TransferResult(job.request_id, None, num_bytes, time.perf_counter() - started)

    def _connect(self, link: _Link, future: Future[None]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            if link.pair is None:
                self._open_pair(link)
        except TransferError as exc:
            future.set_exception(exc)
        else:
            future.set_result(None)

    def _transfer(self, link: _Link, job: TransferJob) -> int:
        if len(job.src_block_ids) != len(job.target.block_ids):
            raise TransferError(
                f"{len(job.src_block_ids)} blocks of KV for {len(job.target.block_ids)} "
                "reserved blocks"
            )
        plan = plan_transfer(
            job.src_block_ids, job.target.block_ids, min_direct_blocks=self.config.min_direct_blocks
        )
        for _attempt in range(2):
            pair = link.pair or self._open_pair(link)
            seq = pair.next_seq
            header = TransferHeader(
                request_id=job.request_id,
                seq=seq,
                num_tokens=job.num_tokens,
                first_token_id=job.first_token_id,
                seed=job.seed,
                num_cached_tokens=job.num_cached_tokens,
                dst_block_ids=list(job.target.block_ids),
                direct_runs=list(plan.direct_runs),
                block_shape=(
                    self.layout.block_size,
                    self.layout.num_kv_heads,
                    self.layout.head_dim,
                ),
                dtype=self.layout.dtype,
                num_layers=self.layout.num_layers,
            )
            # Until the header is posted the receiver knows nothing of this job: a pair it
            # closed, or a store that is gone (the decode worker restarted), means pair anew.
            try:
                is_posted = pair.store.post_header(seq, encode_message(header))
            except TransferError as exc:
                logger.info("KV pair %s is gone (%s): pairing anew", pair.pair_id, exc)
                is_posted = False
            if not is_posted:
                self._end_pair(link)
                continue
            try:
                pair.next_seq = seq + 1
                reply = decode_message(pair.store.read_reply(seq), TransferReply)
                if reply.ready:
                    num_bytes = send_blocks(
                        pair.process_group,
                        self.kv_cache,
                        job.src_block_ids,
                        plan,
                        timeout_s=self.config.timeout_s,
                    )
                    ack = decode_message(pair.store.read_ack(seq), TransferAck)
            except TransferError:
                self._end_pair(link)
                raise
            if not reply.ready:  # refused before any bytes moved: the pair stays good
                raise TransferError(
                    f"decode worker {job.target.worker_id} refused the KV of "
                    f"{job.request_id}: {reply.reason}"
                )
            if not ack.ok:
                self._end_pair(link)
                raise TransferError(
                    f"decode worker {job.target.worker_id} failed to land the KV of "
                    f"{job.request_id}: {ack.reason}"
                )
            return num_bytes
        raise TransferError(f"decode worker {job.target.worker_id} keeps closing the KV pair")

    def _open_pair(self, link: _Link) -> _Pair:
        """Pair with the link's peer. When that fails, what is queued behind fails at once
        (``_fail_queued``)."""
        try:
            return self._pair_with(link)
        except TransferError as exc:
            self._fail_queued(link, exc)
            raise

    def _fail_queued(self, link: _Link, cause: TransferError) -> None:
        """Fail every item queued on ``link`` now, with ``cause``'s kind of error. Each would
        otherwise wait out a pairing of its own, one after another: connecting to the store of
        a decode worker that died retries for about 2.5 timeouts (75 s at 30 s), while the
        request's KV stays held on this worker and its prefill call waits. What is queued after
        this snapshot tries afresh: the peer may be back."""
        items: list[_LinkItem] = []
        while True:
            try:
                items.append(link.jobs.get_nowait())
            except queue.Empty:
                break
        if None in items:
            link.jobs.put(None)  # the stop request stands
        failed: list[str] = []
        for item in items:
            if item is None:
                continue
            error = type(cause)(f"{cause} (failed at once: a pairing just failed)")
            error.__cause__ = cause
            try:
                if isinstance(item, Future):
                    if item.set_running_or_notify_cancel():
                        item.set_exception(error)
                        failed.append("(a pairing)")
                else:
                    job, on_done = item
                    failed.append(job.request_id)
                    on_done(TransferResult(job.request_id, error))
            except Exception:  # a callback's bug: the others still fail at once
                logger.exception("failing a queued hand-off on the link to %s", link.worker_id)
        if failed:
            logger.warning(
                "KV link to %s: failed at once after a failed pairing: %s",
                link.worker_id,
                ", ".join(failed),
            )

    def _pair_with(self, link: _Link) -> _Pair:
        timeout_s = self.config.timeout_s
        store = connect_store(link.host, link.port, timeout_s)
        pair_id = f"{self.sender_id}-{uuid.uuid4().hex[:12]}"
        hello = KvHello(PROTOCOL_VERSION, pair_id, self.sender_id, self.layout)
        try:
            slot = int(store.add(HELLO_COUNTER, 1)) - 1
            store.set(hello_key(slot), encode_message(hello))
            reply_key = hello_key(slot) + "/reply"
            store.wait([reply_key], datetime.timedelta(seconds=timeout_s))
            reply = decode_message(bytes(store.get(reply_key)), KvHelloReply)
            store.delete_key(reply_key)
        except dist.DistError as exc:
            raise translate_dist_error(exc, f"pairing with {link.worker_id}") from exc
        if not reply.accepted:
            error_type = IncompatiblePeer if reply.incompatible else TransferError
            raise error_type(f"decode worker {link.worker_id} refused to pair: {reply.reason}")
        pair_store = PairStore(store, pair_id)
        process_group = create_process_group(
            pair_store.process_group_store,
            rank=0,
            backend=self.layout.backend,
            host=self.config.host,
            timeout_s=timeout_s,
        )
        link.pair = _Pair(pair_id, pair_store, process_group)
        logger.info("KV pair %s with %s ready", pair_id, link.worker_id)
        return link.pair

    def _end_pair(self, link: _Link) -> None:
        pair, link.pair = link.pair, None
        if pair is None:
            return
        pair.store.close(pair.next_seq)  # tells the receiver, unless it is gone already
        shutdown_process_group(pair.process_group)
