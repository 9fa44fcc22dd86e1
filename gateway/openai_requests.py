"""The request bodies of OpenAI's Chat Completions and Completions APIs, decoded and checked into a
``GenerationRequest`` (the answers are ``gateway.openai_responses``).

The request structs name every parameter OpenAI accepts and the values we take, and refuse
anything else (400 naming the parameter); the OpenAPI document (``gateway.openapi_document``) is
generated from them, so what it says is valid is what is accepted. Each parameter is in one of
three groups:

- **used**: ``model``, ``messages`` (roles system, developer → system, user, assistant; content a
  string or a non-empty list of text parts, joined with ``"\\n"``), ``prompt`` (one non-empty
  string, or one non-empty list of token ids, or a list holding one of those), ``max_tokens``,
  ``max_completion_tokens`` (chat; the same limit under its newer name: give one of the two),
  ``temperature``, ``top_p``, ``seed`` (a signed 64-bit integer), ``stop``, ``stream``,
  ``stream_options.include_usage`` (only with ``stream: true``), ``n`` (1 only), ``user``; and
  fairgate's ``fairgate_class`` (the SLO class, like the ``X-Fairgate-Class`` header; one of the
  configured classes, which the document lists).
- **accepted, no effect here**: ``metadata``, ``parallel_tool_calls``, ``prompt_cache_key``,
  ``prompt_cache_options``, ``prompt_cache_retention``, ``safety_identifier``,
  ``stream_options.include_obfuscation``, a message's ``name``, a text part's
  ``prompt_cache_breakpoint``.
- **neutral value only** (the schema allows only that value; anything else is
  ``UnsupportedParameter``): ``frequency_penalty`` and ``presence_penalty`` (0), ``logit_bias``
  ({}), ``logprobs`` (false; completions: none), ``top_logprobs`` (0), ``tools`` and
  ``functions`` ([]), ``tool_choice`` and ``function_call`` ("none"), ``response_format``
  ({"type": "text"}), ``modalities`` (["text"]), ``audio``, ``moderation``, ``prediction``,
  ``web_search_options`` (none), ``reasoning_effort`` ("none"), ``verbosity`` ("medium"),
  ``service_tier`` ("auto", "default"), ``store`` (false), ``best_of`` (1), ``echo`` (false),
  ``suffix`` (""); in messages ``tool_calls`` ([]), ``function_call``, ``audio``, ``refusal``,
  ``tool_call_id`` (none), the roles tool and function, and content parts other than text.
  ``null`` always counts as not given.

Errors are ``ClientError`` (400) with ``param`` set to the top-level parameter at fault; a body
that is not JSON is ``InvalidJson``. Torch-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec

from gateway.errors import ClientError, UnsupportedParameter
from gateway.openapi_document import (
    TOKEN_ID,
    component_ref,
    decode_json,
    error_param,
    json_integers,
)
from gateway.tenants import SloClassName

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_TOKENS_LIMIT",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequest",
    "InvalidJson",
    "StreamOptions",
    "TextPart",
    "parse_chat_request",
    "parse_completion_request",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Far past any model's context: a larger limit asks for nothing a smaller one does not, and
# keeping it this size keeps it an ordinary integer everywhere it travels.
MAX_TOKENS_LIMIT = 1 << 20

MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]
# What the workers' messages carry (msgpack: a larger integer does not encode) and OpenAI's own
# bound for it.
Seed = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
StopString = Annotated[str, msgspec.Meta(min_length=1)]
Stop = StopString | Annotated[list[StopString], msgspec.Meta(max_length=4)]
JsonObject = dict[str, Any]
# The neutral values, as types: only that value is valid.
Zero = Annotated[float, msgspec.Meta(ge=0, le=0)]
EmptyList = Annotated[list[JsonObject], msgspec.Meta(max_length=0)]
EmptyObject = Annotated[dict[str, int], msgspec.Meta(max_length=0)]

# ``prompt``: msgspec takes one array type in a union, so the struct says ``str | list[Any]``,
# ``_prompt`` checks the rest, and the document says exactly what it accepts (under ``allOf``:
# msgspec's own keywords win over ``extra_json_schema``'s, and a conjunction narrows them). A
# prompt string is never empty: there is nothing to continue (the tokenizer gives no token).
_PROMPT_STRING = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "items": component_ref(TOKEN_ID), "minItems": 1}
_PROMPT_SCHEMA = {
    "allOf": [
        {
            "anyOf": [
                _PROMPT_STRING,
                {"type": "array", "items": _PROMPT_STRING, "minItems": 1, "maxItems": 1},
                _TOKEN_IDS,
                {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
            ]
        }
    ],
    "description": "A string, a list of token ids, or a list holding one of those (one prompt "
    "per request)",
}
Prompt = Annotated[str | list[Any], msgspec.Meta(extra_json_schema=_PROMPT_SCHEMA)]

# ``stream_options`` needs ``stream: true`` (null counts as not given).
_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
}


class InvalidJson(ClientError):
    """The body is not JSON at all."""

    code = "invalid_json"


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # we never pad chunks, so there is nothing to turn off


class TextPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One part of a message's content: only text parts are supported."""

    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: JsonObject | None = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], msgspec.Meta(min_length=1)]
    name: str | None = None
    refusal: None = None
    tool_calls: EmptyList | None = None
    tool_call_id: None = None
    function_call: None = None
    audio: None = None


class TextResponseFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["text"]


class _RequestBase(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The parameters both APIs accept. ``json_schema_extra``: what the document adds to the
    struct's own schema (``gateway.openapi_document``): rules between parameters."""

    json_schema_extra: ClassVar[dict[str, Any]] = {"allOf": [_STREAM_OPTIONS_NEED_STREAM]}

    model: str
    fairgate_class: SloClassName | None = None
    frequency_penalty: Zero | None = None
    logit_bias: EmptyObject | None = None
    max_tokens: MaxTokens | None = None
    n: Literal[1] | None = None
    presence_penalty: Zero | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None


class ChatCompletionRequest(_RequestBase, kw_only=True):
    """The body of ``POST /v1/chat/completions``."""

    json_schema_extra: ClassVar[dict[str, Any]] = {
        "allOf": [
            _STREAM_OPTIONS_NEED_STREAM,
            {  # one limit under two names: one of them
                "not": {
                    "properties": {
                        "max_tokens": {"type": "integer"},
                        "max_completion_tokens": {"type": "integer"},
                    },
                    "required": ["max_tokens", "max_completion_tokens"],
                }
            },
        ]
    }

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    audio: None = None
    function_call: Literal["none"] | None = None
    functions: EmptyList | None = None
    logprobs: Literal[False] | None = None
    max_completion_tokens: MaxTokens | None = None
    metadata: dict[str, str] | None = None
    modalities: (
        Annotated[list[Literal["text"]], msgspec.Meta(min_length=1, max_length=1)] | None
    ) = None
    moderation: None = None
    parallel_tool_calls: bool | None = None
    prediction: None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: JsonObject | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: Literal["none"] | None = None
    response_format: TextResponseFormat | None = None
    safety_identifier: str | None = None
    service_tier: Literal["auto", "default"] | None = None
    store: Literal[False] | None = None
    tool_choice: Literal["none"] | None = None
    tools: EmptyList | None = None
    top_logprobs: Literal[0] | None = None
    verbosity: Literal["medium"] | None = None
    web_search_options: None = None


class CompletionRequest(_RequestBase, kw_only=True):
    """The body of ``POST /v1/completions``."""

    prompt: Prompt
    best_of: Literal[1] | None = None
    echo: Literal[False] | None = None
    logprobs: None = None
    suffix: Literal[""] | None = None


# The values each neutral-only parameter may take, for the error that names them (the types
# above are what enforces them; a test checks the two agree).
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
    request = _decode(body, ChatCompletionRequest, _CHAT_NEUTRAL)
    max_tokens = request.max_tokens
    if request.max_completion_tokens is not None:
        if max_tokens is not None:
            raise ClientError(
                "max_tokens and max_completion_tokens are the same limit under two names; "
                "give one of them",
                param="max_completion_tokens",
            )
        max_tokens = request.max_completion_tokens
    messages = [_message(message) for message in request.messages]
    return _generation_request(request, "chat", max_tokens=max_tokens, messages=messages)


def parse_completion_request(body: bytes) -> GenerationRequest:
    """Decode and check a (legacy) Completions body; raises ``ClientError``."""
    request = _decode(body, CompletionRequest, _COMPLETION_NEUTRAL)
    prompt, prompt_token_ids = _prompt(request.prompt)
    return _generation_request(
        request,
        "completion",
        max_tokens=request.max_tokens,
        prompt=prompt,
        prompt_token_ids=prompt_token_ids,
    )


_R = TypeVar("_R", bound=_RequestBase)


def _decode(body: bytes, request_type: type[_R], neutral: Mapping[str, tuple[Any, ...]]) -> _R:
    try:
        return decode_json(body, request_type)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        raise _refusal(body, str(exc), neutral) from exc
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from exc


def _refusal(body: bytes, error: str, neutral: Mapping[str, tuple[Any, ...]]) -> ClientError:
    """The error for a body its type refused: ``UnsupportedParameter`` where the value at fault
    is one we do not support (a neutral-only parameter's other values, a tool message, …), else
    the decoder's own message."""
    param = error_param(error)
    if param is None and error.startswith("Expected `object`"):
        return ClientError(f"the body must be a JSON object: {error}")
    if param is not None:
        try:
            raw = msgspec.json.decode(body)
        except msgspec.DecodeError:  # a number out of range: the decoder's message says so
            raw = None
        if isinstance(raw, dict):
            unsupported = _unsupported(raw, param, error, neutral)
            if unsupported is not None:
                return unsupported
    return ClientError(f"invalid request: {error}", param=param)


def _path_of(error: str) -> str:
    return error.rsplit(" - at `$.", 1)[1].rstrip("`")


def _unsupported(
    raw: dict[str, Any], param: str, error: str, neutral: Mapping[str, tuple[Any, ...]]
) -> UnsupportedParameter | None:
    if param in neutral:
        return _not_neutral(param, neutral[param], param)
    value = raw.get(param)
    if param == "n" and type(value) is int and value > 1:
        return UnsupportedParameter("only n=1 is supported", param="n")
    if param == "messages" and isinstance(value, list):
        index = re.match(r"messages\[(\d+)\]", _path_of(error)) if " - at `$." in error else None
        if index is not None and int(index.group(1)) < len(value):
            message = value[int(index.group(1))]
            if isinstance(message, dict):
                return _unsupported_in_message(f"messages[{index.group(1)}]", message)
    return None


def _unsupported_in_message(where: str, message: dict[str, Any]) -> UnsupportedParameter | None:
    role = message.get("role")
    if role in ("tool", "function"):
        return UnsupportedParameter(
            f"{where}: role {role!r} is not supported (no tool calling)", param="messages"
        )
    for name, allowed in _MESSAGE_NEUTRAL.items():
        if message.get(name) not in allowed:
            return _not_neutral(f"{where}.{name}", allowed, "messages")
    content = message.get("content")
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and part.get("type", "text") != "text":
            return UnsupportedParameter(
                f"{where}: content parts of type {part['type']!r} are not supported; only text",
                param="messages",
            )
    return None


def _not_neutral(name: str, allowed: tuple[Any, ...], param: str) -> UnsupportedParameter:
    shown = " or ".join("null" if v is None else msgspec.json.encode(v).decode() for v in allowed)
    return UnsupportedParameter(
        f"{name} is not supported here; it may only be {shown}", param=param
    )


def _generation_request(
    request: _RequestBase,
    kind: Literal["chat", "completion"],
    *,
    max_tokens: int | None,
    messages: list[dict[str, str]] | None = None,
    prompt: str | None = None,
    prompt_token_ids: list[int] | None = None,
) -> GenerationRequest:
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


def _message(message: ChatMessage) -> dict[str, str]:
    content = message.content
    if not isinstance(content, str):
        content = "\n".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content}


def _prompt(prompt: str | list[Any]) -> tuple[str | None, list[int] | None]:
    """``(prompt, None)`` or ``(None, prompt_token_ids)``; refuses what ``_PROMPT_SCHEMA`` does."""
    prompt = json_integers(prompt)  # a token id of 5.0 is 5, as the schema reads it
    if isinstance(prompt, str):
        return _prompt_text(prompt), None
    if _is_token_ids(prompt):
        return None, list(prompt)
    if len(prompt) > 1 and all(isinstance(p, str) or _is_token_ids(p) for p in prompt):
        raise UnsupportedParameter("only one prompt per request is supported", param="prompt")
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return _prompt_text(prompt[0]), None
    if len(prompt) == 1 and _is_token_ids(prompt[0]):
        return None, list(prompt[0])
    raise ClientError(
        "prompt must be a non-empty string, a non-empty list of token ids (integers ≥ 0), or a "
        "list holding one of those",
        param="prompt",
    )


def _prompt_text(text: str) -> str:
    if not text:
        raise ClientError("the prompt is empty", param="prompt")
    return text


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int and t >= 0 for t in value)
