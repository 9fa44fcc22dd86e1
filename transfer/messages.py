"""Every message that crosses a process boundary, as ``msgspec.Struct``s. Torch-free.

Control plane (HTTP, msgpack bodies; the caller is the gateway, or ``fairgate generate
--disaggregated`` until the gateway exists)::

    caller ──PrefillRequest──▶ prefill worker   POST /v1/prefill   ◀──PrefillResult──
    caller ──PrefillTarget───▶ prefill worker   POST /v1/prefill/target ◀──PrefillTargetResult
    caller ──DecodeRequest───▶ decode worker    POST /v1/decode    ◀──frame stream───
    caller ──GenerateRequest─▶ colocated worker POST /v1/generate  ◀──frame stream───
    caller ──────────────────▶ any worker       GET /v1/load       ◀──WorkerLoad─────
    caller ──────────────────▶ any worker       GET /v1/info       ◀──WorkerInfo─────
    caller ──────────────────▶ any worker       GET /v1/tokenizer  ◀──TokenizerSpec──
    caller ──AbortRequest────▶ any worker       POST /v1/abort     ◀──AbortResult────
    caller ──MakeRoomRequest▶ decode/colocated POST /v1/make_room ◀──MakeRoomResult─

A frame stream is a sequence of length-prefixed msgpack ``Frame``s (``encode_frame`` /
``FrameDecoder``): ``Reserved`` first on ``/v1/decode``, then ``TokenFrame``s, the last one with a
finish reason; or, when the worker preempted the request by recompute, its tokens so far in
``TokenFrame``s and then ``Preempted`` as the last frame (the caller resumes it elsewhere); or an
``ErrorBody``-carrying ``ErrorFrame`` as the last frame when the request fails after the stream
began.

The hand-off (``transfer.client.run_disaggregated``): the caller sends ``PrefillRequest`` (with
``target_follows``) and ``DecodeRequest`` at once, so the prefill never waits for the decode
worker's reservation. When ``Reserved`` comes it sends the blocks on as a ``PrefillTarget``; the
prefill worker ships the KV when it has both the first token and the target, holding the KV (up
to its ``kv_timeout_s``) for a target that has not come yet. No room on the decode worker: a
``PrefillTarget`` without a target drops the KV (its full blocks stay in the prefix cache), and
the request, its first token out, goes back to the caller's queue as a ``Preempted`` with
``error`` set.

Priorities and preemption: every request carries its ``Priority`` (SLO class rank, tenant
counter, gateway arrival). Prefill picks the most important ready prompt chunk at every step;
decode preempts the least important request when KV blocks run short or ``make_room`` asks. A
request resumed after a recompute preemption is sent again with its output so far appended to
its prompt and ``num_prior_output_tokens`` saying how many of the prompt's last tokens those are,
and with ``Preempted.seed`` as its sampling seed: it continues token for token as if it had
never stopped.

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

import hashlib
import struct
from typing import Literal, TypeVar

import msgspec

from engine.sequence import Priority as EnginePriority
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
    "MakeRoomRequest",
    "MakeRoomResult",
    "Preempted",
    "PrefillRequest",
    "PrefillResult",
    "PrefillTarget",
    "PrefillTargetResult",
    "Priority",
    "Reserved",
    "SamplingSpec",
    "TokenFrame",
    "TokenizerSpec",
    "TransferAck",
    "TransferHeader",
    "TransferReply",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerRole",
    "decode_message",
    "encode_frame",
    "encode_message",
    "tokenizer_digest",
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


class Priority(msgspec.Struct, frozen=True):
    """How important a request is (gateway → workers, on every request). ``rank``: its SLO
    class's rank, higher is more important; ``counter``: its tenant's fair-share counter at
    dispatch, higher is less important; ``arrival``: the gateway's arrival time of the request,
    the same over its whole life (resumptions included), later is less important. Compared in
    that order. Prefill runs the most important ready chunk first; decode preempts the least
    important request first."""

    rank: int = 0
    counter: float = 0.0
    arrival: float = 0.0

    def to_priority(self) -> EnginePriority:
        return EnginePriority(self.rank, self.counter, self.arrival)


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
    ends the request). ``cache_salt`` scopes the prefix cache (the tenant; chosen by the server).

    ``num_prior_output_tokens``: the last k tokens of ``prompt_token_ids`` are the request's own
    output from before a recompute preemption; sampling continues at output position k,
    ``max_tokens`` counts them, and ``PrefillResult.num_prompt_tokens`` is the prompt without
    them. ``target`` then holds blocks for the whole of ``prompt_token_ids`` plus one.

    ``target_follows`` (with ``target`` None): the target comes later, in a ``PrefillTarget``
    (before or after the first token); the KV is held for it, at most the worker's
    ``kv_timeout_s`` after the first token, and released when none comes."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()
    cache_salt: bytes = b""
    target: KvTarget | None = None
    priority: Priority = Priority()
    num_prior_output_tokens: int = 0
    target_follows: bool = False


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
    num_prefill_chunks: int = 0  # prefill runs it took (traces)


class PrefillTarget(msgspec.Struct, frozen=True):
    """Caller → prefill worker (``POST /v1/prefill/target``), for a request sent with
    ``PrefillRequest.target_follows``: ship its KV to ``target`` (the decode worker's
    ``Reserved`` blocks), or, with ``target`` None, drop it (the decode worker had no room; the
    prompt's full blocks stay in the prefix cache). It may arrive before the ``PrefillRequest``
    itself (two calls race); it waits for it up to the worker's ``kv_timeout_s``.

    Answered with ``PrefillTargetResult`` once the KV has landed, been dropped, or turned out to
    need no shipping; or with the error that ended the request: a failed transfer
    (``TransferError``), a prefill that failed or was aborted, a hand-off whose other half never
    came (``TransferTimeout``)."""

    request_id: str
    target: KvTarget | None = None


class PrefillTargetResult(msgspec.Struct, frozen=True):
    """Prefill worker → caller: how the hand-off of a ``PrefillTarget``'s request ended.
    ``shipped``: its KV landed in the target; ``dropped``: released as asked; ``finished``: its
    first token ended the request, so there was nothing to ship."""

    request_id: str
    outcome: Literal["shipped", "dropped", "finished"]


class DecodeRequest(msgspec.Struct, frozen=True):
    """Caller → decode worker: reserve KV blocks for the prompt and stream the request's tokens
    once its KV arrives from a prefill worker. Answered by a frame stream that begins with
    ``Reserved``, or by a 503 ``no_room`` error when there is no room (room a swapped-out request
    at least as important waits for counts as taken).
    ``num_prior_output_tokens`` as in ``PrefillRequest`` (the same value goes to both)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()
    cache_salt: bytes = b""
    # The worker may hold tokens back this long to send them in one frame (a caller that does
    # not stream them on: fewer frames, less CPU on both ends). 0 sends each step's at once.
    flush_interval_s: float = 0.0
    priority: Priority = Priority()
    num_prior_output_tokens: int = 0


class GenerateRequest(msgspec.Struct, frozen=True):
    """Caller → colocated worker: prefill and decode in one engine, no transfer; a frame stream of
    tokens (the first token included). ``num_prior_output_tokens`` as in ``PrefillRequest``."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec = SamplingSpec()
    cache_salt: bytes = b""
    flush_interval_s: float = 0.0  # as in ``DecodeRequest``
    priority: Priority = Priority()
    num_prior_output_tokens: int = 0


class Reserved(msgspec.Struct, frozen=True, tag="reserved"):
    """First frame of ``/v1/decode``: the blocks are reserved; hand them to the prefill worker."""

    worker_id: str
    kv_host: str
    kv_port: int
    block_ids: list[int]


class TokenFrame(msgspec.Struct, frozen=True, tag="tokens"):
    """New tokens of a request, with its running usage; the last one carries the finish reason.
    Of a resumed request, ``num_prompt_tokens`` is the original prompt's and
    ``num_output_tokens`` counts its earlier output too; ``num_cached_tokens`` counts the
    resubmitted tokens (prompt and earlier output) the prefix cache served."""

    token_ids: list[int]
    finish_reason: FinishReasonWire | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0


class ErrorFrame(msgspec.Struct, frozen=True, tag="error"):
    """The last frame of a stream that failed after it began."""

    error: ErrorBody


class Preempted(msgspec.Struct, frozen=True, tag="preempted"):
    """Decode or colocated worker → caller, the last frame of a request preempted by recompute:
    its blocks are already free, and every token it sampled went out in ``TokenFrame``s before
    this. Resume it with ``prompt + output so far``, ``num_prior_output_tokens =
    num_output_tokens`` and ``seed`` as the sampling seed.

    ``num_output_tokens`` counts every output token of the request so far, earlier ones (from
    before a previous preemption) included. On ``/v1/decode`` a request preempted before its KV
    landed has not seen its first token, which the prefill worker answered with: then this counts
    the earlier ones only and ``seed`` is the request's ``sampling.seed`` (0 if it had none);
    ``run_disaggregated`` corrects both from the ``PrefillResult``."""

    num_output_tokens: int
    seed: int
    # Never set by a worker, and no longer by the caller's client either (``run_disaggregated``
    # raises the hand-off's error instead); kept because fields are only ever appended.
    error: ErrorBody | None = None


Frame = Reserved | TokenFrame | ErrorFrame | Preempted


class MakeRoomRequest(msgspec.Struct, frozen=True):
    """Caller → decode or colocated worker (``POST /v1/make_room``): preempt requests strictly
    less important than ``priority``, least important first (running ones, and reservations
    whose KV has not landed), until ``num_tokens`` KV token slots are free or no such request is
    left. The room is then held for a few seconds (or until a request at least as important as
    ``priority`` arrives): less important requests already on the worker (swapped out, or queued
    on a colocated worker) do not take it back meanwhile. Requests sent after this call are the
    caller's own choice and are not held back."""

    num_tokens: int
    priority: Priority = Priority()


class MakeRoomResult(msgspec.Struct, frozen=True):
    """Decode or colocated worker → caller: KV token slots free now, and how many requests were
    preempted (by the worker's mode; blocks a transfer is still landing in are freed when it
    ends, so they are not in ``num_free_tokens`` yet)."""

    num_free_tokens: int
    num_preempted: int


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
    # decode: a pure decode step takes about decode_base_s + decode_token_s × the tokens its
    # batch holds (``engine.engine_thread.DecodeSpeed``); both 0 until measured.
    decode_base_s: float = 0.0
    decode_token_s: float = 0.0
    # Prefix-cache evictions numbered from ``?evictions_since=N`` up to ``eviction_seq`` (the next
    # number, always given); ``evictions_missed``: some before them were dropped (or the worker
    # restarted), so the caller's view of this cache is stale. Empty when the query does not ask.
    evicted_block_hashes: list[bytes] = []
    eviction_seq: int = 0
    evictions_missed: bool = False
    # Preemptions by mode since the start (``num_preemptions`` is all of them), and requests
    # whose KV waits in host memory now (swap mode; not in ``num_running``).
    num_swapped_out: int = 0
    num_handed_back: int = 0
    num_swapped: int = 0
    # Whether the engine gets on with its work, for the caller's hung-worker watch
    # (``gateway.liveness``; ``engine.engine_thread.StepProgress``): engine steps completed
    # since the start; whether the engine thread has work it can do now (a step or a command in
    # progress, or requests it can step) rather than waiting for a command (only reservations
    # whose KV has not landed, handed-off prefills waiting for a target, or requests no block
    # is free for are no such work); while it has, the seconds since it last completed a step
    # or took the work up, by the worker's own clock when it made the report (a slow report
    # does not stretch it); and the longest of its recent steps (0 before the first).
    num_steps: int = 0
    has_work: bool = False
    since_step_s: float = 0.0
    max_step_s: float = 0.0


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
    max_num_seqs: int = 0  # requests running or reserved at once (0: not said)
    # Which tokenizer turns its model's text into ids: ``tokenizer_digest`` of the worker's
    # ``GET /v1/tokenizer`` body ("": not said). Equal digests, the same tokenizer.
    tokenizer_digest: str = ""
    # The KV layout its data plane pairs with (the very struct ``KvHello`` carries), so a caller
    # can tell before any hand-off which workers could exchange KV; None: not said.
    kv_layout: KvLayoutInfo | None = None
    # The arithmetic its engine runs (``engine.precision``: on CPU measured once per host), in
    # words, for operators: shown by the admin API, not compared between workers ("": not said).
    precision: str = ""


class TokenizerSpec(msgspec.Struct, frozen=True):
    """Worker → caller (``GET /v1/tokenizer``): everything ``engine.tokenizer.Tokenizer`` is
    built from (``Tokenizer.to_spec`` / ``from_spec``), so a caller without the model's files
    rebuilds the worker's tokenizer exactly: the same ids, stop ids and chat prompts.

    ``backend_json`` is the ``tokenizers`` backend's own JSON (``tokenizers.Tokenizer.to_str``,
    about 1.5 MB for SmolLM2); the other fields are ``Tokenizer.__init__``'s arguments.
    Its digest (``tokenizer_digest``) is what ``WorkerInfo.tokenizer_digest`` announces."""

    backend_json: str
    bos_token_id: int | None
    eos_token_id: int | None
    extra_stop_token_ids: list[int]
    special_token_ids: dict[str, int | None]  # chat-template name ("bos_token") → id
    add_bos_token: bool
    chat_template: str | None


class KvLayoutInfo(msgspec.Struct, frozen=True):
    """What both ends of a KV pair must agree on before any bytes move."""

    model_id: str
    backend: str  # "gloo" or "nccl"
    dtype: str  # torch dtype name, e.g. "float32"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def differences(
        self, other: KvLayoutInfo, *, labels: tuple[str, str] = ("this", "other")
    ) -> list[str]:
        """One line per field that differs, naming it and both values (``labels`` say whose
        each is); empty: the two can pair. The one rule for the handshake
        (``transfer.kv_layout.layout_mismatches``) and for a caller comparing workers."""
        mine, theirs = labels
        return [
            f"{field} {ours!r} ({mine}) != {other_value!r} ({theirs})"
            for field in self.__struct_fields__
            if (ours := getattr(self, field)) != (other_value := getattr(other, field))
        ]


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


def tokenizer_digest(encoded_spec: bytes) -> str:
    """``WorkerInfo.tokenizer_digest``: the SHA-256 (hex) of a ``TokenizerSpec`` as
    ``encode_message`` writes it. Encoding is deterministic, so a caller that decoded a spec gets
    the same digest from ``encode_message`` of it."""
    return hashlib.sha256(encoded_spec).hexdigest()


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
