"""The official ``openai`` SDK against a real local stack (gateway + prefill + decode worker
processes, null engine): completions, streaming, usage, stop strings, seeds, and every error with
the SDK's matching exception class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from deploy.stack import Stack

NewTenant = Callable[..., tuple[dict[str, Any], str]]


_opened: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def _client(stack: Stack, key: str | None = None) -> openai.OpenAI:
    """A client closed after the test."""
    client = openai.OpenAI(
        base_url=stack.base_url + "/v1", api_key=key or stack.demo_key, max_retries=0, timeout=60
    )
    _opened.append(client)
    return client


def _model(stack: Stack) -> str:
    return _client(stack).models.list().data[0].id


def _chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    messages = kwargs.pop("messages", [{"role": "user", "content": "Tell me a story."}])
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def test_models_lists_the_served_model(stack: Stack) -> None:
    models = _client(stack).models.list().data
    assert [m.id for m in models] == ["null"]
    assert models[0].object == "model"


def test_chat_completion_with_usage(stack: Stack) -> None:
    completion = _chat(_client(stack), _model(stack), max_tokens=12, seed=1)
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert choice.message.content
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens > 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(stack: Stack) -> None:
    client, model = _client(stack), _model(stack)
    whole = _chat(client, model, max_tokens=20, seed=7)
    chunks = list(
        _chat(
            client,
            model,
            max_tokens=20,
            seed=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_streamed_and_not(stack: Stack) -> None:
    client, model = _client(stack), _model(stack)
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, seed=3)
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.completion_tokens == 10
    streamed = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=10, seed=3, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_repeated_prompt_reports_cached_tokens(stack: Stack) -> None:
    client, model = _client(stack), _model(stack)
    messages = [{"role": "user", "content": "cache me " * 100}]
    first = _chat(client, model, messages=messages, max_tokens=2)
    second = _chat(client, model, messages=messages, max_tokens=2)
    # The first sees at most the chat template's opening (other tests' prompts share it).
    assert first.usage.prompt_tokens_details.cached_tokens <= 32
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16  # every whole block but the last


def test_seed_determinism(stack: Stack) -> None:
    client, model = _client(stack), _model(stack)
    texts = [
        _chat(client, model, max_tokens=16, seed=s).choices[0].message.content for s in (11, 11, 12)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_stop_string_cuts_the_answer(stack: Stack) -> None:
    client, model = _client(stack), _model(stack)
    full = _chat(client, model, max_tokens=40, seed=5).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = _chat(client, model, max_tokens=40, seed=5, stop=[stop], stream=True)
            parts = [
                (c.choices[0].delta.content or "", c.choices[0].finish_reason)
                for c in chunks
                if c.choices
            ]
            text = "".join(p for p, _ in parts)
            reason = next(r for _, r in parts if r)
        else:
            answer = _chat(client, model, max_tokens=40, seed=5, stop=stop)
            text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert text == expected
        assert reason == "stop"


# ---- errors --------------------------------------------------------------------------------


def test_unsupported_parameter_is_a_400_naming_it(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(_client(stack), _model(stack), n=2)
    assert caught.value.status_code == 400
    assert caught.value.param == "n"


def test_bad_json_is_a_400(stack: Stack) -> None:
    response = httpx.post(
        stack.base_url + "/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {stack.demo_key}", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_context_length_exceeded(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(_client(stack), _model(stack), max_tokens=1_000_000)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "max_tokens"


def test_missing_and_unknown_keys_are_401(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(stack, "fg-not-a-key").models.list()
    response = httpx.get(stack.base_url + "/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_revoked_key_is_403(stack: Stack, admin: Any, new_tenant: NewTenant) -> None:
    tenant, secret = new_tenant()
    [key] = admin("keys", "list", "--tenant", tenant["name"])["data"]
    _client(stack, secret).models.list()
    admin("keys", "revoke", key["key_id"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _client(stack, secret).models.list()
    assert caught.value.code == "key_revoked"


def test_class_not_allowed_is_403(stack: Stack, new_tenant: NewTenant) -> None:
    _, secret = new_tenant("--allowed-classes", "standard,batch", "--default-class", "standard")
    client = _client(stack, secret)
    _chat(client, _model(stack), max_tokens=1, extra_headers={"x-fairgate-class": "batch"})
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _chat(
            client, _model(stack), max_tokens=1, extra_headers={"x-fairgate-class": "interactive"}
        )
    assert caught.value.code == "slo_class_not_allowed"


def test_unknown_model_is_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        _chat(_client(stack), "gpt-17", max_tokens=1)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_rate_limit_headers_count_down_per_request(stack: Stack, new_tenant: NewTenant) -> None:
    """OpenAI's x-ratelimit-* headers on the real stack, read through the SDK: the remaining
    requests go down by one per request, a 429 carries them at 0 (its reset: when the window is
    full again, which ``test_rate_limit_headers.py`` waits out on a fake clock)."""
    _, secret = new_tenant("--rpm", "3", "--tpm", "100000")
    client, model = _client(stack, secret), _model(stack)
    remaining = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as refused:
        _chat(client, model, max_tokens=2)
    headers = refused.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
