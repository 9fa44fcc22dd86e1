"""A request's prompt as token ids, without stalling the event loop for anyone.

Tokenizing is the heaviest thing the gateway does with a request (a 5 MB prompt takes seconds of
CPU), so ``PromptEncoder.encode``:

1. refuses a prompt that cannot fit the context before any work, from its length alone: a
   byte-level tokenizer never makes fewer than ``len(text) / max_bytes_per_token`` tokens
   (``engine.tokenizer.Tokenizer.min_num_tokens``, which counts out the characters the
   tokenizer drops);
2. tokenizes a short prompt inline (well under a millisecond) and a longer one, chat template
   included, in a thread of its own pool: the tokenizer releases the GIL while it works, so the
   loop goes on serving everyone else meanwhile;
3. lets each tenant tokenize one long prompt at a time: a tenant sending many long prompts waits
   for its own, and takes at most one of the pool's threads (and one core) from the others.

``TenantTurns`` is that rule (one at a time per tenant, the others wait their turn); the gateway
also reads and decodes large bodies by it (``gateway.openai_routes``): meanwhile the next large
body of the same tenant stays unread in its connection, so TCP's flow control holds its sender
back at no cost to anyone.

Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from engine.tokenizer import BrokenChatTemplate, Tokenizer, TokenizerError
from gateway.errors import ClientError, ContextLengthExceeded, EmptyPrompt
from gateway.openai_requests import GenerationRequest
from transfer.errors import FairgateError

__all__ = ["INLINE_MAX_CHARS", "PromptEncoder", "TenantTurns", "is_long_prompt"]

logger = logging.getLogger(__name__)

INLINE_MAX_CHARS = 1024  # tokenized on the loop: about 0.3 ms of the default model's tokenizer


def _num_chars(body: GenerationRequest) -> int:
    if body.messages is not None:
        return sum(len(m["content"]) for m in body.messages)
    return 0 if body.prompt is None else len(body.prompt)


def is_long_prompt(body: GenerationRequest) -> bool:
    """Whether ``PromptEncoder.encode`` tokenizes this prompt off the loop (it may wait)."""
    return _num_chars(body) > INLINE_MAX_CHARS


class TenantTurns:
    """One at a time per tenant: ``async with turns.turn(tenant_id): ...``. A tenant's state
    goes with its last holder or waiter."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def turn(self, tenant_id: str) -> asyncio.Lock:
        lock = self._locks.get(tenant_id)
        if lock is None:
            lock = self._locks[tenant_id] = asyncio.Lock()
        return lock


class PromptEncoder:
    """Encodes prompts, each with its model's tokenizer; ``close`` ends its threads (one pool,
    and one long prompt at a time per tenant, whatever the model)."""

    def __init__(self, *, max_threads: int = 2) -> None:
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="tokenize")
        self._turns = TenantTurns()  # one long prompt at a time per tenant

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(
        self, tenant_id: str, body: GenerationRequest, max_model_len: int, tokenizer: Tokenizer
    ) -> list[int]:
        """The prompt's token ids by ``tokenizer`` (its model's); ``ClientError`` for an empty,
        unencodable or (by its length alone) over-long prompt. The caller checks the exact
        length."""
        param = "messages" if body.kind == "chat" else "prompt"
        if body.prompt_token_ids is not None:
            return _checked_ids(body.prompt_token_ids, max_model_len, tokenizer.vocab_size)
        num_chars = _num_chars(body)
        if body.messages is not None:
            work = partial(tokenizer.encode_chat, body.messages)
        else:
            assert body.prompt is not None
            work = partial(tokenizer.encode, body.prompt, add_special_tokens=True)
        min_num_tokens = 0
        max_bytes_per_token = tokenizer.max_bytes_per_token
        if max_bytes_per_token is not None and num_chars // max_bytes_per_token >= max_model_len:
            # Over the context by its length, unless enough of it is dropped: the exact bound.
            texts = [m["content"] for m in body.messages or ()] or [body.prompt or ""]
            min_num_tokens = tokenizer.min_num_tokens(texts)
        if min_num_tokens >= max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has at least {min_num_tokens} tokens ({num_chars} characters); "
                f"this model's context length is {max_model_len}",
                param=param,
            )
        try:
            if num_chars > INLINE_MAX_CHARS:  # ``is_long_prompt``
                token_ids = await self._off_loop(tenant_id, work)
            else:
                token_ids = work()
        except BrokenChatTemplate as exc:
            # The model's fault, not the request's: the tenant is told no more than that.
            logger.error("%s", exc)
            raise FairgateError("this model's chat template cannot be used") from exc
        except TokenizerError as exc:
            raise ClientError(str(exc), param=param) from exc
        if not token_ids:
            raise EmptyPrompt("the prompt makes no token for this model", param=param)
        return token_ids

    async def _off_loop(self, tenant_id: str, work: partial[list[int]]) -> list[int]:
        async with self._turns.turn(tenant_id):
            future = asyncio.get_running_loop().run_in_executor(self._executor, work)
            # A caller that leaves cannot stop the thread mid-prompt; the turn stays taken
            # until the thread is done, so a tenant cannot pile up abandoned work either.
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                await asyncio.wait({future})
                raise


def _checked_ids(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> list[int]:
    if len(prompt_token_ids) >= max_model_len:
        raise ContextLengthExceeded(
            f"the prompt has {len(prompt_token_ids)} tokens; this model's context length is "
            f"{max_model_len}",
            param="prompt",
        )
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ClientError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    return list(prompt_token_ids)
