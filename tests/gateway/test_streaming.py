"""``TextStream`` with the default model's real tokenizer: incremental text, whole UTF-8
characters, and stop strings that may arrive split over several tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway.streaming import TextStream


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_path(resolve_model("default")))


def stream_one_at_a_time(stream: TextStream, token_ids: list[int]) -> list[str]:
    """Every push's output, then finish's, in order."""
    pieces = [stream.push([token_id]) for token_id in token_ids]
    pieces.append(stream.finish())
    return pieces


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    found = [index for stop in stops if stop and (index := text.find(stop)) >= 0]
    return text[: min(found)] if found else text


def test_without_stop_strings_the_stream_is_the_decoded_text(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.\nTwice, even!")
    stream = TextStream(tokenizer)
    pieces = stream_one_at_a_time(stream, token_ids)
    assert "".join(pieces) == tokenizer.decode(token_ids)
    assert sum(1 for piece in pieces if piece) > 1  # it streams, not one lump at the end
    assert not stream.is_stopped


def test_multi_byte_characters_split_over_tokens_come_out_whole(tokenizer: Tokenizer) -> None:
    text = "héllo wörld 😀🎉 café 日本語のテキスト"
    token_ids = tokenizer.encode(text)
    # The emoji and the Japanese are split over byte-level tokens that decode alone to U+FFFD.
    assert any("\ufffd" in tokenizer.decode([token_id]) for token_id in token_ids)
    pieces = stream_one_at_a_time(TextStream(tokenizer), token_ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text
    # The same with a stop string that never occurs (the holding path, not the fast path).
    pieces = stream_one_at_a_time(TextStream(tokenizer, stop=("zzz",)), token_ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_a_stop_string_in_the_middle_ends_the_text_before_it(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("Hello there. STOP and never this.")
    stream = TextStream(tokenizer, stop=("STOP",))
    emitted = stream.push(token_ids)
    assert emitted == "Hello there. "
    assert stream.is_stopped
    assert stream.push(tokenizer.encode(" more text")) == ""
    assert stream.finish() == ""


def test_a_stop_string_split_over_tokens_is_found_and_never_shown(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("Hello STOP world")
    # The default tokenizer splits " STOP" as " ST" + "OP": the stop string spans two tokens.
    assert [tokenizer.decode([t]) for t in token_ids] == ["Hello", " ST", "OP", " world"]
    stream = TextStream(tokenizer, stop=("STOP",))
    pieces: list[str] = []
    for token_id in token_ids:
        pieces.append(stream.push([token_id]))
        assert "S" not in "".join(pieces)  # the stop string's first characters were held back
    pieces.append(stream.finish())
    assert pieces == ["Hello", " ", "", "", ""]
    assert stream.is_stopped


def test_a_stop_string_spread_over_many_tokens(tokenizer: Tokenizer) -> None:
    stop = "<|endofsection|>"
    token_ids = tokenizer.encode(f"one two{stop}three")
    stream = TextStream(tokenizer, stop=(stop,))
    pieces = stream_one_at_a_time(stream, token_ids)
    assert "".join(pieces) == "one two"
    assert all("<" not in piece for piece in pieces)
    assert stream.is_stopped


def test_a_partial_stop_prefix_at_the_end_is_released_by_finish(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("It ends with ST")
    stream = TextStream(tokenizer, stop=("STOP",))
    pushed = "".join(stream.push([token_id]) for token_id in token_ids)
    assert pushed == "It ends with "  # "ST" could still become "STOP"
    assert stream.finish() == "ST"
    assert not stream.is_stopped


def test_a_prefix_that_turns_out_different_is_released_on_the_next_push(
    tokenizer: Tokenizer,
) -> None:
    stream = TextStream(tokenizer, stop=("STOP",))
    first = stream.push(tokenizer.encode("a ST"))
    assert first == "a "
    assert stream.push(tokenizer.encode("ARK")) == "STARK"
    assert stream.finish() == ""
    assert not stream.is_stopped


def test_with_several_stop_strings_the_earliest_wins(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("alpha beta gamma delta")
    for stops in (("gamma", "beta"), ("beta", "gamma")):
        stream = TextStream(tokenizer, stop=stops)
        assert "".join(stream_one_at_a_time(stream, token_ids)) == "alpha "
        assert stream.is_stopped
        stream = TextStream(tokenizer, stop=stops)
        assert stream.push(token_ids) + stream.finish() == "alpha "


def test_empty_stop_strings_are_ignored(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("nothing stops this")
    stream = TextStream(tokenizer, stop=("", ""))
    assert "".join(stream_one_at_a_time(stream, token_ids)) == "nothing stops this"
    assert not stream.is_stopped
    # An empty one beside a real one: the real one still works.
    stream = TextStream(tokenizer, stop=("", "stops"))
    assert "".join(stream_one_at_a_time(stream, token_ids)) == "nothing "
    assert stream.is_stopped


@st.composite
def texts_and_stops(draw: st.DrawFn) -> tuple[str, str, list[int]]:
    text = draw(st.text(max_size=60))
    if text and draw(st.booleans()):
        start = draw(st.integers(0, len(text) - 1))
        end = draw(st.integers(start + 1, min(len(text), start + 8)))
        stop = text[start:end]  # one that occurs
    else:
        stop = draw(st.text(min_size=1, max_size=6))
    chunk_sizes = draw(st.lists(st.integers(1, 4), max_size=80))
    return text, stop, chunk_sizes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=texts_and_stops())
def test_streamed_text_is_the_decoded_text_cut_at_the_stop_string(
    tokenizer: Tokenizer, case: tuple[str, str, list[int]]
) -> None:
    text, stop, chunk_sizes = case
    token_ids = tokenizer.encode(text)
    expected = cut_at_stop(tokenizer.decode(token_ids), (stop,))
    stream = TextStream(tokenizer, stop=(stop,))
    emitted = ""
    position = 0
    sizes = iter(chunk_sizes)
    while position < len(token_ids):
        size = next(sizes, 1)
        emitted += stream.push(token_ids[position : position + size])
        position += size
        # Nothing is ever shown that the stop string later takes back.
        assert expected.startswith(emitted)
    emitted += stream.finish()
    assert emitted == expected
    assert stream.is_stopped == (stop in tokenizer.decode(token_ids))
