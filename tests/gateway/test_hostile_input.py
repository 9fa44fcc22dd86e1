"""Hostile input against a real stack (the tiny model on real prefill and decode workers): each
request is answered, none takes a worker or the gateway down, and right after it every tenant's
next request is served normally."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack

TENANTS = ("hostile", "alice", "bob")
PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(tmp_path_factory.mktemp("hostile"), engine="tiny")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def keys(tiny_stack: Stack) -> dict[str, str]:
    admin = {"authorization": f"Bearer {tiny_stack.admin_token}"}
    found = {}
    with httpx.Client(base_url=tiny_stack.base_url, headers=admin, timeout=30.0) as client:
        for name in TENANTS:
            assert client.post("/admin/v1/tenants", json={"name": name}).status_code == 201
            key = client.post(f"/admin/v1/tenants/{name}/keys", json={"name": "k"})
            found[name] = key.json()["secret"]
    return found


def _chat(stack: Stack, key: str, **body: Any) -> httpx.Response:
    with httpx.Client(base_url=stack.base_url, timeout=60.0) as client:
        model = client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        request = {"model": model.json()["data"][0]["id"], "messages": PROMPT, **body}
        return client.post(
            "/v1/chat/completions", json=request, headers={"authorization": f"Bearer {key}"}
        )


def _everyone_is_served(stack: Stack, keys: dict[str, str]) -> None:
    for name, key in keys.items():
        answer = _chat(stack, key, max_tokens=8, temperature=0)
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["usage"]["completion_tokens"] >= 1


def test_a_subnormal_temperature_is_greedy_and_kills_nothing(
    tiny_stack: Stack, keys: dict[str, str]
) -> None:
    """``temperature: 1e-39`` is inside the API's range; dividing the logits by it gave NaN and
    killed the prefill worker's engine for good. Now it is greedy: the same tokens as 0."""
    hostile = keys["hostile"]
    tiny = _chat(tiny_stack, hostile, max_tokens=8, temperature=1e-39)
    greedy = _chat(tiny_stack, hostile, max_tokens=8, temperature=0)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0] == greedy.json()["choices"][0]
    _everyone_is_served(tiny_stack, keys)


def test_a_seed_beyond_64_bits_is_a_400_naming_it(tiny_stack: Stack, keys: dict[str, str]) -> None:
    answer = _chat(tiny_stack, keys["hostile"], max_tokens=8, seed=2**70)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "seed"
    _everyone_is_served(tiny_stack, keys)


def test_a_five_megabyte_prompt_is_refused_before_it_is_tokenized(
    tiny_stack: Stack, keys: dict[str, str]
) -> None:
    huge = [{"role": "user", "content": "word " * 1_000_000}]
    answer = _chat(tiny_stack, keys["hostile"], max_tokens=8, messages=huge)
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "messages")
    assert "at least" in error["message"]  # known from its length: never tokenized
    _everyone_is_served(tiny_stack, keys)


def test_a_body_over_the_limit_is_a_413(tiny_stack: Stack, keys: dict[str, str]) -> None:
    answer = _chat(
        tiny_stack,
        keys["hostile"],
        max_tokens=8,
        messages=[{"role": "user", "content": "x"}],
        user="u" * (9 << 20),
    )
    assert answer.status_code == 413, answer.text[:300]
    assert answer.json()["error"]["code"] == "request_too_large"
    _everyone_is_served(tiny_stack, keys)
