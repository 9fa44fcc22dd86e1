"""``gateway.openai_requests``: request bodies → ``GenerationRequest`` (and every refusal with its
``param``), and the OpenAPI document's schemas of them accepting exactly what the parser does."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.errors import ClientError, UnsupportedParameter
from gateway.openai_requests import (
    _CHAT_NEUTRAL,
    _COMPLETION_NEUTRAL,
    _MESSAGE_NEUTRAL,
    INT64_MAX,
    INT64_MIN,
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    InvalidJson,
    parse_chat_request,
    parse_completion_request,
)
from gateway.openapi_document import Deployment, Endpoint, error_param, openapi_document
from gateway.tenants import TenantPatch

USER_HI = [{"role": "user", "content": "hi"}]


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def chat(**fields: Any) -> GenerationRequest:
    return parse_chat_request(_encode({"model": "m", "messages": USER_HI, **fields}))


def completion(**fields: Any) -> GenerationRequest:
    return parse_completion_request(_encode({"model": "m", "prompt": "hi", **fields}))


def chat_error(**fields: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        chat(**fields)
    assert caught.value.status == 400
    return caught.value


def completion_error(**fields: Any) -> ClientError:
    with pytest.raises(ClientError) as caught:
        completion(**fields)
    assert caught.value.status == 400
    return caught.value


# ---- requests: what is used ---------------------------------------------------------------


def test_minimal_chat_request_gets_openai_defaults() -> None:
    assert chat() == GenerationRequest(
        kind="chat",
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        prompt=None,
        prompt_token_ids=None,
        max_tokens=None,
        temperature=1.0,
        top_p=1.0,
        seed=None,
        stop=(),
        stream=False,
        include_usage=False,
        user=None,
        slo_class=None,
    )


def test_every_supported_chat_parameter_is_parsed() -> None:
    request = chat(
        max_tokens=12,
        temperature=0.25,
        top_p=0.5,
        seed=-7,
        stop=["\n\n", "END"],
        stream=True,
        stream_options={"include_usage": True},
        user="alice",
        n=1,
        fairgate_class="batch",
    )
    assert request == GenerationRequest(
        kind="chat",
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0.25,
        top_p=0.5,
        seed=-7,
        stop=("\n\n", "END"),
        stream=True,
        include_usage=True,
        user="alice",
        slo_class="batch",
    )


def test_every_supported_completion_parameter_is_parsed() -> None:
    request = completion(
        prompt="Once upon",
        max_tokens=3,
        temperature=2,
        top_p=1,
        seed=5,
        stop="\n",
        stream=True,
        stream_options={"include_usage": False},
        user="bob",
        n=1,
        fairgate_class="interactive",
    )
    assert request == GenerationRequest(
        kind="completion",
        model="m",
        prompt="Once upon",
        max_tokens=3,
        temperature=2.0,
        top_p=1.0,
        seed=5,
        stop=("\n",),
        stream=True,
        include_usage=False,
        user="bob",
        slo_class="interactive",
    )


def test_null_means_not_given() -> None:
    nulls = dict.fromkeys(
        ["max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n"]
    )
    assert chat(**nulls, max_completion_tokens=None, user=None) == chat()
    assert completion(**nulls) == completion()


def test_stream_without_options_has_no_usage_chunk() -> None:
    request = chat(stream=True)
    assert (request.stream, request.include_usage) == (True, False)


def test_messages_roles_and_text_parts() -> None:
    messages = [
        {"role": "system", "content": "Be brief.", "name": "sys"},
        {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
        {
            "role": "user",
            "name": "alice",
            "content": [{"type": "text", "text": "Line one"}, {"type": "text", "text": "two"}],
        },
        {"role": "assistant", "content": "Ok.", "tool_calls": [], "refusal": None},
        {"role": "user", "content": ""},
    ]
    assert chat(messages=messages).messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "No lists."},
        {"role": "user", "content": "Line one\ntwo"},
        {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": ""},
    ]


@pytest.mark.parametrize(
    ("prompt", "text", "token_ids"),
    [
        ("hello", "hello", None),
        (["hello"], "hello", None),
        ([1, 2, 3], None, [1, 2, 3]),
        ([[4, 0]], None, [4, 0]),
    ],
)
def test_prompt_forms(prompt: Any, text: str | None, token_ids: list[int] | None) -> None:
    request = completion(prompt=prompt)
    assert (request.kind, request.messages) == ("completion", None)
    assert (request.prompt, request.prompt_token_ids) == (text, token_ids)


@pytest.mark.parametrize(
    ("fields", "max_tokens"),
    [
        ({}, None),
        ({"max_tokens": 5}, 5),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 9, "max_completion_tokens": None}, 9),
    ],
)
def test_chat_max_tokens_from_either_field(fields: dict[str, int], max_tokens: int | None) -> None:
    assert chat(**fields).max_tokens == max_tokens


@pytest.mark.parametrize("values", [(5, 6), (9, 9)])
def test_both_max_tokens_fields_are_refused(values: tuple[int, int]) -> None:
    # One limit under two names: the document says "one of them" (JSON Schema cannot say "the
    # same value"), so even equal values are refused.
    error = chat_error(max_tokens=values[0], max_completion_tokens=values[1])
    assert type(error) is ClientError
    assert error.param == "max_completion_tokens"
    assert "give one of them" in error.message


@pytest.mark.parametrize("seed", [INT64_MIN, -1, 0, INT64_MAX])
def test_seed_takes_any_signed_64_bit_integer(seed: int) -> None:
    assert chat(seed=seed).seed == seed


@pytest.mark.parametrize(
    ("fields", "parsed"),
    [
        ({"max_tokens": 5.0}, {"max_tokens": 5}),
        ({"max_completion_tokens": 1e3}, {"max_tokens": 1000}),
        ({"seed": -2.0}, {"seed": -2}),
        ({"n": 1.0, "top_logprobs": 0.0, "temperature": 1}, {"temperature": 1.0}),
    ],
)
def test_integer_parameters_take_integral_numbers(
    fields: dict[str, Any], parsed: dict[str, Any]
) -> None:
    # JSON Schema reads 5.0 as an integer, so the document accepts it: so do we.
    request = chat(**fields)
    assert {name: getattr(request, name) for name in parsed} == parsed
    assert type(request.max_tokens) is not float and type(request.seed) is not float


def test_token_ids_take_integral_numbers() -> None:
    assert completion(prompt=[1.0, 2]).prompt_token_ids == [1, 2]
    assert completion(prompt=[[4.0]]).prompt_token_ids == [4]


def test_completions_do_not_take_max_completion_tokens() -> None:
    error = completion_error(max_completion_tokens=5)
    assert error.param == "max_completion_tokens"
    assert "unknown field" in error.message


# ---- requests: refusals -------------------------------------------------------------------

IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("fields", "param", "error_type"),
    [
        ({"foo": 1}, "foo", ClientError),
        ({"n": 2}, "n", UnsupportedParameter),
        ({"n": 0}, "n", ClientError),
        ({"max_tokens": "10"}, "max_tokens", ClientError),
        ({"max_tokens": 0}, "max_tokens", ClientError),
        ({"max_tokens": True}, "max_tokens", ClientError),
        ({"max_completion_tokens": -1}, "max_completion_tokens", ClientError),
        ({"temperature": 2.01}, "temperature", ClientError),
        ({"temperature": -0.1}, "temperature", ClientError),
        ({"temperature": "hot"}, "temperature", ClientError),
        ({"top_p": 0}, "top_p", ClientError),
        ({"top_p": 1.5}, "top_p", ClientError),
        ({"seed": "x"}, "seed", ClientError),
        ({"seed": 1.5}, "seed", ClientError),
        ({"seed": 2**63}, "seed", ClientError),  # what the workers' messages cannot carry
        ({"seed": -(2**63) - 1}, "seed", ClientError),
        ({"seed": 2**70}, "seed", ClientError),
        ({"seed": 1e300}, "seed", ClientError),
        ({"max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens", ClientError),
        ({"max_tokens": 2.5}, "max_tokens", ClientError),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", ClientError),
        ({"stop": [""]}, "stop", ClientError),
        ({"stop": ""}, "stop", ClientError),
        ({"stop": 5}, "stop", ClientError),
        ({"stream": "yes"}, "stream", ClientError),
        ({"stream_options": {"include_usage": True}}, "stream_options", ClientError),
        (
            {"stream": False, "stream_options": {"include_usage": True}},
            "stream_options",
            ClientError,
        ),
        ({"stream": True, "stream_options": {"usage": True}}, "stream_options", ClientError),
        ({"user": 5}, "user", ClientError),
        ({"fairgate_class": 1}, "fairgate_class", ClientError),
        ({"model": None}, "model", ClientError),
        ({"messages": []}, "messages", ClientError),
        ({"messages": "hi"}, "messages", ClientError),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", ClientError),
        ({"messages": [{"role": "user", "content": "x", "mood": 1}]}, "messages", ClientError),
        ({"messages": [{"content": "x"}]}, "messages", ClientError),
        ({"messages": [{"role": "user"}]}, "messages", ClientError),
        ({"messages": [{"role": "user", "content": None}]}, "messages", ClientError),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages", ClientError),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "x": 1}]}]},
            "messages",
            ClientError,
        ),
        ({"messages": [{"role": "user", "content": []}]}, "messages", ClientError),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", ClientError),
        (
            {"messages": [{"role": "user", "content": [IMAGE_PART]}]},
            "messages",
            UnsupportedParameter,
        ),
        (
            {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
            "messages",
            UnsupportedParameter,
        ),
        (
            {"messages": [{"role": "function", "content": "42", "name": "f"}]},
            "messages",
            UnsupportedParameter,
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]},
            "messages",
            UnsupportedParameter,
        ),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}]},
            "messages",
            UnsupportedParameter,
        ),
        (
            {"messages": [{"role": "user", "content": [{"image_url": {}, "type": "image_url"}]}]},
            "messages",
            UnsupportedParameter,
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]},
            "messages",
            UnsupportedParameter,
        ),
    ],
)
def test_chat_refusals_name_their_param(
    fields: dict[str, Any], param: str, error_type: type[ClientError]
) -> None:
    error = chat_error(**fields)
    assert type(error) is error_type
    assert error.param == param
    assert error.code == (
        "unsupported_parameter" if error_type is UnsupportedParameter else "invalid_request"
    )


def test_unknown_field_message_names_it() -> None:
    error = chat_error(foo=1)
    assert error.message == "invalid request: Object contains unknown field `foo`"


def test_image_part_message_says_why() -> None:
    error = chat_error(messages=[{"role": "user", "content": [IMAGE_PART]}])
    assert "'image_url'" in error.message and "only text" in error.message


@pytest.mark.parametrize(
    ("prompt", "error_type"),
    [
        (["one", "two"], UnsupportedParameter),
        ([[1, 2], [3]], UnsupportedParameter),
        (["one", [3]], UnsupportedParameter),
        ([], ClientError),
        ([[]], ClientError),
        ("", ClientError),  # nothing to continue: the tokenizer gives no token for it
        ([""], ClientError),
        ([1.5], ClientError),
        ([[1], "a"], UnsupportedParameter),
        ([1, "a"], ClientError),
        ([-1, 2], ClientError),
        ([True], ClientError),
        ([1.5], ClientError),
        (None, ClientError),
        (7, ClientError),
    ],
)
def test_prompt_refusals(prompt: Any, error_type: type[ClientError]) -> None:
    error = completion_error(prompt=prompt)
    assert type(error) is error_type
    assert error.param == "prompt"


@pytest.mark.parametrize(
    ("parse", "body", "param"),
    [
        (parse_chat_request, {"messages": USER_HI}, "model"),
        (parse_chat_request, {"model": "m"}, "messages"),
        (parse_completion_request, {"prompt": "hi"}, "model"),
        (parse_completion_request, {"model": "m"}, "prompt"),
        (parse_completion_request, {"model": "m", "prompt": "hi", "messages": USER_HI}, "messages"),
        (parse_chat_request, {"model": "m", "messages": USER_HI, "prompt": "hi"}, "prompt"),
        (parse_chat_request, {"model": "m", "messages": USER_HI, "echo": False}, "echo"),
    ],
)
def test_missing_or_foreign_fields(parse: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse(_encode(body))
    assert caught.value.param == param


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model": "m",'])
@pytest.mark.parametrize("parse", [parse_chat_request, parse_completion_request])
def test_invalid_json(parse: Any, body: bytes) -> None:
    with pytest.raises(InvalidJson) as caught:
        parse(body)
    assert isinstance(caught.value, ClientError)
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    assert caught.value.param is None
    assert caught.value.message.startswith("the body is not valid JSON: ")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"hello"', b"null", b"3"])
def test_body_must_be_an_object(body: bytes) -> None:
    with pytest.raises(ClientError) as caught:
        parse_chat_request(body)
    assert type(caught.value) is ClientError
    assert caught.value.param is None
    assert caught.value.message.startswith("the body must be a JSON object")


# ---- requests: parameters we accept only at their neutral value ---------------------------

CHAT_NEUTRAL = [
    ("frequency_penalty", 0, 0.5),
    ("presence_penalty", 0.0, -1),
    ("logit_bias", {}, {"50256": -100}),
    ("logprobs", False, True),
    ("top_logprobs", 0, 3),
    ("tools", [], [{"type": "function", "function": {"name": "f"}}]),
    ("functions", [], [{"name": "f"}]),
    ("tool_choice", "none", "auto"),
    ("function_call", "none", {"name": "f"}),
    ("response_format", {"type": "text"}, {"type": "json_object"}),
    ("modalities", ["text"], ["text", "audio"]),
    ("audio", None, {"voice": "alloy", "format": "wav"}),
    ("prediction", None, {"type": "content", "content": "x"}),
    ("moderation", None, {"input": {"model": "omni-moderation-latest"}}),
    ("web_search_options", None, {}),
    ("reasoning_effort", "none", "high"),
    ("verbosity", "medium", "low"),
    ("service_tier", "auto", "flex"),
    ("service_tier", "default", "priority"),
    ("store", False, True),
]
COMPLETION_NEUTRAL = [
    ("frequency_penalty", 0, 1),
    ("presence_penalty", 0, 0.1),
    ("logit_bias", {}, {"1": 5}),
    ("logprobs", None, 0),
    ("best_of", 1, 2),
    ("echo", False, True),
    ("suffix", "", "the end"),
]


@pytest.mark.parametrize(("name", "neutral", "other"), CHAT_NEUTRAL)
def test_chat_neutral_only_parameters(name: str, neutral: Any, other: Any) -> None:
    assert chat(**{name: neutral}) == chat()
    assert chat(**{name: None}) == chat()
    error = chat_error(**{name: other})
    assert type(error) is UnsupportedParameter
    assert (error.status, error.param) == (400, name)


@pytest.mark.parametrize(("name", "neutral", "other"), COMPLETION_NEUTRAL)
def test_completion_neutral_only_parameters(name: str, neutral: Any, other: Any) -> None:
    assert completion(**{name: neutral}) == completion()
    error = completion_error(**{name: other})
    assert type(error) is UnsupportedParameter
    assert (error.status, error.param) == (400, name)


def test_neutral_error_message_says_what_is_allowed() -> None:
    assert chat_error(tool_choice="auto").message == (
        'tool_choice is not supported here; it may only be null or "none"'
    )


def test_accepted_parameters_without_effect() -> None:
    ignored = chat(
        metadata={"team": "search"},
        parallel_tool_calls=True,
        prompt_cache_key="k1",
        prompt_cache_options={"mode": "implicit"},
        prompt_cache_retention="24h",
        safety_identifier="hash",
        messages=[
            {
                "role": "user",
                "name": "alice",
                "content": [{"type": "text", "text": "hi", "prompt_cache_breakpoint": {}}],
            }
        ],
    )
    assert ignored == chat()
    streamed = chat(
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False}
    )
    assert (streamed.stream, streamed.include_usage) == (True, True)


def test_request_structs_make_an_openapi_schema() -> None:
    schemas, components = msgspec.json.schema_components(
        [ChatCompletionRequest, CompletionRequest], ref_template="#/components/schemas/{name}"
    )
    chat_schema = components["ChatCompletionRequest"]
    assert schemas[0] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat_schema["required"]) == {"model", "messages"}
    assert chat_schema["properties"]["temperature"]["anyOf"][0] == {
        "type": "number",
        "minimum": 0,
        "maximum": 2,
    }
    assert set(components["CompletionRequest"]["required"]) == {"model", "prompt"}


# ---- requests: the OpenAPI document says what is accepted ---------------------------------

VOCAB_SIZE = 1000


def _document_validators() -> dict[str, Any]:
    """JSON Schema validators of the two bodies as the document describes them, for a gateway
    with two SLO classes and a vocabulary of ``VOCAB_SIZE`` tokens."""
    import jsonschema_rs

    async def unused(request: Any) -> Any:
        raise AssertionError

    endpoints = [
        Endpoint("POST", "/chat", unused, "chat", "openai", request_body=ChatCompletionRequest),
        Endpoint("POST", "/text", unused, "text", "openai", request_body=CompletionRequest),
    ]
    document = openapi_document(
        endpoints, version="t", deployment=Deployment(["interactive", "batch"], VOCAB_SIZE)
    )
    components = document["components"]
    return {
        name: jsonschema_rs.Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": components}
        )
        for name in ("ChatCompletionRequest", "CompletionRequest")
    }


def _accepted(parse: Any, body: dict[str, Any]) -> bool:
    try:
        request = parse(_encode(body))
    except ClientError:
        return False
    token_ids = request.prompt_token_ids or []
    return all(t < VOCAB_SIZE for t in token_ids)  # the gateway's check, after parsing


CHAT = {"model": "m", "messages": USER_HI}
TEXT = {"model": "m", "prompt": "hi"}


@pytest.mark.parametrize(
    ("schema", "body"),
    [
        # What the tester found "valid by the document but refused".
        ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}),
        ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "user"}]}),
        ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "user", "content": None}]}),
        ("CompletionRequest", {**TEXT, "logprobs": 0}),
        ("CompletionRequest", {**TEXT, "prompt": [[]]}),
        ("CompletionRequest", {**TEXT, "seed": 2**70}),
        # The values around them.
        ("ChatCompletionRequest", CHAT),
        ("ChatCompletionRequest", {**CHAT, "messages": [{"role": "developer", "content": []}]}),
        ("ChatCompletionRequest", {**CHAT, "max_tokens": 3, "max_completion_tokens": 3}),
        ("ChatCompletionRequest", {**CHAT, "max_tokens": 3, "max_completion_tokens": None}),
        ("ChatCompletionRequest", {**CHAT, "stream_options": {}}),
        ("ChatCompletionRequest", {**CHAT, "stream_options": {}, "stream": True}),
        ("ChatCompletionRequest", {**CHAT, "stream_options": None, "stream": False}),
        ("ChatCompletionRequest", {**CHAT, "tool_choice": "none", "tools": []}),
        ("ChatCompletionRequest", {**CHAT, "tool_choice": "auto"}),
        ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "text"}}),
        ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "json_object"}}),
        ("ChatCompletionRequest", {**CHAT, "modalities": ["text", "text"]}),
        ("ChatCompletionRequest", {**CHAT, "logprobs": 0}),
        ("ChatCompletionRequest", {**CHAT, "n": 1.0, "seed": INT64_MIN}),
        ("ChatCompletionRequest", {**CHAT, "seed": INT64_MAX + 1}),
        ("ChatCompletionRequest", {**CHAT, "max_tokens": 7.0}),
        ("ChatCompletionRequest", {**CHAT, "max_tokens": 7.5}),
        ("CompletionRequest", {**TEXT, "prompt": ""}),
        ("CompletionRequest", {**TEXT, "prompt": [""]}),
        ("CompletionRequest", {**TEXT, "prompt": ["a", "b"]}),
        ("CompletionRequest", {**TEXT, "prompt": [VOCAB_SIZE - 1, 0]}),
        ("CompletionRequest", {**TEXT, "prompt": [[VOCAB_SIZE]]}),
        ("CompletionRequest", {**TEXT, "prompt": [3.0]}),
        ("CompletionRequest", {**TEXT, "prompt": [-1]}),
        ("CompletionRequest", {**TEXT, "prompt": [True]}),
        ("CompletionRequest", {**TEXT, "best_of": 1, "echo": False, "suffix": ""}),
        ("CompletionRequest", {**TEXT, "suffix": "x"}),
    ],
)
def test_the_document_and_the_parser_agree(schema: str, body: dict[str, Any]) -> None:
    is_valid = _document_validators()[schema].is_valid(body)
    parse = parse_chat_request if schema == "ChatCompletionRequest" else parse_completion_request
    assert _accepted(parse, body) == is_valid


@pytest.mark.parametrize(
    ("neutral", "parse"),
    [
        (_CHAT_NEUTRAL, parse_chat_request),
        (_COMPLETION_NEUTRAL, parse_completion_request),
    ],
)
def test_every_value_an_error_allows_is_accepted(
    neutral: dict[str, tuple[Any, ...]], parse: Any
) -> None:
    base = CHAT if parse is parse_chat_request else TEXT
    for name, allowed in neutral.items():
        for value in allowed:
            parse(_encode({**base, name: value}))
    for name, allowed in _MESSAGE_NEUTRAL.items():
        for value in allowed:
            message = {"role": "assistant", "content": "x", name: value}
            parse_chat_request(_encode({**CHAT, "messages": [message]}))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model_quotas": {"\x01": {}}}, "model_quotas"),  # a bad key of a mapping
        ({"model_quotas": {"m": {"tokens_per_minute": -1}}}, "model_quotas"),
        ({"weight": "x"}, "weight"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_refused_admin_body_names_its_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(msgspec.ValidationError) as refused:
        msgspec.json.decode(_encode(body), type=TenantPatch)
    assert error_param(str(refused.value)) == param
