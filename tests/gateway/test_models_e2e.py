"""Two models behind one gateway, end to end: a real stack (``fairgate up --models default,tiny``'s
code: SmolLM2 and the tiny random model, one prefill and one decode worker process each) driven
through the official ``openai`` SDK. Each request is answered by the model it names (greedy
output equals that model's own engine); ``/v1/models`` lists both; an alias the admin moves takes
effect on the next request; a tenant limited to one model gets 403 naming the other; a model
whose pool cannot serve is a 503 with Retry-After while the other model goes on, and no request
is ever paired across the models' workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from deploy.stack import Stack
from engine.loader import load_engine
from engine.sequence import SamplingParams
from tests.gateway.conftest import start_test_stack

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
TINY = "tiny-random-llama"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8
# float32 on both sides: greedy output equal to the in-process engine's (tests/workers/conftest).
WORKER_ARGS = ["--log-level", "warning", "--precision", "float32", "--kv-cache-gib", "0.25"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_test_stack(
        tmp_path_factory.mktemp("models"),
        engine="default",
        models=("default", "tiny"),
        worker_args=WORKER_ARGS,
        threads_per_worker=1,
    )
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """Each model's own greedy answer to ``MESSAGES``: its engine, in this process."""
    answers = {}
    for name, model_id in (("default", SMOL), ("tiny", TINY)):
        loaded = load_engine(name, precision="float32", num_blocks=64)
        prompt = loaded.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
        [output] = loaded.engine.generate(
            [prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        )
        answers[model_id] = loaded.tokenizer.decode(output, skip_special_tokens=True)
    return answers


def admin(stack: Stack, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(
        method,
        stack.base_url + path,
        json=body,
        headers={"authorization": f"Bearer {stack.admin_token}"},
        timeout=30.0,
    )


def client(stack: Stack, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=stack.base_url + "/v1", api_key=key or stack.demo_key, max_retries=0, timeout=120
    )


def answer(sdk: openai.OpenAI, model: str) -> str:
    completion = sdk.chat.completions.create(
        model=model,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )
    assert completion.model == model  # the name the client used, an alias included
    return completion.choices[0].message.content or ""


def test_models_lists_both_with_their_context_lengths(stack: Stack) -> None:
    with client(stack) as sdk:
        models = {m.id: m for m in sdk.models.list().data}
    assert set(models) == {SMOL, TINY}
    for model in models.values():
        extra = model.model_extra or {}
        assert model.owned_by == "fairgate"
        assert extra["root"] == model.id and extra["max_model_len"] > 0


def test_each_request_is_answered_by_its_own_model(stack: Stack, reference: dict[str, str]) -> None:
    assert reference[SMOL] != reference[TINY]
    with client(stack) as sdk:
        assert answer(sdk, SMOL) == reference[SMOL]
        assert answer(sdk, TINY) == reference[TINY]
        assert answer(sdk, SMOL) == reference[SMOL]  # and again, after the other model ran


def test_an_alias_moved_by_the_admin_takes_effect_on_the_next_request(
    stack: Stack, reference: dict[str, str]
) -> None:
    created = admin(stack, "PUT", "/admin/v1/aliases/chat-small", {"model": SMOL})
    assert created.status_code == 201, created.text
    with client(stack) as sdk:
        assert answer(sdk, "chat-small") == reference[SMOL]
        listed = {m.id: (m.model_extra or {}).get("root") for m in sdk.models.list().data}
        assert listed["chat-small"] == SMOL
        moved = admin(stack, "PUT", "/admin/v1/aliases/chat-small", {"model": TINY})
        assert moved.status_code == 200, moved.text
        assert answer(sdk, "chat-small") == reference[TINY]
    assert admin(stack, "DELETE", "/admin/v1/aliases/chat-small").status_code == 204
    with client(stack) as sdk, pytest.raises(openai.NotFoundError):
        answer(sdk, "chat-small")


def test_a_tenant_limited_to_one_model_gets_403_naming_the_other(stack: Stack) -> None:
    tenant = admin(
        stack, "POST", "/admin/v1/tenants", {"name": "tiny-only", "allowed_models": [TINY]}
    ).json()
    key = admin(stack, "POST", f"/admin/v1/tenants/{tenant['tenant_id']}/keys", {}).json()
    with client(stack, key["secret"]) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            answer(sdk, SMOL)
        assert SMOL in refused.value.message and refused.value.code == "model_not_allowed"
        assert answer(sdk, TINY)  # its own model serves it
        assert [m.id for m in sdk.models.list().data] == [TINY]
        with pytest.raises(openai.NotFoundError) as unknown:
            answer(sdk, "no-such-model")
        assert TINY in unknown.value.message and SMOL not in unknown.value.message


def test_a_model_whose_pool_cannot_serve_is_a_503_and_never_borrows_the_others_workers(
    stack: Stack, reference: dict[str, str]
) -> None:
    """Tiny's decode worker drained: tiny has a prefill worker and SmolLM2's decode worker is
    ready, but that pair is never made; tiny's requests get 503 with Retry-After, SmolLM2's
    are served."""
    workers = admin(stack, "GET", "/admin/v1/workers").json()["data"]
    [tiny_decode] = [w for w in workers if w["role"] == "decode" and w["model_id"] == TINY]
    [smol_decode] = [w for w in workers if w["role"] == "decode" and w["model_id"] == SMOL]
    worker = tiny_decode["worker_id"]
    assert admin(stack, "POST", f"/admin/v1/workers/{worker}/drain").status_code in (200, 202)
    try:
        before = _admitted_tokens(smol_decode["url"])
        with client(stack) as sdk:
            with pytest.raises(openai.APIStatusError) as refused:
                answer(sdk, TINY)
            assert refused.value.status_code == 503
            assert refused.value.response.headers["retry-after"]
            assert TINY in refused.value.message
            # SmolLM2's decode worker took nothing of tiny's request.
            assert _admitted_tokens(smol_decode["url"]) == before
            assert answer(sdk, SMOL) == reference[SMOL]
    finally:
        assert admin(stack, "POST", f"/admin/v1/workers/{worker}/undrain").status_code == 200
    with client(stack) as sdk:
        for _ in range(50):  # until the registry sees it ready again
            try:
                assert answer(sdk, TINY) == reference[TINY]
                break
            except openai.APIStatusError as exc:
                assert exc.status_code == 503
        else:
            pytest.fail("tiny never came back")


def _admitted_tokens(worker_url: str) -> float:
    """The worker's count of tokens it admitted (its ``/metrics``)."""
    text = httpx.get(worker_url + "/metrics", timeout=10.0).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fairgate_worker_admitted_tokens_total")
    )


def test_metrics_have_each_models_series(stack: Stack) -> None:
    text = admin(stack, "GET", "/metrics").text
    for model in (SMOL, TINY):
        assert f'model="{model}"' in text
        assert f'fairgate_model_cost_factor{{model="{model}"}}' in text
        assert f'fairgate_model_queue_depth{{model="{model}"}}' in text
