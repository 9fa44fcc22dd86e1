"""The gateway's routes in process: the real app (``create_app``: gatekeeper, routes, admission,
dispatcher, generation, settlement) over SQLite in a temporary directory, called through
``httpx.ASGITransport``, with its worker a ``ScriptedWorker`` behind the gateway's worker
transport interface. What the tests see is what a client sees: statuses, OpenAI's bodies and
headers, the server-sent events; and what the worker was sent.

One gateway for the module (its tokenizer takes a moment to load); each test makes its own
tenants and scripts the worker afresh."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from engine.tokenizer import Tokenizer
from gateway.app import Gateway, create_app
from gateway.config import load_config
from tests.gateway.scripted_transport import Answer, ScriptedTransport, ScriptedWorker
from transfer.errors import RequestFailed, WorkerUnreachable

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_TOKEN = "a" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
WORKER_URL = "http://scripted-worker:8201"
MODEL = "scripted-model"
MAX_MODEL_LEN = 2048
HI = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass(frozen=True, slots=True)
class NewTenant:
    name: str
    key_id: str
    headers: dict[str, str]  # its key as a bearer token


class Served:
    """The app, a client of it, its worker and its tokenizer."""

    def __init__(self, client: httpx.AsyncClient, worker: ScriptedWorker, gateway: Gateway):
        self.client = client
        self.worker = worker
        self.tokenizer: Tokenizer = gateway.started.tokenizer

    def tokens(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))

    async def new_tenant(self, **spec: Any) -> NewTenant:
        """A tenant of its own, with ``spec`` (quotas, classes, …), and a key."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        created = await self.client.post(
            "/admin/v1/tenants", json={"name": name, **spec}, headers=ADMIN
        )
        assert created.status_code == 201, created.text
        key = await self.client.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=ADMIN)
        assert key.status_code == 201, key.text
        return NewTenant(name, key.json()["key"]["key_id"], bearer(key.json()["secret"]))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served_module(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    config = load_config(
        environ={},
        overrides={
            "gateway": {
                "admin_token": ADMIN_TOKEN,
                "colocated_workers": [WORKER_URL],
                # A shared machine's lag must not make this gateway refuse (test_overload.py
                # tests the guard).
                "max_loop_lag_s": 10.0,
            },
            "store": {"path": str(tmp_path_factory.mktemp("store") / "fairgate.db")},
            "model": {"name": "null"},  # the tokenizer (the default model's)
        },
    )
    worker = ScriptedWorker(WORKER_URL, MODEL, max_model_len=MAX_MODEL_LEN)
    transport = ScriptedTransport(worker)
    gateway = Gateway(config, transport=transport)
    app = create_app(gateway)
    async with (
        app.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
        ) as client,
    ):
        yield Served(client, worker, gateway)
    assert transport.is_closed  # the registry closed the transport when the gateway stopped


@pytest.fixture
def served(served_module: Served) -> Served:
    served_module.worker.reset()
    return served_module


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def sse_data(answer: httpx.Response) -> list[str]:
    """The ``data`` of each server-sent event, in order (comments are not events)."""
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.text.endswith("\n\n")
    events = [block for block in answer.text.split("\n\n") if block]
    return [event.removeprefix("data: ") for event in events if event.startswith("data: ")]


def assert_openai_error(
    answer: httpx.Response, status: int, error_type: str, code: str, param: str | None = None
) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (error_type, code, param)
    assert error["message"]
    return error


# ---- answers --------------------------------------------------------------------------------


async def test_a_chat_completion_is_the_workers_tokens_as_text_with_its_usage(
    served: Served,
) -> None:
    tenant = await served.new_tenant()
    output = served.tokens("The capital of France is Paris.")
    served.worker.answers.append(Answer(output, "stop", num_cached_tokens=3))
    answer = await served.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "max_tokens": 40, "temperature": 0, "seed": 7},
        headers=tenant.headers,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    prompt_token_ids = served.tokenizer.encode_chat(HI)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and answer.headers["x-request-id"] == body["id"]
    assert body["model"] == MODEL
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The capital of France is Paris."},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": len(prompt_token_ids),
        "completion_tokens": len(output),
        "total_tokens": len(prompt_token_ids) + len(output),
        "prompt_tokens_details": {"cached_tokens": 3},
    }
    assert "total;dur=" in answer.headers["server-timing"]
    # What the worker was asked: the chat template's tokens, the client's sampling, the
    # tenant's cache scope.
    [sent] = served.worker.requests
    assert sent.request_id == body["id"]
    assert sent.prompt_token_ids == prompt_token_ids
    assert (sent.sampling.max_tokens, sent.sampling.temperature, sent.sampling.seed) == (40, 0, 7)
    assert len(sent.cache_salt) == 16
    # Billed what the client received, once.
    usage = await served.client.get(
        f"/admin/v1/tenants/{tenant.name}/usage", params={"period": "day"}, headers=ADMIN
    )
    [row] = usage.json()["data"]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
        1,
        len(prompt_token_ids),
        len(output),
    )
    assert row["cached_tokens"] == 3


async def test_a_text_completion_stops_at_its_length(served: Served) -> None:
    tenant = await served.new_tenant()
    output = served.tokens(" upon a time")
    served.worker.answers.append(Answer(output, "length"))
    answer = await served.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Once", "max_tokens": len(output)},
        headers=tenant.headers,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert (choice["text"], choice["finish_reason"]) == (" upon a time", "length")
    [sent] = served.worker.requests
    assert sent.prompt_token_ids == served.tokenizer.encode("Once", add_special_tokens=True)
    assert body["usage"]["prompt_tokens"] == len(sent.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(output)


async def test_a_streamed_chat_answer_is_role_text_finish_usage_done(served: Served) -> None:
    tenant = await served.new_tenant()
    output = served.tokens("Paris, of course.")
    served.worker.answers.append(Answer(output, "stop"))
    answer = await served.client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": HI,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=tenant.headers,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-cache"
    *chunks, done = sse_data(answer)
    assert done == "[DONE]"
    events = [json.loads(chunk) for chunk in chunks]
    assert {event["id"] for event in events} == {answer.headers["x-request-id"]}
    assert {event["object"] for event in events} == {"chat.completion.chunk"}
    role, *texts, finish, usage = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(t["choices"][0]["delta"]["content"] for t in texts) == "Paris, of course."
    assert all(t["choices"][0]["finish_reason"] is None for t in texts)
    assert (finish["choices"][0]["delta"], finish["choices"][0]["finish_reason"]) == ({}, "stop")
    assert usage["choices"] == []
    prompt_tokens = len(served.tokenizer.encode_chat(HI))
    assert usage["usage"]["prompt_tokens"] == prompt_tokens
    assert usage["usage"]["completion_tokens"] == len(output)
    assert usage["usage"]["total_tokens"] == prompt_tokens + len(output)


async def test_a_streamed_completion_without_usage_asked_has_no_usage_event(
    served: Served,
) -> None:
    tenant = await served.new_tenant()
    served.worker.answers.append(Answer(served.tokens(" and on"), "length"))
    answer = await served.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "On", "max_tokens": 3, "stream": True},
        headers=tenant.headers,
    )
    assert answer.status_code == 200, answer.text
    *chunks, done = sse_data(answer)
    assert done == "[DONE]"
    events = [json.loads(chunk) for chunk in chunks]
    assert all(event["usage"] is None and event["choices"] for event in events)
    assert "".join(event["choices"][0]["text"] for event in events) == " and on"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_a_stop_string_ends_the_answer_and_the_request_on_the_worker(
    served: Served,
) -> None:
    tenant = await served.new_tenant()
    served.worker.answers.append(Answer(served.tokens(" one, two. Three, four."), "length"))
    answer = await served.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "Count:", "max_tokens": 20, "stop": "."},
        headers=tenant.headers,
    )
    assert answer.status_code == 200, answer.text
    [choice] = answer.json()["choices"]
    assert (choice["text"], choice["finish_reason"]) == (" one, two", "stop")
    assert served.worker.num_unfinished == 1  # the gateway stopped reading: aborted there


# ---- errors after the answer began, and from the workers ------------------------------------


async def test_a_worker_error_mid_stream_is_the_last_event(served: Served) -> None:
    tenant = await served.new_tenant()
    served.worker.answers.append(
        Answer(
            served.tokens("It is"),
            error=RequestFailed("NaN logits at 10.1.2.3:8201 in layer 7"),
        )
    )
    answer = await served.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "stream": True},
        headers=tenant.headers,
    )
    assert answer.status_code == 200  # the first token went out before the error
    events = sse_data(answer)
    assert "[DONE]" not in events
    role, *texts, last = (json.loads(event) for event in events)
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(t["choices"][0]["delta"]["content"] for t in texts) == "It is"
    error = last["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "request_failed",
        None,
    )
    # Ours, naming the request; the worker's own text (an internal address) stays in the log.
    assert answer.headers["x-request-id"] in error["message"]
    assert "10.1.2.3" not in answer.text and "NaN" not in answer.text


async def test_a_worker_error_before_a_whole_answer_is_its_status(served: Served) -> None:
    tenant = await served.new_tenant()
    served.worker.answers.append(Answer(served.tokens("It"), error=RequestFailed("boom")))
    answer = await served.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "Hi"}, headers=tenant.headers
    )
    error = assert_openai_error(answer, 500, "server_error", "request_failed")
    assert "boom" not in error["message"]


async def test_a_stream_whose_worker_breaks_off_goes_on_elsewhere_from_its_output(
    served: Served,
) -> None:
    """A migratable failure (the worker's stream broke off) mid-stream: the request is placed
    again with its output so far after the prompt, and the client's stream only pauses."""
    tenant = await served.new_tenant()
    first, rest = served.tokens("Paris is"), served.tokens(" the capital.")
    served.worker.answers.extend(
        [
            Answer(first, error=WorkerUnreachable("the stream broke")),
            Answer(rest, "stop"),
        ]
    )
    answer = await served.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HI, "stream": True, "seed": 11},
        headers=tenant.headers,
    )
    assert answer.status_code == 200, answer.text
    *chunks, done = sse_data(answer)
    assert done == "[DONE]"
    texts = [json.loads(chunk)["choices"][0]["delta"].get("content") for chunk in chunks]
    assert "".join(t for t in texts if t) == "Paris is the capital."
    original, resumed = served.worker.requests
    assert resumed.prompt_token_ids == [*original.prompt_token_ids, *first]
    assert resumed.num_prior_output_tokens == len(first)
    assert resumed.sampling.seed == original.sampling.seed == 11


# ---- refusals, in OpenAI's shape ------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "invalid_api_key"), (bearer("fg-not-a-key"), "invalid_api_key")],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_no_or_an_unknown_key_is_401(
    served: Served, headers: dict[str, str], code: str, path: str
) -> None:
    answer = await served.client.post(
        path, json={"model": MODEL, "messages": HI, "prompt": "x"}, headers=headers
    )
    assert_openai_error(answer, 401, "authentication_error", code)
    assert served.worker.requests == []


async def test_a_revoked_key_is_403(served: Served) -> None:
    tenant = await served.new_tenant()
    revoked = await served.client.post(f"/admin/v1/keys/{tenant.key_id}/revoke", headers=ADMIN)
    assert revoked.status_code == 200, revoked.text
    answer = await served.client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": HI}, headers=tenant.headers
    )
    assert_openai_error(answer, 403, "permission_error", "key_revoked")


@pytest.mark.parametrize("by", ["header", "body"])
async def test_a_class_the_tenant_may_not_use_is_403(served: Served, by: str) -> None:
    tenant = await served.new_tenant(allowed_classes=["standard"])
    body: dict[str, Any] = {"model": MODEL, "messages": HI}
    headers = dict(tenant.headers)
    if by == "header":
        headers["x-fairgate-class"] = "interactive"
    else:
        body["fairgate_class"] = "interactive"
    answer = await served.client.post("/v1/chat/completions", json=body, headers=headers)
    error = assert_openai_error(
        answer, 403, "permission_error", "slo_class_not_allowed", "fairgate_class"
    )
    assert "'interactive'" in error["message"]
    assert served.worker.requests == []


async def test_an_unknown_model_is_404_naming_the_parameter(served: Served) -> None:
    tenant = await served.new_tenant()
    answer = await served.client.post(
        "/v1/chat/completions", json={"model": "gpt-9", "messages": HI}, headers=tenant.headers
    )
    error = assert_openai_error(answer, 404, "not_found_error", "model_not_found", "model")
    assert "'gpt-9'" in error["message"]
    assert served.worker.requests == []


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"model": MODEL, "messages": HI, "n": 2}, "unsupported_parameter", "n"),
        ({"model": MODEL, "messages": HI, "temperature": 3}, "invalid_request", "temperature"),
        (
            {"model": MODEL, "messages": HI, "max_tokens": MAX_MODEL_LEN},
            "context_length_exceeded",
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": HI, "fairgate_class": "platinum"},
            "invalid_request",
            "fairgate_class",
        ),
    ],
)
async def test_a_bad_parameter_is_400_naming_it(
    served: Served, body: dict[str, Any], code: str, param: str
) -> None:
    tenant = await served.new_tenant()
    answer = await served.client.post("/v1/chat/completions", json=body, headers=tenant.headers)
    assert_openai_error(answer, 400, "invalid_request_error", code, param)
    assert served.worker.requests == []


async def test_a_body_that_is_not_json_is_400(served: Served) -> None:
    tenant = await served.new_tenant()
    answer = await served.client.post(
        "/v1/completions", content=b"{not json", headers=tenant.headers
    )
    assert_openai_error(answer, 400, "invalid_request_error", "invalid_json")


async def test_over_the_requests_per_minute_is_429_with_retry_after(served: Served) -> None:
    tenant = await served.new_tenant(quotas={"requests_per_minute": 1})
    served.worker.answers.append(Answer(served.tokens("Yes."), "stop"))
    body = {"model": MODEL, "messages": HI}
    first = await served.client.post("/v1/chat/completions", json=body, headers=tenant.headers)
    assert first.status_code == 200, first.text
    second = await served.client.post("/v1/chat/completions", json=body, headers=tenant.headers)
    error = assert_openai_error(second, 429, "rate_limit_error", "rate_limit_exceeded")
    assert "requests_per_minute" in error["message"]
    assert 1 <= int(second.headers["retry-after"]) <= 60
    assert len(served.worker.requests) == 1  # the refused one never reached the worker


# ---- the model list -------------------------------------------------------------------------


async def test_the_model_list_is_the_workers_model(served: Served) -> None:
    tenant = await served.new_tenant()
    answer = await served.client.get("/v1/models", headers=tenant.headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert (model["id"], model["object"], model["owned_by"]) == (MODEL, "model", "fairgate")
    assert isinstance(model["created"], int)


async def test_the_model_list_needs_a_key(served: Served) -> None:
    answer = await served.client.get("/v1/models")
    assert_openai_error(answer, 401, "authentication_error", "invalid_api_key")
