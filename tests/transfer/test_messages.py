"""Wire messages, frame streams and the error hierarchy across a process boundary."""

from __future__ import annotations

import msgspec
import pytest

from transfer.errors import (
    ErrorBody,
    FairgateError,
    IncompatiblePeer,
    NoRoomError,
    TransferTimeout,
    WorkerError,
    error_from_body,
)
from transfer.messages import (
    ErrorFrame,
    FrameDecoder,
    PrefillRequest,
    Reserved,
    SamplingSpec,
    TokenFrame,
    decode_message,
    encode_frame,
    encode_message,
)


def test_frames_survive_any_chunking() -> None:
    frames = [
        Reserved("decode-1", "10.0.0.2", 8202, [3, 4, 5]),
        TokenFrame([17], num_prompt_tokens=9, num_output_tokens=2),
        TokenFrame([18, 19], finish_reason="stop", num_prompt_tokens=9, num_output_tokens=4),
        ErrorFrame(ErrorBody("kv_transfer_failed", "peer gone")),
    ]
    stream = b"".join(encode_frame(frame) for frame in frames)
    for chunk_size in (1, 3, 7, len(stream)):
        decoder = FrameDecoder()
        received = []
        for start in range(0, len(stream), chunk_size):
            received.extend(decoder.feed(stream[start : start + chunk_size]))
        assert received == frames
        assert not decoder.has_partial_frame


def test_a_frame_claiming_to_be_huge_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        FrameDecoder().feed(b"\xff\xff\xff\xff" + b"x" * 8)


def test_requests_round_trip_and_unknown_sampling_fields_are_refused() -> None:
    request = PrefillRequest("r1", [1, 2, 3], SamplingSpec(max_tokens=4, seed=5), b"tenant-a")
    assert decode_message(encode_message(request), PrefillRequest) == request
    bad = msgspec.msgpack.encode({"request_id": "r", "prompt_token_ids": [1], "sampling": {"n": 2}})
    with pytest.raises(msgspec.ValidationError, match="unknown field `n`"):
        decode_message(bad, PrefillRequest)


def test_sampling_spec_validates_into_engine_params() -> None:
    params = SamplingSpec(max_tokens=3, temperature=0, stop_token_ids=[2, 2, 9]).to_params(seed=4)
    assert params.seed == 4 and params.stop_token_ids == frozenset({2, 9}) and params.is_greedy
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(top_p=0).to_params()


@pytest.mark.parametrize(
    "error", [NoRoomError("full"), IncompatiblePeer("dtype"), TransferTimeout("slow")]
)
def test_errors_come_back_as_their_own_class(error: FairgateError) -> None:
    body = decode_message(encode_message(error.to_body()), ErrorBody)
    again = error_from_body(body)
    assert type(again) is type(error) and again.message == error.message
    assert again.status == error.status


def test_unknown_error_codes_stay_errors() -> None:
    error = error_from_body(ErrorBody("from_the_future", "something new"))
    assert type(error) is FairgateError and "from_the_future" in error.message
    assert not isinstance(error, WorkerError)
