"""The gateway's tokenizers, one per tokenizer its models' workers announce
(``WorkerInfo.tokenizer_digest``), loaded when a model is first asked for and shared by every
request of every model that uses it (``tiny`` borrows the default model's, say).

The gateway's own model (``[model] name``) is loaded from local files at start, as before; any
other is fetched from a worker of its pool (``GET /v1/tokenizer``, ``TokenizerSpec``), checked
against the digest the worker announced, and rebuilt in a thread (about 0.1 s for SmolLM2's, so
never on the event loop). One fetch per tokenizer at a time: requests that need it meanwhile wait
for that one. A fetch that fails or takes longer than ``timeout_s`` is the model's 503 for those
requests, and for the model's requests in the next ``RETRY_AFTER_S`` (a worker that announces one
tokenizer and serves another would otherwise cost a 1.5 MB fetch and a hash per request); the
caller fetches from any of the pool's workers, so the next try may reach another. Torch-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial

from engine.tokenizer import Tokenizer
from gateway.errors import Unavailable
from transfer.errors import FairgateError
from transfer.messages import TokenizerSpec, encode_message, tokenizer_digest

__all__ = ["TokenizerCache"]

FETCH_TIMEOUT_S = 10.0
RETRY_AFTER_S = 2.0


class TokenizerCache:
    """Tokenizers by digest (module docstring)."""

    def __init__(
        self,
        *,
        timeout_s: float = FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._loaded: dict[str, Tokenizer] = {}
        self._loading: dict[str, asyncio.Future[Tokenizer]] = {}
        self._failed_until: dict[str, float] = {}  # by digest: no new fetch before then

    def add(self, tokenizer: Tokenizer) -> str:
        """A tokenizer loaded here (the gateway's own model's); its digest."""
        digest = tokenizer_digest(encode_message(tokenizer.to_spec()))
        self._loaded[digest] = tokenizer
        return digest

    def loaded(self, digest: str) -> Tokenizer | None:
        return self._loaded.get(digest)

    async def get(
        self, digest: str, fetch: Callable[[], Awaitable[TokenizerSpec]], model: str
    ) -> Tokenizer:
        """The tokenizer of ``digest``, fetched with ``fetch`` (from a worker of ``model``'s
        pool) unless it is loaded or being loaded; ``Unavailable`` when that fails."""
        tokenizer = self._loaded.get(digest)
        if tokenizer is not None:
            return tokenizer
        if self.clock() < self._failed_until.get(digest, float("-inf")):
            raise Unavailable(
                f"the tokenizer of the model {model!r} could not be loaded from its workers",
                retry_after_s=RETRY_AFTER_S,
            )
        loading = self._loading.get(digest)
        if loading is None:
            loading = self._loading[digest] = asyncio.ensure_future(self._load(digest, fetch))
            loading.add_done_callback(partial(self._loaded_or_failed, digest))
        try:
            return await asyncio.shield(loading)
        except FairgateError as exc:
            raise Unavailable(
                f"the tokenizer of the model {model!r} could not be loaded from its workers "
                f"({exc.code})",
                retry_after_s=RETRY_AFTER_S,
            ) from None
        except (TimeoutError, ValueError):
            raise Unavailable(
                f"the tokenizer of the model {model!r} could not be loaded from its workers",
                retry_after_s=RETRY_AFTER_S,
            ) from None

    def _loaded_or_failed(self, digest: str, loading: asyncio.Future[Tokenizer]) -> None:
        self._loading.pop(digest, None)
        if loading.cancelled() or loading.exception() is not None:  # (retrieved: all told)
            self._failed_until[digest] = self.clock() + RETRY_AFTER_S
        else:
            self._failed_until.pop(digest, None)

    async def _load(self, digest: str, fetch: Callable[[], Awaitable[TokenizerSpec]]) -> Tokenizer:
        async with asyncio.timeout(self.timeout_s):
            spec = await fetch()
        if tokenizer_digest(encode_message(spec)) != digest:
            raise ValueError("the worker's tokenizer is not the one it announced")
        tokenizer = await asyncio.to_thread(Tokenizer.from_spec, spec)
        self._loaded[digest] = tokenizer
        return tokenizer
