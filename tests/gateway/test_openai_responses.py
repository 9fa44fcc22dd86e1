"""``gateway.openai_responses``: answers, stream chunks and the model list, as the official
``openai`` SDK reads them back, with the values we put in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
import msgspec
import openai
from openai.types import Completion as SdkCompletion
from openai.types import Model as SdkModel
from openai.types.chat import ChatCompletion as SdkChatCompletion
from openai.types.chat import ChatCompletionChunk as SdkChatCompletionChunk

from gateway.openai_responses import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Model,
    ModelList,
    new_completion_id,
    sse_event,
)

# ---- responses, read back by the openai SDK -----------------------------------------------


def _event_json(event: bytes) -> bytes:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return event[len(b"data: ") : -2]


def test_chat_completion_reads_back() -> None:
    body = ChatCompletion.of("chatcmpl-1", 1700000000, "m", "Hello!", "length", 11, 4, 8)
    raw = msgspec.json.encode(body)
    sdk = SdkChatCompletion.model_validate_json(raw)
    assert (sdk.id, sdk.object, sdk.created, sdk.model) == (
        "chatcmpl-1",
        "chat.completion",
        1700000000,
        "m",
    )
    [choice] = sdk.choices
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "length", None)
    assert (choice.message.role, choice.message.content) == ("assistant", "Hello!")
    assert sdk.usage is not None
    assert (sdk.usage.prompt_tokens, sdk.usage.completion_tokens, sdk.usage.total_tokens) == (
        11,
        4,
        15,
    )
    assert sdk.usage.prompt_tokens_details is not None
    assert sdk.usage.prompt_tokens_details.cached_tokens == 8
    assert sdk.system_fingerprint is None
    assert json.loads(raw)["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}


def test_completion_reads_back() -> None:
    body = Completion.of("cmpl-1", 1700000001, "m", " there", "stop", 3, 2)
    sdk = SdkCompletion.model_validate_json(msgspec.json.encode(body))
    assert (sdk.id, sdk.object, sdk.created, sdk.model) == (
        "cmpl-1",
        "text_completion",
        1700000001,
        "m",
    )
    [choice] = sdk.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (
        0,
        " there",
        "stop",
        None,
    )
    assert sdk.usage is not None
    assert (sdk.usage.prompt_tokens, sdk.usage.completion_tokens, sdk.usage.total_tokens) == (
        3,
        2,
        5,
    )
    assert sdk.usage.prompt_tokens_details is not None
    assert sdk.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_chunks_read_back() -> None:
    args = ("chatcmpl-2", 1700000002, "m")
    events = [
        ChatCompletionChunk.role(*args),
        ChatCompletionChunk.text(*args, "Hel"),
        ChatCompletionChunk.text(*args, "lo"),
        ChatCompletionChunk.finish(*args, "stop"),
        ChatCompletionChunk.usage_only(*args, 10, 2, 4),
    ]
    raws = [json.loads(_event_json(e)) for e in events]
    assert [r["choices"][0]["delta"] for r in raws[:4]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [r["usage"] for r in raws[:4]] == [None] * 4
    chunks = [SdkChatCompletionChunk.model_validate_json(_event_json(e)) for e in events]
    for chunk in chunks:
        assert (chunk.id, chunk.object, chunk.created, chunk.model) == (
            "chatcmpl-2",
            "chat.completion.chunk",
            1700000002,
            "m",
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[:4]] == ["", "Hel", "lo", None]
    assert [c.choices[0].finish_reason for c in chunks[:4]] == [None, None, None, "stop"]
    assert all(c.choices[0].index == 0 and c.usage is None for c in chunks[:4])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        10,
        2,
        12,
    )
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 4


def test_completion_chunks_read_back() -> None:
    args = ("cmpl-3", 1700000003, "m")
    text = json.loads(_event_json(CompletionChunk.text(*args, "Once")))
    assert text["object"] == "text_completion"
    assert text["choices"] == [
        {"index": 0, "text": "Once", "finish_reason": None, "logprobs": None}
    ]
    assert text["usage"] is None
    # The SDK's Completion type wants a finish reason; its stream reader does not check it, so
    # the text chunks are read through the SDK's stream below.
    finish = SdkCompletion.model_validate_json(_event_json(CompletionChunk.finish(*args, "length")))
    assert (finish.choices[0].text, finish.choices[0].finish_reason) == ("", "length")
    usage = SdkCompletion.model_validate_json(_event_json(CompletionChunk.usage_only(*args, 5, 1)))
    assert usage.choices == []
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.total_tokens) == (5, 6)


@contextmanager
def _sdk_serving(body: bytes, content_type: str) -> Iterator[openai.OpenAI]:
    """An SDK client whose every request is answered with ``body``."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    http_client = httpx2.Client(transport=httpx2.MockTransport(answer))
    with openai.OpenAI(
        base_url="http://fairgate.test/v1",
        api_key="fg-test",
        max_retries=0,
        http_client=http_client,
    ) as client:
        yield client


def test_sdk_reads_a_chat_stream() -> None:
    args = ("chatcmpl-4", 1700000004, "m")
    stream = b"".join(
        [
            ChatCompletionChunk.role(*args),
            ChatCompletionChunk.text(*args, "Hi"),
            ChatCompletionChunk.text(*args, " there"),
            ChatCompletionChunk.finish(*args, "length"),
            ChatCompletionChunk.usage_only(*args, 7, 2, 0),
            SSE_DONE,
        ]
    )
    with _sdk_serving(stream, "text/event-stream") as client:
        chunks = list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
    assert len(chunks) == 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [
        None,
        None,
        None,
        "length",
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_sdk_reads_a_completion_stream() -> None:
    args = ("cmpl-5", 1700000005, "m")
    stream = b"".join(
        [
            CompletionChunk.text(*args, "Once"),
            CompletionChunk.text(*args, " upon"),
            CompletionChunk.finish(*args, "stop"),
            SSE_DONE,
        ]
    )
    with _sdk_serving(stream, "text/event-stream") as client:
        chunks = list(client.completions.create(model="m", prompt="x", stream=True))
    assert [c.object for c in chunks] == ["text_completion"] * 3
    assert [c.choices[0].text for c in chunks] == ["Once", " upon", ""]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "stop"]


def test_sdk_reads_whole_answers_and_the_model_list() -> None:
    chat_body = msgspec.json.encode(ChatCompletion.of("chatcmpl-6", 1, "m", "yes", "stop", 2, 1))
    with _sdk_serving(chat_body, "application/json") as client:
        answer = client.chat.completions.create(model="m", messages=[])
    assert answer.choices[0].message.content == "yes"
    names = [("llama", "llama", 8192), ("chat-small", "null", 2048)]
    models_body = msgspec.json.encode(ModelList.of(names, created=1700000006))
    with _sdk_serving(models_body, "application/json") as client:
        models = client.models.list().data
    assert [(m.id, m.object, m.created, m.owned_by) for m in models] == [
        ("llama", "model", 1700000006, "fairgate"),
        ("chat-small", "model", 1700000006, "fairgate"),
    ]
    # vLLM's extra fields, which the SDK keeps: an alias's model, the context length.
    assert [m.model_extra for m in models] == [
        {"root": "llama", "max_model_len": 8192},
        {"root": "null", "max_model_len": 2048},
    ]


def test_model_list_body() -> None:
    listed = ModelList.of([("null", "null", 512)], created=5, owned_by="acme")
    body = json.loads(msgspec.json.encode(listed))
    assert body == {
        "object": "list",
        "data": [
            {
                "id": "null",
                "object": "model",
                "created": 5,
                "owned_by": "acme",
                "root": "null",
                "max_model_len": 512,
            }
        ],
    }
    sdk = SdkModel.model_validate(body["data"][0])
    assert (sdk.id, sdk.created, sdk.owned_by) == ("null", 5, "acme")


def test_model_list_created_defaults_to_now() -> None:
    import time

    before = int(time.time())
    [model] = ModelList.of([("null", "null", 512)]).data
    assert before <= model.created <= int(time.time())


# ---- helpers ------------------------------------------------------------------------------


def test_sse_event_framing() -> None:
    event = sse_event(Model(id="m", created=1, owned_by="o", root="m", max_model_len=4))
    assert event == (
        b'data: {"id":"m","object":"model","created":1,"owned_by":"o","root":"m",'
        b'"max_model_len":4}\n\n'
    )
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_completion_ids() -> None:
    chat_id, completion_id = new_completion_id("chat"), new_completion_id("completion")
    assert chat_id.startswith("chatcmpl-") and len(chat_id) == len("chatcmpl-") + 32
    assert completion_id.startswith("cmpl-") and len(completion_id) == len("cmpl-") + 32
    assert new_completion_id("chat") != chat_id
