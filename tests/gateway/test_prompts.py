"""``PromptEncoder`` with the default model's real tokenizer: an over-long prompt is refused from
its length alone, a long one is tokenized while the event loop goes on, and one tenant's long
prompts wait for each other, not for another tenant's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway.errors import ClientError, ContextLengthExceeded, EmptyPrompt
from gateway.openai_requests import GenerationRequest
from gateway.prompts import INLINE_MAX_CHARS, PromptEncoder
from transfer.errors import FairgateError

MAX_MODEL_LEN = 8192


class CountingTokenizer(Tokenizer):
    """The real tokenizer, counting calls and the threads encoding at once."""

    __slots__ = ("_lock", "calls", "concurrent", "most_concurrent")

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        with self._lock:
            self.calls += 1
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            return super().encode(text, add_special_tokens=add_special_tokens)
        finally:
            with self._lock:
                self.concurrent -= 1


@pytest.fixture(scope="module")
def tokenizer() -> CountingTokenizer:
    loaded = Tokenizer.load(tokenizer_path(resolve_model("default", pull=False)))
    # Same backend and settings, another class: copy the slots over.
    counting = CountingTokenizer.__new__(CountingTokenizer)
    for name in Tokenizer.__slots__:
        setattr(counting, name, getattr(loaded, name))
    counting.calls = counting.concurrent = counting.most_concurrent = 0
    counting._lock = threading.Lock()
    return counting


class OneModel:
    """A ``PromptEncoder`` used with one tokenizer, as the gateway does per model."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.prompts = PromptEncoder()
        self.tokenizer = tokenizer

    def encode(self, tenant_id: str, body: GenerationRequest, max_model_len: int) -> Any:
        return self.prompts.encode(tenant_id, body, max_model_len, self.tokenizer)

    def close(self) -> None:
        self.prompts.close()


@pytest.fixture
def encoder(tokenizer: CountingTokenizer) -> Iterator[OneModel]:
    tokenizer.calls = tokenizer.most_concurrent = 0
    prompts = OneModel(tokenizer)
    yield prompts
    prompts.close()


def completion(prompt: str) -> GenerationRequest:
    return GenerationRequest(kind="completion", model="m", prompt=prompt)


def chat(content: str) -> GenerationRequest:
    return GenerationRequest(
        kind="chat", model="m", messages=[{"role": "user", "content": content}]
    )


def test_the_bound_never_exceeds_the_real_token_count(tokenizer: CountingTokenizer) -> None:
    """Including characters the vocabulary lacks (SmolLM2's drops six ASCII controls): they
    make no token, so the bound counts them out."""
    assert tokenizer.max_bytes_per_token is not None
    texts = [
        "",
        "a",
        " " * 5000,
        "9" * 3000,
        "é" * 2000,
        "<|im_start|>" * 300,
        "ab " * 900,
        "\x1d" * 5000,
        "\x04\x06\x13\x14\x16\x1d" * 500 + "x" * 200,
        "".join(chr(c) for c in range(0x40000, 0x40400)),  # 4-byte characters, lead byte F1
    ]
    for text in texts:
        assert len(tokenizer.encode(text)) >= tokenizer.min_num_tokens([text]), text[:20]
    assert tokenizer.min_num_tokens(["\x1d" * 5000]) == 0


async def test_a_prompt_too_long_by_its_length_alone_is_refused_untokenized(
    encoder: OneModel, tokenizer: CountingTokenizer
) -> None:
    assert tokenizer.max_bytes_per_token is not None
    huge = "x" * (tokenizer.max_bytes_per_token * MAX_MODEL_LEN)
    for body in (completion(huge), chat(huge)):
        with pytest.raises(ContextLengthExceeded, match="at least 8192 tokens") as raised:
            await encoder.encode("t", body, MAX_MODEL_LEN)
        assert raised.value.param == ("messages" if body.kind == "chat" else "prompt")
    assert tokenizer.calls == 0


async def test_token_ids_are_checked_against_the_context_and_vocabulary(
    encoder: OneModel,
) -> None:
    ids = GenerationRequest(kind="completion", model="m", prompt_token_ids=[1, 2, 3])
    assert await encoder.encode("t", ids, MAX_MODEL_LEN) == [1, 2, 3]
    too_long = GenerationRequest(kind="completion", model="m", prompt_token_ids=[1] * 8192)
    with pytest.raises(ContextLengthExceeded):
        await encoder.encode("t", too_long, MAX_MODEL_LEN)
    outside = GenerationRequest(kind="completion", model="m", prompt_token_ids=[10**9])
    with pytest.raises(ClientError, match="must be in"):
        await encoder.encode("t", outside, MAX_MODEL_LEN)


async def test_a_long_prompt_is_tokenized_while_the_loop_runs(
    encoder: OneModel, tokenizer: CountingTokenizer
) -> None:
    """The loop ticks on through the tokenizing (the old inline call, holding the GIL, let it
    tick a handful of times in seconds)."""
    text = "the quick brown fox jumps over the lazy dog " * 8000  # 352k characters
    num_ticks = 0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal num_ticks
        while not done.is_set():
            await asyncio.sleep(0.001)
            num_ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    token_ids = await encoder.encode("t", completion(text), MAX_MODEL_LEN * 100)
    elapsed_s = time.monotonic() - started
    done.set()
    await ticker
    assert len(token_ids) > 60_000
    # At least a tick every 20 ms on average, however slow the machine is.
    assert num_ticks >= elapsed_s / 0.02


async def test_a_tenant_tokenizes_one_long_prompt_at_a_time(
    encoder: OneModel, tokenizer: CountingTokenizer
) -> None:
    text = "lorem ipsum dolor sit amet " * 12000  # about 0.15 s each: two overlap
    assert len(text) > INLINE_MAX_CHARS
    same_tenant = [encoder.encode("flood", completion(text), 10**6) for _ in range(4)]
    await asyncio.gather(*same_tenant)
    assert (tokenizer.calls, tokenizer.most_concurrent) == (4, 1)
    tokenizer.calls = 0
    two_tenants = [encoder.encode(t, completion(text), 10**6) for t in ("a", "b", "a", "b")]
    await asyncio.gather(*two_tenants)
    assert (tokenizer.calls, tokenizer.most_concurrent) == (4, 2)


async def test_an_empty_prompt_and_broken_text_are_client_errors(encoder: OneModel) -> None:
    with pytest.raises(EmptyPrompt, match="no token"):
        await encoder.encode("t", completion(""), MAX_MODEL_LEN)
    # Longer than the length bound, but every character is one the tokenizer drops: not over
    # the context, and no token either.
    assert encoder.tokenizer.max_bytes_per_token is not None
    dropped = "\x1d" * (encoder.tokenizer.max_bytes_per_token * MAX_MODEL_LEN)
    with pytest.raises(EmptyPrompt) as raised:
        await encoder.encode("t", completion(dropped), MAX_MODEL_LEN)
    assert (raised.value.code, raised.value.param) == ("empty_prompt", "prompt")
    with pytest.raises(ClientError, match="not valid Unicode") as raised:
        await encoder.encode("t", completion("a\ud800b"), MAX_MODEL_LEN)
    assert raised.value.param == "prompt"


async def test_a_chat_template_that_does_not_compile_is_the_servers_fault(
    tokenizer: CountingTokenizer,
) -> None:
    broken = CountingTokenizer.__new__(CountingTokenizer)
    for name in (*Tokenizer.__slots__, *CountingTokenizer.__slots__):
        setattr(broken, name, getattr(tokenizer, name))
    broken.chat_template = "{% for %}"
    broken._compiled_template = None
    prompts = OneModel(broken)
    try:
        with pytest.raises(FairgateError) as raised:
            await prompts.encode("t", chat("hello"), MAX_MODEL_LEN)
    finally:
        prompts.close()
    assert not isinstance(raised.value, ClientError) and raised.value.status == 500
    assert "compile" not in raised.value.message  # the jinja text stays in the log
