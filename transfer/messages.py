"""Every message that crosses a process boundary, as ``msgspec.Struct``s. Torch-free.

Control plane (HTTP, msgpack bodies; the caller is the gateway, or ``fairgate generate
--disaggregated`` until the gateway exists)::

    caller ──PrefillRequest──▶ prefill worker   POST /v1/prefill   ◀──PrefillResult──
    caller ──DecodeRequest───▶ decode worker    POST /v1/decode    ◀──frame stream───
    caller ──GenerateRequest─▶ colocated worker POST /v1/generate  ◀──frame stream───
    caller ──────────────────▶ any worker       GET /v1/load       ◀──WorkerLoad─────
    caller ──────────────────▶ any worker       GET /v1/info       ◀──WorkerInfo─────
    caller ──AbortRequest────▶ any worker       POST /v1/abort     ◀──AbortResult────

A frame stream is a sequence of length-prefixed msgpack ``Frame``s (``encode_frame`` /
``FrameDecoder``): ``Reserved`` first on ``/v1/decode``, then ``TokenFrame``s, the last one with a
finish reason, or an ``ErrorBody``-carrying ``ErrorFrame`` as the last frame when the request fails
after the stream began.

KV data plane (values in the decode worker's ``TCPStore``, beside the tensors that travel over the
pair's process group; see ``transfer.kv_pair``)::

    prefill ──KvHello──────▶ decode     pair request, with the sender's KV layout
    prefill ◀─KvHelloReply── decode     accepted, or refused with the mismatch named
    prefill ──TransferHeader▶ decode    one per request: which blocks, first token, seed
    prefill ◀─TransferReply── decode    ready to receive (recvs posted), or refused
    prefill ◀─TransferAck──── decode    the blocks landed, or why not

Rules: fields are only ever appended, each with a default; no pickle anywhere.
"""

from __future__ import annotations

import struct
from typing import Literal, TypeVar

import msgspec

from engine.sequence import SamplingParams
from transfer.errors import ErrorBody

__all__ = [
    "MSGPACK_CONTENT_TYPE",
    "PROTOCOL_VERSION",
    "STREAM_CONTENT_TYPE",
    "AbortRequest",
    "AbortResult",
    "DecodeRequest",
    "ErrorFrame",
    "Frame",
    "FrameDecoder",
    "GenerateRequest",
    "KvHello",
    "KvHelloReply",
    "KvLayoutInfo",
    "KvTarget",
    "PrefillRequest",
    "PrefillResult",
    "Reserved",
    "SamplingSpec",
    "TokenFrame",
    "TransferAck",
    "TransferHeader",
    "TransferReply",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerRole",
    "decode_message",
    "encode_frame",
    "encode_message",
]

PROTOCOL_VERSION = 1
MSGPACK_CONTENT_TYPE = "application/msgpack"
STREAM_CONTENT_TYPE = "application/x-fairgate-frames"

WorkerRole = Literal["prefill", "decode", "colocated"]
FinishReasonWire = Literal["stop", "length", "abort"]


class SamplingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sampling parameters on the wire; ``to_params`` validates them into the engine's."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False

    def to_params(self, *, seed: int | None = None) -> SamplingParams:
        """Raises ``ValueError`` on out-of-range values; ``seed`` overrides the spec's."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed if seed is None else seed,
            stop_token_ids=frozenset(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )


class KvTarget(msgspec.Struct, frozen=True):
    """Where a prefill worker ships a request's KV: the decode worker's data-plane address and the
    blocks it reserved for the request (from its ``Reserved`` frame), in sequence order."""

    worker_id: str
    kv_host: str
    kv_port: int
    block_ids: list[int]


class PrefillRequest(msgspec.Struct, frozen=True):
    """Caller → prefill worker: compute the prompt, sample the first token, answer with it at once
    and ship the KV to ``target`` (no transfer when ``target`` is None or the first token already
    ends the request). ``cache_salt`` scopes the prefix cache (the tenant; chosen by the server)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()
    cache_salt: bytes = b""
    target: KvTarget | None = None


class PrefillResult(msgspec.Struct, frozen=True):
    """Prefill worker → caller, sent as soon as the first token is sampled (before the transfer).
    ``finish_reason`` is set when that token ends the request; ``seed`` is the one the sampler used
    (chosen by the worker when the request gave none), which decoding continues with."""

    request_id: str
    first_token_id: int
    finish_reason: FinishReasonWire | None
    num_prompt_tokens: int
    num_cached_tokens: int
    seed: int
    will_transfer: bool = False


class DecodeRequest(msgspec.Struct, frozen=True):
    """Caller → decode worker: reserve KV blocks for the prompt and stream the request's tokens
    once its KV arrives from a prefill worker. Answered by a frame stream that begins with
    ``Reserved``, or by a 503 ``no_room`` error when there is no room."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()
    cache_salt: bytes = b""
    # The worker may hold tokens back this long to send them in one frame (a caller that does
    # not stream them on: fewer frames, less CPU on both ends). 0 sends each step's at once.
    flush_interval_s: float = 0.0


class GenerateRequest(msgspec.Struct, frozen=True):
    """Caller → colocated worker: prefill and decode in one engine, no transfer; a frame stream of
    tokens (the first token included)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()
    cache_salt: bytes = b""
    flush_interval_s: float = 0.0  # as in ``DecodeRequest``


class Reserved(msgspec.Struct, frozen=True, tag="reserved"):
    """First frame of ``/v1/decode``: the blocks are reserved; hand them to the prefill worker."""

    worker_id: str
    kv_host: str
    kv_port: int
    block_ids: list[int]


class TokenFrame(msgspec.Struct, frozen=True, tag="tokens"):
    """New tokens of a request, with its running usage; the last one carries the finish reason."""

    token_ids: list[int]
    finish_reason: FinishReasonWire | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


class ErrorFrame(msgspec.Struct, frozen=True, tag="error"):
    """The last frame of a stream that failed after it began."""

    error: ErrorBody


Frame = Reserved | TokenFrame | ErrorFrame


class AbortRequest(msgspec.Struct, frozen=True):
    """Caller → any worker (``POST /v1/abort``): drop the request and free its blocks."""

    request_id: str


class AbortResult(msgspec.Struct, frozen=True):
    """Any worker → caller: whether the request was still there to abort."""

    aborted: bool


class WorkerLoad(msgspec.Struct, frozen=True):
    """Worker → caller (``GET /v1/load``): what placement needs. Tokens, not requests, measure
    load: ``num_queued_tokens`` are prompt tokens admitted or waiting but not yet computed."""

    worker_id: str
    role: WorkerRole
    ready: bool
    num_waiting: int = 0
    num_running: int = 0
    num_reserved: int = 0  # decode: requests whose KV has not landed yet
    num_queued_tokens: int = 0
    num_running_tokens: int = 0  # tokens held in the KV cache by running requests
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_pending_transfers: int = 0  # prefill: handed-off requests whose KV is still being sent
    num_preemptions: int = 0
    prefill_tok_s: float = 0.0  # measured prompt throughput; 0 until measured
    # Prefix-cache evictions numbered from ``?evictions_since=N`` up to ``eviction_seq`` (the next
    # number); ``evictions_missed``: some before them were dropped (or the worker restarted), so
    # the caller's view of this cache is stale. Empty when the query does not ask.
    evicted_block_hashes: list[bytes] = []
    eviction_seq: int = 0
    evictions_missed: bool = False


class WorkerInfo(msgspec.Struct, frozen=True):
    """Worker → caller (``GET /v1/info``): identity and shape. ``instance_id`` changes on every
    start, so a caller can tell a restarted worker from the one it knew."""

    worker_id: str
    instance_id: str
    role: WorkerRole
    model_id: str
    block_size: int
    num_total_blocks: int
    max_model_len: int
    vocab_size: int
    kv_host: str = ""
    kv_port: int = 0
    protocol_version: int = PROTOCOL_VERSION


class KvLayoutInfo(msgspec.Struct, frozen=True):
    """What both ends of a KV pair must agree on before any bytes move."""

    model_id: str
    backend: str  # "gloo" or "nccl"
    dtype: str  # torch dtype name, e.g. "float32"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


class KvHello(msgspec.Struct, frozen=True):
    """Prefill → decode (data plane): ask to pair; ``pair_id`` names the new process group."""

    protocol_version: int
    pair_id: str
    sender_id: str
    layout: KvLayoutInfo


class KvHelloReply(msgspec.Struct, frozen=True):
    """Decode → prefill (data plane): accepted, or refused with ``reason`` naming the mismatch."""

    accepted: bool
    reason: str = ""
    incompatible: bool = False  # refused for a layout mismatch (not, say, for too many pairs)


class TransferHeader(msgspec.Struct, frozen=True):
    """Prefill → decode (data plane), one per request, before its tensors.

    The KV of ``num_tokens`` prompt tokens fills ``len(dst_block_ids)`` blocks. The tensors follow
    as one message per (layer, K or V, piece), layers in order, K before V: first each direct run
    in ``direct_runs`` (``(start, count)`` over indices of ``dst_block_ids``, contiguous on both
    ends, sent and received in place), then, if any index is left, one message with the rest of the
    blocks in order (gathered by the sender, scattered by the receiver). Each block is
    ``block_shape`` of ``dtype``."""

    request_id: str
    seq: int  # transfer number on this pair
    num_tokens: int
    first_token_id: int
    seed: int
    num_cached_tokens: int
    dst_block_ids: list[int]
    direct_runs: list[tuple[int, int]]
    block_shape: tuple[int, int, int]  # (block_size, num_kv_heads, head_dim)
    dtype: str
    num_layers: int


class TransferReply(msgspec.Struct, frozen=True):
    """Decode → prefill (data plane): receives posted, send now; or refused (nothing is sent)."""

    ready: bool
    reason: str = ""


class TransferAck(msgspec.Struct, frozen=True):
    """Decode → prefill (data plane): every block landed, or why not."""

    ok: bool
    reason: str = ""


_encoder = msgspec.msgpack.Encoder()
_T = TypeVar("_T")


def encode_message(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decode_message(data: bytes, message_type: type[_T]) -> _T:
    """Raises ``msgspec.ValidationError`` / ``msgspec.DecodeError`` on a malformed message."""
    return msgspec.msgpack.decode(data, type=message_type)


_LENGTH = struct.Struct(">I")
_frame_decoder = msgspec.msgpack.Decoder(Frame)
MAX_FRAME_BYTES = 64 << 20


def encode_frame(frame: Frame) -> bytes:
    payload = _encoder.encode(frame)
    return _LENGTH.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into ``Frame``s: feed chunks as they arrive, get whole frames back."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Frame]:
        self._buffer += chunk
        frames: list[Frame] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            frames.append(_frame_decoder.decode(self._buffer[_LENGTH.size : end]))
            del self._buffer[:end]
        return frames

    @property
    def has_partial_frame(self) -> bool:
        return bool(self._buffer)
