"""Every wire message survives the project's own codec, for any field values the types allow.

Covered: every ``msgspec.Struct`` in ``transfer.messages`` and ``transfer.errors`` (the list is
named here and checked against the modules, so a message added later without coverage fails
``test_every_wire_struct_is_covered``), through ``encode_message`` / ``decode_message``; frames
through ``encode_frame`` and ``FrameDecoder`` in any chunking, and over real HTTP
(``transfer.http.FrameStreamResponse`` → ``transfer.client.FrameStream``); every error class
through ``ErrorBody`` and ``error_from_body``; and the append-only rule between peers of
different versions.

The codec is msgpack maps keyed by field name (no struct is ``array_like``), so an older peer's
message is one without the trailing keys, and a newer peer's has keys this one does not know.

Strategies are derived from each struct's field types (``msgspec.structs.fields``), with
``st.from_type`` for the leaves it handles as the wire does (str, bytes, bool, None,
``Literal``s), and ``Annotated`` ``msgspec.Meta`` bounds as the strategy's bounds (no message
here has any yet). Not ``st.from_type`` on the structs themselves: for a field whose default is
a factory (``stop_token_ids: list[int] = []``) it passes msgspec's ``<factory>`` sentinel as the
field's value; and its ints and floats are unbounded and NaN, which msgpack cannot carry or
equality cannot compare. A field type the derivation does not know fails loudly
(``TypeError``), so a new kind of field needs a strategy here before its message is covered.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import socket
import threading
import time
import types
import typing
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import gateway.errors  # noqa: F401  (its classes share the hierarchy, as in the gateway process)
import transfer.errors
import transfer.messages
from transfer.client import DecodeClient
from transfer.errors import (
    EngineFailed,
    ErrorBody,
    FairgateError,
    IncompatiblePeer,
    InvalidWorkerRequest,
    NoRoomError,
    RequestAborted,
    RequestFailed,
    RequestTimeout,
    TransferError,
    TransferTimeout,
    UnknownRequest,
    WorkerError,
    WorkerNotReady,
    WorkerUnreachable,
    WrongRole,
    error_from_body,
)
from transfer.http import FrameStreamResponse, http_server, read_message, serve_on
from transfer.messages import (
    AbortRequest,
    AbortResult,
    DecodeRequest,
    ErrorFrame,
    FinishReasonWire,
    Frame,
    FrameDecoder,
    GenerateRequest,
    KvHello,
    KvHelloReply,
    KvLayoutInfo,
    KvTarget,
    MakeRoomRequest,
    MakeRoomResult,
    Preempted,
    PrefillRequest,
    PrefillResult,
    PrefillTarget,
    PrefillTargetResult,
    Priority,
    Reserved,
    SamplingSpec,
    TokenFrame,
    TokenizerSpec,
    TransferAck,
    TransferHeader,
    TransferReply,
    WorkerInfo,
    WorkerLoad,
    decode_message,
    encode_frame,
    encode_message,
)

WIRE_MODULES = (transfer.messages, transfer.errors)
COVERED_STRUCTS: tuple[type[msgspec.Struct], ...] = (
    # control plane: requests and their answers
    SamplingSpec,
    Priority,
    KvTarget,
    PrefillRequest,
    PrefillResult,
    PrefillTarget,
    PrefillTargetResult,
    DecodeRequest,
    GenerateRequest,
    MakeRoomRequest,
    MakeRoomResult,
    AbortRequest,
    AbortResult,
    WorkerLoad,
    WorkerInfo,
    TokenizerSpec,
    ErrorBody,
    # frames (the tagged union ``Frame``)
    Reserved,
    TokenFrame,
    ErrorFrame,
    Preempted,
    # KV data plane
    KvLayoutInfo,
    KvHello,
    KvHelloReply,
    TransferHeader,
    TransferReply,
    TransferAck,
)
FRAME_TYPES: tuple[type[msgspec.Struct], ...] = (Reserved, TokenFrame, ErrorFrame, Preempted)
ERROR_CLASSES: tuple[type[FairgateError], ...] = (
    FairgateError,
    WorkerError,
    InvalidWorkerRequest,
    UnknownRequest,
    NoRoomError,
    WorkerNotReady,
    WorkerUnreachable,
    WrongRole,
    RequestTimeout,
    RequestAborted,
    RequestFailed,
    EngineFailed,
    TransferError,
    IncompatiblePeer,
    TransferTimeout,
)

# msgpack carries integers in [-2**63, 2**64 - 1]; NaN is carried bit for bit but is not equal
# to itself, so equality could not show that it came back (infinities and -0.0 stay in).
INTS = st.integers(-(2**63), 2**64 - 1)
FLOATS = st.floats(allow_nan=False)
MAX_LIST = 6  # list lengths: the codec treats 6 items as it treats 6000, and examples stay fast
EXAMPLES = 60  # per struct, per property


def _defined_in(module: types.ModuleType, base: type) -> list[type]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, base)
        and value.__module__ == module.__name__
    ]


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the (resolved) field type ``tp`` that the wire can carry."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _constrained(args[0], [meta for meta in args[1:] if isinstance(meta, msgspec.Meta)])
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return struct_strategy(tp)
    if tp is int:
        return INTS
    if tp is float:
        return FLOATS
    if tp in (str, bytes, bool, type(None)) or origin is Literal:
        return st.from_type(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(arg) for arg in args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=MAX_LIST)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=MAX_LIST)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        return st.tuples(*(strategy_for(arg) for arg in args))
    raise TypeError(f"no wire strategy for {tp!r}: add one to strategy_for")


_BOUNDS = ("gt", "ge", "lt", "le")
_LENGTHS = ("min_length", "max_length")


def _constrained(tp: Any, metas: list[msgspec.Meta]) -> st.SearchStrategy[Any]:
    """``Annotated[tp, msgspec.Meta(...)]``: values within the bounds the decoder enforces."""
    bounds = {
        name: getattr(meta, name)
        for meta in metas
        for name in (*_BOUNDS, *_LENGTHS, "pattern", "multiple_of")
        if getattr(meta, name, None) is not None
    }
    if tp in (int, float) and set(bounds) <= set(_BOUNDS):
        lower, upper = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
        if tp is float:
            return st.floats(
                lower,
                upper,
                allow_nan=False,
                exclude_min="gt" in bounds,
                exclude_max="lt" in bounds,
            )
        low = -(2**63) if lower is None else lower + ("gt" in bounds)
        high = 2**64 - 1 if upper is None else upper - ("lt" in bounds)
        return st.integers(low, high)
    is_sized = tp in (str, bytes) or typing.get_origin(tp) is list
    if is_sized and set(bounds) <= set(_LENGTHS):
        min_size, max_size = bounds.get("min_length", 0), bounds.get("max_length")
        if tp is str:
            return st.text(min_size=min_size, max_size=max_size)
        if tp is bytes:
            return st.binary(min_size=min_size, max_size=max_size)
        return st.lists(
            strategy_for(typing.get_args(tp)[0]),
            min_size=min_size,
            max_size=max_size if max_size is not None else max(min_size, MAX_LIST),
        )
    raise TypeError(f"no wire strategy for {tp!r} with {bounds}: add one to _constrained")


def _default_of(field: msgspec.structs.FieldInfo) -> Any:
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return field.default


@functools.cache
def struct_strategy(cls: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    """Instances of ``cls`` with every field drawn, a defaulted one often left at its default."""
    fields = {}
    for field in msgspec.structs.fields(cls):
        values = strategy_for(field.type)
        fields[field.name] = values if field.required else st.just(_default_of(field)) | values
    return st.builds(cls, **fields)


def frames() -> st.SearchStrategy[Any]:
    return strategy_for(Frame)


def _as_map(message: msgspec.Struct) -> dict[str, Any]:
    """The message as the peer's msgpack map (what a peer of another version would decode)."""
    decoded = msgspec.msgpack.decode(encode_message(message))
    assert isinstance(decoded, dict)
    return decoded


# --- what is covered ------------------------------------------------------------------------


def test_every_wire_struct_is_covered() -> None:
    discovered = {cls for module in WIRE_MODULES for cls in _defined_in(module, msgspec.Struct)}
    missing = sorted(cls.__name__ for cls in discovered - set(COVERED_STRUCTS))
    stale = sorted(cls.__name__ for cls in set(COVERED_STRUCTS) - discovered)
    assert not missing, f"wire structs without round-trip coverage: {missing}"
    assert not stale, f"covered structs that are no longer wire structs: {stale}"
    assert len(set(COVERED_STRUCTS)) == len(COVERED_STRUCTS)
    assert set(typing.get_args(Frame)) == set(FRAME_TYPES)


def test_every_error_class_is_covered() -> None:
    assert set(_defined_in(transfer.errors, FairgateError)) == set(ERROR_CLASSES)


@pytest.mark.parametrize("cls", COVERED_STRUCTS, ids=lambda cls: cls.__name__)
def test_every_wire_struct_is_a_map_with_fields_appended_after_required_ones(
    cls: type[msgspec.Struct],
) -> None:
    """What the forward-compatibility tests below rest on: fields travel by name, not position,
    and every defaulted field comes after the required ones (a required field appended later, in
    a ``kw_only`` struct, would make every older peer's message undecodable)."""
    config = cls.__struct_config__
    assert not config.array_like and not config.omit_defaults
    required = [field.required for field in msgspec.structs.fields(cls)]
    assert required == sorted(required, reverse=True), f"{cls.__name__}: {required}"
    # Every field name is its wire name: renaming one would break every older peer.
    assert all(field.encode_name == field.name for field in msgspec.structs.fields(cls))


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", COVERED_STRUCTS, ids=lambda cls: cls.__name__)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_survives_the_codec(cls: type[msgspec.Struct], data: st.DataObject) -> None:
    message = data.draw(struct_strategy(cls), label="message")
    encoded = encode_message(message)
    decoded = decode_message(encoded, cls)
    assert type(decoded) is cls
    assert decoded == message
    assert encode_message(decoded) == encoded  # byte for byte: nothing was normalised on the way


@settings(max_examples=200, deadline=None)
@given(frame=frames())
def test_a_frame_comes_back_as_its_own_kind_through_the_frame_union(frame: Frame) -> None:
    framed = encode_frame(frame)
    # The framing: a 4-byte big-endian length, then the message exactly as encode_message has it.
    assert int.from_bytes(framed[:4], "big") == len(framed) - 4
    assert framed[4:] == encode_message(frame)
    assert _as_map(frame)["type"] == type(frame).__struct_config__.tag
    decoder = FrameDecoder()
    [decoded] = decoder.feed(framed)
    assert type(decoded) is type(frame) and decoded == frame
    assert not decoder.has_partial_frame


@st.composite
def framed_streams(draw: st.DrawFn) -> tuple[list[Frame], bytes, list[int]]:
    """Frames, their stream, and the points it is cut at as the network might deliver it
    (cuts may repeat: empty chunks)."""
    sent = draw(st.lists(frames(), max_size=8), label="frames")
    stream = b"".join(encode_frame(frame) for frame in sent)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    return sent, stream, sorted(cuts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=framed_streams())
def test_a_frame_stream_survives_any_chunking(case: tuple[list[Frame], bytes, list[int]]) -> None:
    sent, stream, cuts = case
    ends = list(itertools.accumulate(len(encode_frame(frame)) for frame in sent))
    decoder = FrameDecoder()
    received: list[Frame] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        received.extend(decoder.feed(stream[start:cut]))
        start = cut
        # A frame comes out as soon as its last byte is in, and not before.
        assert len(received) == sum(1 for end in ends if end <= cut)
        assert decoder.has_partial_frame == (cut not in [0, *ends])
    assert received == sent
    assert [type(frame) for frame in received] == [type(frame) for frame in sent]


# --- peers of other versions ----------------------------------------------------------------


@pytest.mark.parametrize("cls", COVERED_STRUCTS, ids=lambda cls: cls.__name__)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_an_older_peers_message_without_trailing_fields_decodes_with_their_defaults(
    cls: type[msgspec.Struct], data: st.DataObject
) -> None:
    message = data.draw(struct_strategy(cls), label="message")
    defaulted = [field for field in msgspec.structs.fields(cls) if not field.required]
    num_missing = data.draw(st.integers(0, len(defaulted)), label="num_missing")
    missing = defaulted[len(defaulted) - num_missing :]
    older = _as_map(message)
    for field in missing:
        del older[field.encode_name]
    decoded = decode_message(msgspec.msgpack.encode(older), cls)
    expected = msgspec.structs.replace(
        message, **{field.name: _default_of(field) for field in missing}
    )
    assert decoded == expected


def test_a_worker_info_from_before_tokenizers_and_layouts_decodes_without_them() -> None:
    """The fields a worker announces for per-model pools (issue 20) are absent from an older
    worker's ``/v1/info``: "not said", never a made-up value."""
    older = {
        "worker_id": "w",
        "instance_id": "i",
        "role": "prefill",
        "model_id": "m",
        "block_size": 16,
        "num_total_blocks": 8,
        "max_model_len": 2048,
        "vocab_size": 49152,
        "kv_host": "127.0.0.1",
        "kv_port": 0,
        "protocol_version": 1,
        "max_num_seqs": 4,
    }
    info = decode_message(msgspec.msgpack.encode(older), WorkerInfo)
    assert (info.tokenizer_digest, info.kv_layout) == ("", None)
    layout = KvLayoutInfo("m", "gloo", "float32", 16, 30, 3, 64)
    newer = msgspec.structs.replace(info, tokenizer_digest="ab" * 32, kv_layout=layout)
    assert _as_map(newer)["kv_layout"]["num_kv_heads"] == 3  # a nested map, by field name
    assert decode_message(encode_message(newer), WorkerInfo) == newer


# A name no field will ever have, with values of any msgpack kind.
_NEW_FIELD = "field_from_a_newer_peer"
_NEW_VALUES = st.one_of(INTS, FLOATS, st.text(), st.binary(), st.lists(INTS, max_size=3))


@pytest.mark.parametrize("cls", COVERED_STRUCTS, ids=lambda cls: cls.__name__)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_newer_peers_extra_field_is_ignored_unless_the_struct_forbids_it(
    cls: type[msgspec.Struct], data: st.DataObject
) -> None:
    message = data.draw(struct_strategy(cls), label="message")
    newer = _as_map(message)
    assert _NEW_FIELD not in newer
    newer[_NEW_FIELD] = data.draw(_NEW_VALUES, label="new value")
    encoded = msgspec.msgpack.encode(newer)
    if cls.__struct_config__.forbid_unknown_fields:
        # SamplingSpec only: an older worker refuses a sampling parameter it does not know
        # rather than sample without it.
        assert cls is SamplingSpec
        with pytest.raises(msgspec.ValidationError, match=f"unknown field `{_NEW_FIELD}`"):
            decode_message(encoded, cls)
    else:
        assert decode_message(encoded, cls) == message


@settings(max_examples=100, deadline=None)
@given(frame=frames(), value=_NEW_VALUES)
def test_a_newer_peers_frame_with_an_extra_field_comes_through_the_frame_decoder(
    frame: Frame, value: Any
) -> None:
    newer = _as_map(frame)
    newer[_NEW_FIELD] = value
    payload = msgspec.msgpack.encode(newer)
    assert FrameDecoder().feed(len(payload).to_bytes(4, "big") + payload) == [frame]


def test_a_newer_peers_new_kind_of_frame_is_refused_by_the_frame_decoder() -> None:
    """Not forward compatible, and so said here: a frame kind an older caller does not know is
    a ``ValidationError`` (``FrameStream`` reports it as ``WorkerUnreachable``)."""
    payload = msgspec.msgpack.encode({"type": "from_the_future", "token_ids": [1]})
    with pytest.raises(msgspec.ValidationError, match="from_the_future"):
        FrameDecoder().feed(len(payload).to_bytes(4, "big") + payload)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
@settings(max_examples=30, deadline=None)
@given(text=st.text())
def test_every_error_comes_back_as_its_own_class(cls: type[FairgateError], text: str) -> None:
    error = cls(text)
    body = decode_message(encode_message(error.to_body()), ErrorBody)
    again = error_from_body(body)
    assert type(again) is cls
    assert again.message == text and again.status == cls.status and again.code == cls.code


# --- frame streams over HTTP ----------------------------------------------------------------

# The test server's script: request id → the frames to answer with; and what it received.
_scripts: dict[str, list[Frame]] = {}
_received: dict[str, DecodeRequest] = {}


async def _decode_route(request: Request) -> Response:
    decode = await read_message(request, DecodeRequest)
    _received[decode.request_id] = decode
    script = _scripts.pop(decode.request_id)

    async def play() -> AsyncGenerator[Frame]:
        for frame in script:
            yield frame

    return FrameStreamResponse(play())


@pytest.fixture(scope="module")
def frame_server_url() -> Iterator[str]:
    """A real uvicorn server (``transfer.http.http_server``) on loopback, in a thread."""
    server = http_server(Starlette(routes=[Route("/v1/decode", _decode_route, methods=["POST"])]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=serve_on, args=(server, sock), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    assert not thread.is_alive()


_Ending = Literal["finished", "preempted", "error", "none"]


@st.composite
def scripted_streams(draw: st.DrawFn) -> tuple[DecodeRequest, list[Frame], _Ending]:
    """A request and the stream a worker answers it with: frames that do not end it, then a
    token frame with a finish reason, a ``Preempted``, an ``ErrorFrame``, or nothing (it broke
    off)."""
    request = draw(struct_strategy(DecodeRequest), label="request")
    request = msgspec.structs.replace(request, request_id=f"{request.request_id}/{uuid.uuid4()}")
    ongoing = st.one_of(
        struct_strategy(Reserved),
        struct_strategy(TokenFrame).map(lambda f: msgspec.structs.replace(f, finish_reason=None)),
    )
    script: list[Frame] = draw(st.lists(ongoing, max_size=5), label="ongoing")
    ending: _Ending = draw(st.sampled_from(typing.get_args(_Ending)), label="ending")
    if ending == "finished":
        last = draw(struct_strategy(TokenFrame), label="last")
        reason = draw(strategy_for(FinishReasonWire), label="finish_reason")
        script.append(msgspec.structs.replace(last, finish_reason=reason))
    elif ending == "preempted":
        script.append(draw(struct_strategy(Preempted)))
    elif ending == "error":
        codes = st.sampled_from([cls.code for cls in ERROR_CLASSES]) | st.text()
        body = draw(st.builds(ErrorBody, codes, st.text()), label="error")
        script.append(ErrorFrame(body))
    return request, script, ending


async def _play(url: str, request: DecodeRequest) -> tuple[list[Frame], FairgateError | None]:
    received: list[Frame] = []
    async with DecodeClient(url) as client, client.decode(request) as stream:
        try:
            async for frame in stream:
                received.append(frame)
        except FairgateError as exc:
            return received, exc
    return received, None


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=scripted_streams())
def test_a_frame_stream_over_http_arrives_as_sent(
    frame_server_url: str, case: tuple[DecodeRequest, list[Frame], _Ending]
) -> None:
    request, script, ending = case
    _scripts[request.request_id] = script
    received, error = asyncio.run(asyncio.wait_for(_play(frame_server_url, request), 30))
    assert _received.pop(request.request_id) == request  # the request body's round trip
    if ending in ("finished", "preempted"):
        assert error is None and received == script
    elif ending == "error":
        assert received == script[:-1]
        last = script[-1]
        assert isinstance(last, ErrorFrame)
        expected = error_from_body(last.error)
        assert type(error) is type(expected)
        assert error is not None and error.message.endswith(expected.message)
    else:
        assert received == script
        assert isinstance(error, WorkerUnreachable)
        assert "ended before the request finished" in error.message
