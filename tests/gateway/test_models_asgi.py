"""Two models behind one gateway, in process (``create_app`` over SQLite, two ``ScriptedWorker``s
of different models behind the gateway's worker transport): a request reaches the worker of the
model it names, with the prompt tokenized by that model's tokenizer (fetched from its worker once,
when it is not the gateway's own); ``/v1/models`` lists what the tenant may use with each
model's context length; an unknown model is a 404 naming the tenant's models, a model it may not
use a 403 naming it; context length, quotas, usage and cost units are the model's."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from engine.model_store import resolve_model, tokenizer_path
from engine.tokenizer import Tokenizer
from gateway.app import Gateway, create_app
from gateway.config import load_config
from tests.gateway.scripted_transport import Answer, ScriptedTransport, ScriptedWorker

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_TOKEN = "a" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
SMALL, LARGE = "small-model", "large-model"
SMALL_URL, LARGE_URL = "http://small-worker:8201", "http://large-worker:8201"
LARGE_CONTEXT = 64
HI = [{"role": "user", "content": "What is the capital of France?"}]
# The large model's own chat template: its prompts differ from the gateway's tokenizer's.
LARGE_TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"


class Served:
    def __init__(
        self, client: httpx.AsyncClient, gateway: Gateway, workers: dict[str, ScriptedWorker]
    ) -> None:
        self.client = client
        self.gateway = gateway
        self.workers = workers

    async def new_tenant(self, **spec: Any) -> dict[str, str]:
        name = f"t-{uuid.uuid4().hex[:8]}"
        created = await self.client.post(
            "/admin/v1/tenants", json={"name": name, **spec}, headers=ADMIN
        )
        assert created.status_code == 201, created.text
        key = await self.client.post(f"/admin/v1/tenants/{name}/keys", json={}, headers=ADMIN)
        return {"authorization": f"Bearer {key.json()['secret']}", "name": name}

    async def chat(self, tenant: dict[str, str], model: str, **body: Any) -> httpx.Response:
        for worker in self.workers.values():
            worker.answers.append(Answer((1, 2, 3), "stop"))
        return await self.client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": HI, "max_tokens": 4, **body},
            headers={"authorization": tenant["authorization"]},
        )


@pytest.fixture(scope="module")
def own_tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_path(resolve_model("null", pull=False)))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served_module(
    tmp_path_factory: pytest.TempPathFactory, own_tokenizer: Tokenizer
) -> AsyncIterator[Served]:
    config = load_config(
        environ={},
        overrides={
            "gateway": {
                "admin_token": ADMIN_TOKEN,
                "colocated_workers": [SMALL_URL, LARGE_URL],
                "max_loop_lag_s": 10.0,
            },
            "store": {"path": str(tmp_path_factory.mktemp("store") / "fairgate.db")},
            "model": {"name": "null"},
        },
    )
    large_tokenizer = msgspec.structs.replace(own_tokenizer.to_spec(), chat_template=LARGE_TEMPLATE)
    workers = {
        # It announces no tokenizer: the gateway's own serves it.
        SMALL: ScriptedWorker(SMALL_URL, SMALL, max_model_len=2048, worker_id="small-0"),
        LARGE: ScriptedWorker(
            LARGE_URL,
            LARGE,
            max_model_len=LARGE_CONTEXT,
            tokenizer=large_tokenizer,
            worker_id="large-0",
        ),
    }
    gateway = Gateway(config, transport=ScriptedTransport(*workers.values()))
    app = create_app(gateway)
    async with (
        app.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gateway.test"
        ) as client,
    ):
        yield Served(client, gateway, workers)


@pytest.fixture
def served(served_module: Served) -> Served:
    for worker in served_module.workers.values():
        worker.reset()
    return served_module


async def test_each_request_reaches_its_models_worker_with_its_models_prompt(
    served: Served, own_tokenizer: Tokenizer
) -> None:
    tenant = await served.new_tenant()
    small = await served.chat(tenant, SMALL)
    large = await served.chat(tenant, LARGE)
    assert (small.status_code, large.status_code) == (200, 200), (small.text, large.text)
    assert (small.json()["model"], large.json()["model"]) == (SMALL, LARGE)
    [to_small] = served.workers[SMALL].requests
    [to_large] = served.workers[LARGE].requests
    assert list(to_small.prompt_token_ids) == own_tokenizer.encode_chat(
        HI, add_generation_prompt=True
    )
    large_tokenizer = Tokenizer.from_spec(served.workers[LARGE].tokenizer_spec)  # type: ignore[arg-type]
    assert list(to_large.prompt_token_ids) == large_tokenizer.encode_chat(
        HI, add_generation_prompt=True
    )
    assert to_small.prompt_token_ids != to_large.prompt_token_ids


async def test_a_models_tokenizer_is_fetched_from_its_worker_once(served: Served) -> None:
    tenant = await served.new_tenant()
    answers = await asyncio.gather(*(served.chat(tenant, LARGE) for _ in range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    # Once for the whole module (this test may not be the first to ask for it).
    assert served.workers[LARGE].num_tokenizer_calls == 1


async def test_models_lists_each_model_with_its_context_length(served: Served) -> None:
    tenant = await served.new_tenant()
    listed = await served.client.get("/v1/models", headers=tenant)
    assert listed.status_code == 200
    models = {m["id"]: m for m in listed.json()["data"]}
    assert set(models) == {SMALL, LARGE}
    assert models[LARGE]["max_model_len"] == LARGE_CONTEXT
    assert models[SMALL]["max_model_len"] == 2048
    assert {m["owned_by"] for m in models.values()} == {"fairgate"}


async def test_an_unknown_model_is_404_naming_the_tenants_models(served: Served) -> None:
    tenant = await served.new_tenant(allowed_models=[SMALL])
    answer = await served.chat(tenant, "gpt-4")
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert SMALL in error["message"] and LARGE not in error["message"]


async def test_a_model_the_tenant_may_not_use_is_403_naming_it(served: Served) -> None:
    tenant = await served.new_tenant(allowed_models=[SMALL])
    refused = await served.chat(tenant, LARGE)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_allowed", "model")
    assert LARGE in error["message"]
    assert served.workers[LARGE].requests == []
    assert (await served.chat(tenant, SMALL)).status_code == 200
    listed = await served.client.get("/v1/models", headers=tenant)
    assert [m["id"] for m in listed.json()["data"]] == [SMALL]


async def test_the_context_length_is_the_models(served: Served) -> None:
    tenant = await served.new_tenant()
    long_question = [{"role": "user", "content": "word " * 100}]  # > 64 tokens, < 2048
    refused = await served.chat(tenant, LARGE, messages=long_question)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert (await served.chat(tenant, SMALL, messages=long_question)).status_code == 200


async def test_a_quota_on_one_model_refuses_that_model_only(served: Served) -> None:
    tenant = await served.new_tenant(model_quotas={LARGE: {"requests_per_minute": 1}})
    assert (await served.chat(tenant, LARGE)).status_code == 200
    refused = await served.chat(tenant, LARGE)
    assert refused.status_code == 429
    assert LARGE in refused.json()["error"]["message"]
    assert refused.headers["retry-after"]
    assert (await served.chat(tenant, SMALL)).status_code == 200


async def test_usage_and_service_are_in_the_models_cost_units(served: Served) -> None:
    costs = served.gateway.started.costs
    costs.set_admin(LARGE, 4.0)
    try:
        tenant = await served.new_tenant()
        small = (await served.chat(tenant, SMALL)).json()["usage"]
        large = (await served.chat(tenant, LARGE)).json()["usage"]
    finally:
        costs.set_admin(LARGE, None)
    await served.gateway.started.usage.flush()
    store = served.gateway.started.store
    tenant_id = (await store.get_tenant(tenant["name"])).tenant_id
    [usage] = await store.usage(tenant_id, "day")
    assert usage.units == pytest.approx(small["total_tokens"] + 4.0 * large["total_tokens"])
    by_model = {u.model_id: u for u in await store.model_usage(tenant_id, "day")}
    assert by_model[LARGE].units == pytest.approx(4.0 * large["total_tokens"])
    assert by_model[SMALL].completion_tokens == small["completion_tokens"]


async def test_a_model_quota_keyed_by_an_alias_is_refused(served: Served) -> None:
    """A request's quota is its model's, by id: one keyed by an alias would never apply."""
    made = await served.client.put(
        "/admin/v1/aliases/chat-large", json={"model": LARGE}, headers=ADMIN
    )
    assert made.status_code == 201, made.text
    try:
        refused = await served.client.post(
            "/admin/v1/tenants",
            json={"name": "q-alias", "model_quotas": {"chat-large": {"requests_per_minute": 1}}},
            headers=ADMIN,
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "model_quotas"
        assert "chat-large" in refused.json()["error"]["message"]
    finally:
        await served.client.delete("/admin/v1/aliases/chat-large", headers=ADMIN)
