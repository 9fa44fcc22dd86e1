"""One KV pair: a 2-rank process group between a prefill worker (rank 0, sends) and a decode
worker (rank 1, receives), plus the small values they exchange through the decode worker's
``TCPStore``.

There is no global world. The decode worker hosts a ``TCPStore`` on its ``kv_port``; each pair
lives under its own ``PrefixStore`` namespace ``fairgate/pair/<pair_id>/`` (a fresh id every time a
prefill worker pairs, so a restarted worker never meets its predecessor's keys) and builds a
``ProcessGroupGloo`` (KV in host memory) or ``ProcessGroupNCCL`` (KV on CUDA) over it directly.

Per transfer ``seq`` on a pair, the keys under the namespace are::

    h/<seq>   TransferHeader   sender → receiver   (or CLOSED: the pair is finished)
    r/<seq>   TransferReply    receiver → sender   ready (receives posted) or refused
    a/<seq>   TransferAck      receiver → sender   landed, or why not

(the receiver deletes them once the sender has read them: when header ``seq + 1`` arrives).

Transfers on a pair are strictly ordered: the receiver reads header ``seq + 1`` only after
``seq`` has landed or failed. Either side ends a pair by writing CLOSED into the next header slot
with ``compare_set``, which atomically loses to a header that got there first; the other side
sees it at its next transfer and pairs anew. After any error on the process group the pair is
ended: a gloo or NCCL timeout leaves its communicator unusable.

Every wait here has a timeout; errors become ``TransferError`` / ``TransferTimeout``.
"""

from __future__ import annotations

import collections
import datetime
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from transfer.errors import TransferError, TransferTimeout
from transfer.failpoints import failpoint
from transfer.kv_layout import KvMessage, TransferPlan

__all__ = [
    "CLOSED",
    "HELLO_COUNTER",
    "PairStore",
    "PrefixStore",
    "Store",
    "TCPStore",
    "connect_store",
    "create_process_group",
    "hello_key",
    "recv_blocks",
    "send_blocks",
    "shutdown_process_group",
    "translate_dist_error",
]

# torch.distributed's stubs neither export the store classes nor admit the bytes values the stores
# take: the data plane handles stores as Any.
TCPStore: Any = dist.TCPStore  # type: ignore[attr-defined]
PrefixStore: Any = dist.PrefixStore  # type: ignore[attr-defined]
Store = Any

CLOSED = b"\x00fairgate:closed"
HELLO_COUNTER = "fairgate/hello/next"  # pair requests take numbered slots from this counter
STAGING_SLOTS = 8  # staging buffers per side for the staged (rest) messages of a transfer
RECV_WINDOW = 256  # receives posted ahead of the one being waited for


def translate_dist_error(exc: BaseException, what: str) -> TransferError:
    """Our error for a failure of ``torch.distributed`` (store or process group) during ``what``."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        return TransferTimeout(f"{what}: timed out ({text})")
    return TransferError(f"{what}: {text}")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def hello_key(slot: int) -> str:
    """Where pair request number ``slot`` goes; the answer goes to that key + ``/reply``."""
    return f"fairgate/hello/{slot}"


def connect_store(host: str, port: int, timeout_s: float) -> Store:
    """A client connection to a decode worker's store. One per thread that blocks in ``wait``:
    a ``TCPStore`` client runs one operation at a time."""
    try:
        return TCPStore(host, port, None, False, _timedelta(timeout_s), wait_for_workers=False)
    except dist.DistError as exc:
        raise translate_dist_error(exc, f"connecting to the KV store at {host}:{port}") from exc


class PairStore:
    """The keys of one pair in the decode worker's store (see the module docstring).

    Every read blocks until its key is set, up to the connection's timeout (``connect_store``),
    and costs one round trip. The receiver clears a transfer's keys when the next header comes
    (``forget``), off the sender's critical path."""

    def __init__(self, store: Store, pair_id: str) -> None:
        self.pair_id = pair_id
        self.root = PrefixStore(f"fairgate/pair/{pair_id}", store)
        self.process_group_store = PrefixStore("pg", self.root)

    def post_header(self, seq: int, header: bytes) -> bool:
        """Publish a header; False when the pair was closed first (nothing was published)."""
        try:
            current = self.root.compare_set(f"h/{seq}", b"", header)
        except dist.DistError as exc:
            raise translate_dist_error(exc, "posting a transfer header") from exc
        return bytes(current) == header

    def close(self, seq: int) -> bytes | None:
        """End the pair at header slot ``seq``. Returns the header that got there first, if one
        did (the caller still owes it an answer), else None."""
        try:
            current = bytes(self.root.compare_set(f"h/{seq}", b"", CLOSED))
        except dist.DistError:
            return None  # the store is gone: so is the pair
        return None if current == CLOSED else current

    def wait_header(self, seq: int, timeout_s: float) -> bytes:
        """The header (or CLOSED) in slot ``seq``; ``TransferTimeout`` when none came in time."""
        key = f"h/{seq}"
        try:
            self.root.wait([key], _timedelta(timeout_s))
        except dist.DistError as exc:
            raise translate_dist_error(exc, "waiting for a transfer header") from exc
        return self._get(key, "reading a transfer header")

    def forget(self, seq: int) -> None:
        """Clear transfer ``seq``'s header and the previous transfer's reply and ack (read by
        the sender before it posted this header)."""
        try:
            for key in (f"h/{seq}", f"r/{seq - 1}", f"a/{seq - 1}"):
                self.root.delete_key(key)
        except dist.DistError as exc:
            raise translate_dist_error(exc, "clearing transfer keys") from exc

    def put_reply(self, seq: int, reply: bytes) -> None:
        self._set(f"r/{seq}", reply, "answering a transfer header")

    def read_reply(self, seq: int) -> bytes:
        return self._get(f"r/{seq}", "waiting for the receiver to get ready")

    def put_ack(self, seq: int, ack: bytes) -> None:
        self._set(f"a/{seq}", ack, "acknowledging a transfer")

    def read_ack(self, seq: int) -> bytes:
        return self._get(f"a/{seq}", "waiting for the receiver to land the blocks")

    def _set(self, key: str, value: bytes, what: str) -> None:
        try:
            self.root.set(key, value)
        except dist.DistError as exc:
            raise translate_dist_error(exc, what) from exc

    def _get(self, key: str, what: str) -> bytes:
        try:
            return bytes(self.root.get(key))
        except dist.DistError as exc:
            raise translate_dist_error(exc, what) from exc


def create_process_group(
    store: Store, *, rank: int, backend: str, host: str, timeout_s: float
) -> Any:
    """A 2-rank process group over ``store``; blocks until the peer joins or ``timeout_s``.

    ``host`` is the address this end's gloo connections bind to and advertise. NCCL needs the
    calling thread's current CUDA device set to the KV's device."""
    timeout = _timedelta(timeout_s)
    try:
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            options._timeout = timeout
            return dist.ProcessGroupGloo(store, rank, 2, options)
        if backend == "nccl":
            nccl = getattr(dist, "ProcessGroupNCCL", None)
            if nccl is None:
                raise TransferError("this build of torch has no NCCL; KV on CUDA cannot move")
            nccl_options = nccl.Options()
            nccl_options._timeout = timeout
            return nccl(store, rank, 2, nccl_options)
    except dist.DistError as exc:
        raise translate_dist_error(exc, f"creating the {backend} process group") from exc
    except RuntimeError as exc:
        raise translate_dist_error(exc, f"creating the {backend} process group") from exc
    raise TransferError(f"unknown KV backend {backend!r}")


def shutdown_process_group(process_group: Any) -> None:
    """Release a pair's communicator; a broken one may refuse, which changes nothing for us."""
    try:
        if hasattr(process_group, "abort"):
            process_group.abort()
        else:
            process_group.shutdown()
    except RuntimeError:
        pass


def _wait(work: Any, timeout_s: float, what: str) -> None:
    try:
        work.wait(_timedelta(timeout_s))
    except RuntimeError as exc:
        raise translate_dist_error(exc, what) from exc


class _Staging:
    """``STAGING_SLOTS`` buffers, made on first use: [count, block_size, kvh, hd]."""

    def __init__(self, kv_cache: torch.Tensor, num_blocks: int) -> None:
        self._shape = (num_blocks, *kv_cache.shape[3:])
        self._like = kv_cache
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, slot: int) -> torch.Tensor:
        buffer = self._buffers.get(slot)
        if buffer is None:
            buffer = self._like.new_empty(self._shape)
            self._buffers[slot] = buffer
        return buffer


def _direct_view(
    kv_cache: torch.Tensor, block_ids: Sequence[int], message: KvMessage
) -> torch.Tensor:
    first = block_ids[message.start]
    return kv_cache[message.kv, message.layer, first : first + message.count]


def send_blocks(
    process_group: Any,
    kv_cache: torch.Tensor,
    src_block_ids: Sequence[int],
    plan: TransferPlan,
    *,
    timeout_s: float,
) -> int:
    """Send the plan's messages to rank 1, in order; returns bytes sent. Direct messages are all
    in flight at once (they need no memory); staged ones take turns in ``STAGING_SLOTS``
    buffers, each gathered again only after its previous send completed."""
    num_layers = kv_cache.shape[1]
    staging = _Staging(kv_cache, len(plan.rest))
    rest_ids = torch.tensor(
        [src_block_ids[i] for i in plan.rest], dtype=torch.int64, device=kv_cache.device
    )
    direct_works: list[Any] = []
    staged_works: collections.deque[Any] = collections.deque()
    num_staged = 0
    num_bytes = 0
    for message in plan.messages(num_layers):
        if message.is_rest:
            if len(staged_works) == STAGING_SLOTS:
                _wait(staged_works.popleft(), timeout_s, "sending KV blocks")
            tensor = staging.get(num_staged % STAGING_SLOTS)
            torch.index_select(kv_cache[message.kv, message.layer], 0, rest_ids, out=tensor)
            num_staged += 1
        else:
            tensor = _direct_view(kv_cache, src_block_ids, message)
        num_bytes += tensor.numel() * tensor.element_size()
        try:
            work = process_group.send([tensor], 1, message.index + 1)
        except RuntimeError as exc:
            raise translate_dist_error(exc, "sending KV blocks") from exc
        (staged_works if message.is_rest else direct_works).append(work)
        if message.index == 0:
            failpoint("kv.send.mid_transfer")
    for work in [*direct_works, *staged_works]:
        _wait(work, timeout_s, "sending KV blocks")
    return num_bytes


def recv_blocks(
    process_group: Any,
    kv_cache: torch.Tensor,
    dst_block_ids: Sequence[int],
    plan: TransferPlan,
    *,
    timeout_s: float,
    on_posted: Callable[[], None],
) -> int:
    """Receive the plan's messages from rank 0 into the cache; returns bytes received.

    Receives are posted in message order (NCCL matches sends and receives by order, not by tag),
    up to ``RECV_WINDOW`` ahead of the one being waited for and stopping at a staged message
    whose buffer is still in use; ``on_posted`` runs once the first are posted (it tells the
    sender to go). A staging buffer is scattered before the receive that reuses it is posted;
    on CUDA the process group orders that receive after the scatter on the stream."""
    messages = list(plan.messages(kv_cache.shape[1]))
    staging = _Staging(kv_cache, len(plan.rest))
    rest_ids = torch.tensor(
        [dst_block_ids[i] for i in plan.rest], dtype=torch.int64, device=kv_cache.device
    )
    pending: collections.deque[tuple[Any, torch.Tensor]] = collections.deque()
    num_posted = num_staged_posted = num_staged_done = 0

    def post_more(num_done: int) -> None:
        nonlocal num_posted, num_staged_posted
        while num_posted < len(messages) and num_posted < num_done + RECV_WINDOW:
            message = messages[num_posted]
            if message.is_rest:
                if num_staged_posted - num_staged_done == STAGING_SLOTS:
                    return
                tensor = staging.get(num_staged_posted % STAGING_SLOTS)
                num_staged_posted += 1
            else:
                tensor = _direct_view(kv_cache, dst_block_ids, message)
            try:
                work = process_group.recv([tensor], 0, message.index + 1)
            except RuntimeError as exc:
                raise translate_dist_error(exc, "receiving KV blocks") from exc
            pending.append((work, tensor))
            num_posted += 1

    post_more(0)
    on_posted()
    num_bytes = 0
    for num_done, message in enumerate(messages, start=1):
        work, tensor = pending.popleft()
        _wait(work, timeout_s, "receiving KV blocks")
        num_bytes += tensor.numel() * tensor.element_size()
        if message.is_rest:
            kv_cache[message.kv, message.layer].index_copy_(0, rest_ids, tensor)
            num_staged_done += 1
        if message.index == 0:
            failpoint("kv.recv.mid_transfer")
        post_more(num_done)
    if kv_cache.device.type == "cuda":
        torch.cuda.current_stream(kv_cache.device).synchronize()  # landed means visible
    return num_bytes
