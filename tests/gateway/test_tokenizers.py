"""The gateway's tokenizer cache (``gateway.tokenizers``): one fetch per tokenizer, shared, the
digest checked, failures a 503 that the next request retries."""

from __future__ import annotations

import asyncio

import pytest

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway.errors import Unavailable
from gateway.tokenizers import RETRY_AFTER_S, TokenizerCache
from transfer.errors import WorkerUnreachable
from transfer.messages import TokenizerSpec, encode_message, tokenizer_digest


@pytest.fixture(scope="module")
def spec() -> TokenizerSpec:
    return Tokenizer.load(tokenizer_path(resolve_model("tiny"))).to_spec()


def _digest(spec: TokenizerSpec) -> str:
    return tokenizer_digest(encode_message(spec))


async def test_concurrent_requests_share_one_fetch(spec: TokenizerSpec) -> None:
    cache = TokenizerCache()
    calls = 0
    gate = asyncio.Event()

    async def fetch() -> TokenizerSpec:
        nonlocal calls
        calls += 1
        await gate.wait()
        return spec

    waiting = [asyncio.create_task(cache.get(_digest(spec), fetch, "m")) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    tokenizers = await asyncio.gather(*waiting)
    assert calls == 1 and all(t is tokenizers[0] for t in tokenizers)
    assert tokenizers[0].encode("hello world") == Tokenizer.from_spec(spec).encode("hello world")
    assert await cache.get(_digest(spec), fetch, "m") is tokenizers[0] and calls == 1


async def test_a_tokenizer_loaded_here_is_never_fetched(spec: TokenizerSpec) -> None:
    cache = TokenizerCache()
    digest = cache.add(Tokenizer.from_spec(spec))
    assert digest == _digest(spec)

    async def fetch() -> TokenizerSpec:
        raise AssertionError("fetched")

    assert await cache.get(digest, fetch, "m") is cache.loaded(digest)


async def test_a_failed_fetch_is_a_503_and_a_request_after_the_retry_time_tries_again(
    spec: TokenizerSpec,
) -> None:
    now = [0.0]
    cache = TokenizerCache(clock=lambda: now[0])
    answers: list[Exception | TokenizerSpec] = [WorkerUnreachable("down"), spec]

    async def fetch() -> TokenizerSpec:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with pytest.raises(Unavailable, match="tokenizer of the model 'm'") as raised:
        await cache.get(_digest(spec), fetch, "m")
    assert raised.value.status == 503 and raised.value.retry_after_s
    # Within the retry time: refused without a fetch (a worker announcing one tokenizer and
    # serving another would cost a 1.5 MB fetch per request).
    with pytest.raises(Unavailable):
        await cache.get(_digest(spec), fetch, "m")
    assert len(answers) == 1
    now[0] += RETRY_AFTER_S
    assert (await cache.get(_digest(spec), fetch, "m")).vocab_size == Tokenizer.from_spec(
        spec
    ).vocab_size


async def test_a_tokenizer_other_than_the_one_announced_is_refused(spec: TokenizerSpec) -> None:
    cache = TokenizerCache()

    async def fetch() -> TokenizerSpec:
        return spec

    with pytest.raises(Unavailable):
        await cache.get("0" * 64, fetch, "m")


async def test_a_fetch_that_hangs_ends_at_the_timeout(spec: TokenizerSpec) -> None:
    cache = TokenizerCache(timeout_s=0.05)

    async def fetch() -> TokenizerSpec:
        await asyncio.Event().wait()
        return spec

    with pytest.raises(Unavailable):
        await cache.get(_digest(spec), fetch, "m")
