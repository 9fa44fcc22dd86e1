"""OpenAI's Chat Completions and Completions bodies: requests decoded into a ``GenerationRequest``,
answers (whole or as server-sent events) and the model list encoded as OpenAI sends them.

The request structs name every parameter OpenAI accepts and refuse any other (400 naming it), so
each parameter falls into one of three groups:

- **used**: ``model``, ``messages`` (roles system, developer → system, user, assistant; content a
  string or text parts, joined with ``"\\n"``), ``prompt`` (one string, or one list of token ids),
  ``max_tokens``, ``max_completion_tokens`` (chat; must agree with ``max_tokens`` if both are
  given), ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
  ``stream_options.include_usage``, ``n`` (1 only), ``user``; and fairgate's ``fairgate_class``
  (the SLO class, like the ``X-Fairgate-Class`` header).
- **accepted, no effect here**: ``metadata``, ``parallel_tool_calls``, ``prompt_cache_key``,
  ``prompt_cache_options``, ``prompt_cache_retention``, ``safety_identifier``,
  ``stream_options.include_obfuscation``, a message's ``name``, a text part's
  ``prompt_cache_breakpoint``.
- **neutral value only** (anything else is ``UnsupportedParameter``): ``frequency_penalty`` and
  ``presence_penalty`` (0), ``logit_bias`` ({}), ``logprobs`` (false; completions: none),
  ``top_logprobs`` (0), ``tools`` and ``functions`` ([]), ``tool_choice`` and ``function_call``
  ("none"), ``response_format`` ({"type": "text"}), ``modalities`` (["text"]), ``audio``,
  ``moderation``, ``prediction``, ``web_search_options`` (none), ``reasoning_effort`` ("none"),
  ``verbosity`` ("medium"), ``service_tier`` ("auto", "default"), ``store`` (false),
  ``best_of`` (1), ``echo`` (false), ``suffix`` (""); in messages ``tool_calls`` ([]),
  ``function_call``, ``audio``, ``refusal``, ``tool_call_id`` (none), the roles tool and function,
  and content parts other than text. ``null`` always counts as not given.

Errors are ``ClientError`` (400) with ``param`` set to the top-level parameter at fault; a body
that is not JSON is ``InvalidJson``. Torch-free.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, TypeVar

import msgspec

from gateway.errors import ClientError, UnsupportedParameter

__all__ = [
    "SSE_DONE",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionChunk",
    "CompletionRequest",
    "ContentPart",
    "GenerationRequest",
    "InvalidJson",
    "Model",
    "ModelList",
    "StreamOptions",
    "UsageInfo",
    "new_completion_id",
    "parse_chat_request",
    "parse_completion_request",
    "sse_event",
]

SSE_DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
StopString = Annotated[str, msgspec.Meta(min_length=1)]
Stop = StopString | Annotated[list[StopString], msgspec.Meta(max_length=4)]
JsonObject = dict[str, Any]


class InvalidJson(ClientError):
    """The body is not JSON at all."""

    code = "invalid_json"


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # we never pad chunks, so there is nothing to turn off


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One part of a message's content; only ``{"type": "text", "text": …}`` is supported."""

    type: str
    text: str | None = None
    image_url: JsonObject | None = None
    input_audio: JsonObject | None = None
    file: JsonObject | None = None
    refusal: str | None = None
    prompt_cache_breakpoint: JsonObject | None = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[JsonObject] | None = None
    tool_call_id: str | None = None
    function_call: JsonObject | None = None
    audio: JsonObject | None = None


class _RequestBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The parameters both APIs accept."""

    model: str
    fairgate_class: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, int] | None = None
    max_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None


class ChatCompletionRequest(_RequestBase, kw_only=True):
    """The body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    audio: JsonObject | None = None
    function_call: str | JsonObject | None = None
    functions: list[JsonObject] | None = None
    logprobs: bool | None = None
    max_completion_tokens: PositiveInt | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    moderation: JsonObject | None = None
    parallel_tool_calls: bool | None = None
    prediction: JsonObject | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: JsonObject | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    response_format: JsonObject | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    tool_choice: str | JsonObject | None = None
    tools: list[JsonObject] | None = None
    top_logprobs: int | None = None
    verbosity: str | None = None
    web_search_options: JsonObject | None = None


class CompletionRequest(_RequestBase, kw_only=True):
    """The body of ``POST /v1/completions``."""

    prompt: str | list[Any]  # a string, strings, token ids, or lists of token ids
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None


_COMMON_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0.0),
    "presence_penalty": (None, 0.0),
    "logit_bias": (None, {}),
}
_CHAT_NEUTRAL: dict[str, tuple[Any, ...]] = {
    **_COMMON_NEUTRAL,
    "audio": (None,),
    "function_call": (None, "none"),
    "functions": (None, []),
    "logprobs": (None, False),
    "modalities": (None, ["text"]),
    "moderation": (None,),
    "prediction": (None,),
    "reasoning_effort": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "tool_choice": (None, "none"),
    "tools": (None, []),
    "top_logprobs": (None, 0),
    "verbosity": (None, "medium"),
    "web_search_options": (None,),
}
_COMPLETION_NEUTRAL: dict[str, tuple[Any, ...]] = {
    **_COMMON_NEUTRAL,
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None,),
    "suffix": (None, ""),
}
_MESSAGE_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tool_calls": (None, []),
    "function_call": (None,),
    "audio": (None,),
    "refusal": (None,),
    "tool_call_id": (None,),
}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What the gateway needs of either API's body. Exactly one of ``messages``, ``prompt`` and
    ``prompt_token_ids`` is set."""

    kind: Literal["chat", "completion"]
    model: str
    messages: list[dict[str, str]] | None = None  # {"role": system|user|assistant, "content"}
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None  # None: not given, the gateway chooses
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    slo_class: str | None = None


def parse_chat_request(body: bytes) -> GenerationRequest:
    """Decode and check a Chat Completions body; raises ``ClientError``."""
    request = _decode(body, ChatCompletionRequest)
    max_tokens = request.max_tokens
    if request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            raise ClientError(
                f"max_tokens ({max_tokens}) and max_completion_tokens "
                f"({request.max_completion_tokens}) disagree; give one of them",
                param="max_completion_tokens",
            )
        max_tokens = request.max_completion_tokens
    messages = [_message(i, message) for i, message in enumerate(request.messages)]
    return _generation_request(
        request, "chat", _CHAT_NEUTRAL, max_tokens=max_tokens, messages=messages
    )


def parse_completion_request(body: bytes) -> GenerationRequest:
    """Decode and check a (legacy) Completions body; raises ``ClientError``."""
    request = _decode(body, CompletionRequest)
    prompt, prompt_token_ids = _prompt(request.prompt)
    return _generation_request(
        request,
        "completion",
        _COMPLETION_NEUTRAL,
        max_tokens=request.max_tokens,
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
    )


_R = TypeVar("_R", bound=_RequestBase)


def _decode(body: bytes, request_type: type[_R]) -> _R:
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        param = _param_of(str(exc))
        if param is None and str(exc).startswith("Expected `object`"):
            raise ClientError(f"the body must be a JSON object: {exc}") from exc
        raise ClientError(f"invalid request: {exc}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from exc


def _param_of(error: str) -> str | None:
    """The top-level parameter a msgspec error names: ``… - at `$.stop[0]``` → ``stop``,
    ``Object contains unknown field `foo``` → ``foo``."""
    if " - at `$." in error:
        path = error.rsplit(" - at `$.", 1)[1].rstrip("`")
        return re.split(r"[.\[]", path, maxsplit=1)[0]
    match = re.search(r"(?:unknown|missing required) field `([^`]*)`", error)
    return match.group(1) if match else None


def _check_neutral(
    message: msgspec.Struct, neutral: Mapping[str, tuple[Any, ...]], where: str = ""
) -> None:
    for name, allowed in neutral.items():
        if getattr(message, name) not in allowed:
            shown = " or ".join(
                "null" if v is None else msgspec.json.encode(v).decode() for v in allowed
            )
            raise UnsupportedParameter(
                f"{where}{name} is not supported here; it may only be {shown}",
                param=where.split("[", 1)[0] if where else name,
            )


def _generation_request(
    request: _RequestBase,
    kind: Literal["chat", "completion"],
    neutral: Mapping[str, tuple[Any, ...]],
    *,
    max_tokens: int | None,
    messages: list[dict[str, str]] | None = None,
    prompt: str | None = None,
    prompt_token_ids: list[int] | None = None,
) -> GenerationRequest:
    _check_neutral(request, neutral)
    if request.n is not None and request.n > 1:
        raise UnsupportedParameter("only n=1 is supported", param="n")
    is_streamed = bool(request.stream)
    if request.stream_options is not None and not is_streamed:
        raise ClientError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    options = request.stream_options
    stop = request.stop
    return GenerationRequest(
        kind=kind,
        model=request.model,
        messages=messages,
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stream=is_streamed,
        include_usage=bool(options is not None and options.include_usage),
        user=request.user,
        slo_class=request.fairgate_class,
    )


def _message(index: int, message: ChatMessage) -> dict[str, str]:
    where = f"messages[{index}]"
    if message.role in ("tool", "function"):
        raise UnsupportedParameter(
            f"{where}: role {message.role!r} is not supported (no tool calling)", param="messages"
        )
    _check_neutral(message, _MESSAGE_NEUTRAL, where + ".")
    content = message.content
    if content is None:
        raise ClientError(f"{where} has no content", param="messages")
    if isinstance(content, list):
        if not content:
            raise ClientError(f"{where}.content is an empty list", param="messages")
        texts: list[str] = []
        for part in content:
            if part.type != "text":
                raise UnsupportedParameter(
                    f"{where}: content parts of type {part.type!r} are not supported; only text",
                    param="messages",
                )
            if part.text is None:
                raise ClientError(f"{where}: a text part has no text", param="messages")
            texts.append(part.text)
        content = "\n".join(texts)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def _prompt(prompt: str | list[Any]) -> tuple[str | None, list[int] | None]:
    """``(prompt, None)`` or ``(None, prompt_token_ids)``."""
    if isinstance(prompt, str):
        return prompt, None
    if _is_token_ids(prompt):
        return None, list(prompt)
    if len(prompt) > 1 and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        raise UnsupportedParameter("only one prompt per request is supported", param="prompt")
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], None
    if len(prompt) == 1 and _is_token_ids(prompt[0]):
        return None, list(prompt[0])
    raise ClientError(
        "prompt must be a string, a non-empty list of token ids (integers ≥ 0), or a list "
        "holding one of those",
        param="prompt",
    )


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


# ---- responses ------------------------------------------------------------------------------


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
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(msgspec.Struct, kw_only=True):
    """The body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[Model]

    @classmethod
    def of(
        cls, model_ids: Sequence[str], *, created: int | None = None, owned_by: str = "fairgate"
    ) -> ModelList:
        """``created`` defaults to now."""
        at = int(time.time()) if created is None else created
        return cls(data=[Model(id=m, created=at, owned_by=owned_by) for m in model_ids])
