"""What a real worker process announces so that a caller can group workers by model and speak
their model's text without its files: ``WorkerInfo.tokenizer_digest`` and ``kv_layout`` on
``GET /v1/info``, and the ``TokenizerSpec`` on ``GET /v1/tokenizer`` (``WorkerClient``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import aiohttp
import pytest

from deploy.launcher import WorkerProcess, WorkerSpec, start_workers
from engine.model_store import resolve_model, tokenizer_path
from engine.tiny import tiny_config
from engine.tokenizer import Tokenizer
from transfer.client import WorkerClient
from transfer.messages import (
    MSGPACK_CONTENT_TYPE,
    KvLayoutInfo,
    TokenizerSpec,
    decode_message,
    encode_message,
    tokenizer_digest,
)

ARGS = ("--precision", "float32", "--threads", "1", "--num-blocks", "64", "--block-size", "16")
TEXT = "Hello <|im_start|>user\nwörld 12345 👍<|im_end|>"
CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2 + 2?"}]


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, WorkerProcess]]:
    """A tiny prefill and a tiny colocated worker (one model), and a null prefill worker (another
    model borrowing the same tokenizer)."""
    names = ("tiny-prefill", "tiny-colocated", "null-prefill")
    started = start_workers(
        [
            WorkerSpec("prefill", "tiny", ARGS),
            WorkerSpec("colocated", "tiny", ARGS),
            WorkerSpec("prefill", "null", ARGS),
        ],
        timeout_s=120,
    )
    yield dict(zip(names, started, strict=True))
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def local_tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_path(resolve_model("tiny")))


async def test_the_tokenizer_route_serves_the_spec_whose_digest_info_announces(
    workers: dict[str, WorkerProcess], local_tokenizer: Tokenizer
) -> None:
    # Built in this process from the same file: the digest does not depend on the process.
    expected_digest = tokenizer_digest(encode_message(local_tokenizer.to_spec()))
    timeout = aiohttp.ClientTimeout(total=30)
    for name, worker in workers.items():
        async with WorkerClient(worker.http_url) as client:
            info = await client.info()
            spec = await client.tokenizer(timeout_s=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(worker.http_url + "/v1/tokenizer") as response,
        ):
            assert response.status == 200, name
            assert response.headers["content-type"] == MSGPACK_CONTENT_TYPE
            body = await response.read()
        assert info.tokenizer_digest == hashlib.sha256(body).hexdigest() == expected_digest, name
        assert decode_message(body, TokenizerSpec) == spec
        rebuilt = Tokenizer.from_spec(spec)
        assert rebuilt.encode(TEXT) == local_tokenizer.encode(TEXT)
        assert rebuilt.encode_chat(CHAT) == local_tokenizer.encode_chat(CHAT)
        assert rebuilt.stop_token_ids == local_tokenizer.stop_token_ids
        assert rebuilt.vocab_size == info.vocab_size


async def test_info_carries_the_kv_layout_the_handshake_compares(
    workers: dict[str, WorkerProcess],
) -> None:
    infos = {}
    for name, worker in workers.items():
        async with WorkerClient(worker.http_url) as client:
            infos[name] = await client.info()
    layouts = {name: info.kv_layout for name, info in infos.items()}
    config = tiny_config(infos["tiny-prefill"].vocab_size)
    tiny = KvLayoutInfo(
        model_id="tiny-random-llama",
        backend="gloo",
        dtype="float32",
        block_size=16,
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )
    assert layouts["tiny-prefill"] == layouts["tiny-colocated"] == tiny
    # The arithmetic each runs, in words (``--precision float32``: the reference path).
    assert (
        infos["tiny-prefill"].precision
        == infos["tiny-colocated"].precision
        == (
            "float32 weights; batch-1 decode float32, batched decode float32, prefill float32, "
            "attention float32"
        )
    )
    assert infos["null-prefill"].precision.startswith("none")
    null = layouts["null-prefill"]
    assert null is not None
    # The null engine's cache: one layer of one 1-wide head (``engine.loader``).
    assert null.differences(tiny, labels=("null", "tiny")) == [
        "model_id 'null' (null) != 'tiny-random-llama' (tiny)",
        "num_layers 1 (null) != 2 (tiny)",
        "num_kv_heads 1 (null) != 2 (tiny)",
        "head_dim 1 (null) != 16 (tiny)",
    ]
