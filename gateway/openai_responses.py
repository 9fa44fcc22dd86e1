"""The answers of OpenAI's Chat Completions, Completions and Models APIs, encoded as OpenAI sends
them: a whole answer (``ChatCompletion``, ``Completion``), a streamed one as server-sent events
(``ChatCompletionChunk``, ``CompletionChunk``: each class method gives one ``data:`` event, in
the order ``_Chunk`` describes, then ``SSE_DONE``), and the model list (``ModelList``). The
request bodies are ``gateway.openai_requests``. Torch-free.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal, Self

import msgspec

__all__ = [
    "SSE_DONE",
    "SSE_KEEPALIVE",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChunk",
    "Model",
    "ModelList",
    "UsageInfo",
    "new_completion_id",
    "sse_event",
]

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip it, idle timers restart
_encoder = msgspec.json.Encoder()


def new_completion_id(kind: Literal["chat", "completion"]) -> str:
    """``chatcmpl-…`` or ``cmpl-…``, as OpenAI names them."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def sse_event(message: msgspec.Struct) -> bytes:
    """One server-sent event carrying ``message`` as JSON."""
    return b"data: " + _encoder.encode(message) + b"\n\n"


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: AssistantMessage
    finish_reason: str  # "stop" or "length"
    logprobs: None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a chunk adds: ``{"role": "assistant", "content": ""}`` first, then ``{"content": …}``,
    and ``{}`` with the finish reason (OpenAI omits what a chunk does not carry)."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    text: str
    finish_reason: str | None  # None on a streamed chunk before the last
    logprobs: None = None


class _Answer(msgspec.Struct, kw_only=True):
    """What the two whole answers share; each names its ``object`` and choice type."""

    id: str
    object: str = ""
    created: int
    model: str
    choices: list[Any]
    usage: UsageInfo
    system_fingerprint: str | None = None

    @classmethod
    def of(
        cls,
        completion_id: str,
        created: int,
        model: str,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> Self:
        usage = UsageInfo.of(prompt_tokens, completion_tokens, cached_tokens)
        choices = [cls._choice(text, finish_reason)]
        return cls(id=completion_id, created=created, model=model, choices=choices, usage=usage)

    @classmethod
    def _choice(cls, text: str, finish_reason: str) -> Any:
        raise NotImplementedError


class ChatCompletion(_Answer, kw_only=True):
    """A whole chat answer (``stream: false``)."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]

    @classmethod
    def _choice(cls, text: str, finish_reason: str) -> ChatChoice:
        return ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)


class Completion(_Answer, kw_only=True):
    """A whole text completion (``stream: false``)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]

    @classmethod
    def _choice(cls, text: str, finish_reason: str) -> CompletionChoice:
        return CompletionChoice(text=text, finish_reason=finish_reason)


class _Chunk(msgspec.Struct, kw_only=True):
    """What the two streams' chunks share. The class methods give a stream's SSE events in
    order: (chat only: ``role``), ``text`` …, ``finish``, then ``usage_only`` (``choices: []``)
    if the client asked for usage. The other chunks carry ``"usage": null``, as OpenAI's do with
    ``include_usage`` (without it OpenAI leaves the field out; clients read both as none)."""

    id: str
    object: str = ""
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Any]
    usage: UsageInfo | None = None

    @classmethod
    def text(cls, completion_id: str, created: int, model: str, text: str) -> bytes:
        return cls._event(completion_id, created, model, [cls._choice(text, None)])

    @classmethod
    def finish(cls, completion_id: str, created: int, model: str, finish_reason: str) -> bytes:
        return cls._event(completion_id, created, model, [cls._choice(None, finish_reason)])

    @classmethod
    def usage_only(
        cls,
        completion_id: str,
        created: int,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> bytes:
        usage = UsageInfo.of(prompt_tokens, completion_tokens, cached_tokens)
        return cls._event(completion_id, created, model, [], usage)

    @classmethod
    def _event(
        cls,
        completion_id: str,
        created: int,
        model: str,
        choices: list[Any],
        usage: UsageInfo | None = None,
    ) -> bytes:
        return sse_event(
            cls(id=completion_id, created=created, model=model, choices=choices, usage=usage)
        )

    @classmethod
    def _choice(cls, text: str | None, finish_reason: str | None) -> Any:
        raise NotImplementedError


class ChatCompletionChunk(_Chunk, kw_only=True):
    """One event of a streamed chat answer."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]

    @classmethod
    def role(cls, completion_id: str, created: int, model: str) -> bytes:
        """The first event: the assistant's role and no text yet."""
        choice = ChatChunkChoice(delta=Delta(role="assistant", content=""))
        return cls._event(completion_id, created, model, [choice])

    @classmethod
    def _choice(cls, text: str | None, finish_reason: str | None) -> ChatChunkChoice:
        return ChatChunkChoice(delta=Delta(content=text), finish_reason=finish_reason)


class CompletionChunk(_Chunk, kw_only=True):
    """One event of a streamed text completion; OpenAI's ``object`` is ``text_completion`` here
    too."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]

    @classmethod
    def _choice(cls, text: str | None, finish_reason: str | None) -> CompletionChoice:
        return CompletionChoice(text=text or "", finish_reason=finish_reason)


class Model(msgspec.Struct, kw_only=True):
    """A model or an alias a tenant may use. Beyond OpenAI's fields, as vLLM's: ``root``, the
    model's id (an alias's target), and ``max_model_len``, its context length (0 while no worker
    of its pool is ready and none was ever seen)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(msgspec.Struct, kw_only=True):
    """The body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[Model]

    @classmethod
    def of(
        cls,
        names: Sequence[tuple[str, str, int]],
        *,
        created: int | None = None,
        owned_by: str = "fairgate",
    ) -> ModelList:
        """``names``: (id or alias, its model's id, context length); ``created`` defaults to
        now."""
        at = int(time.time()) if created is None else created
        return cls(
            data=[
                Model(id=name, created=at, owned_by=owned_by, root=root, max_model_len=length)
                for name, root, length in names
            ]
        )
