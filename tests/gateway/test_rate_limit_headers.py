"""OpenAI's ``x-ratelimit-*`` headers, read through the official ``openai`` SDK from the real app
in process (gatekeeper, routes, admission, quotas, settlement over SQLite), its worker scripted,
its quota clock a fake one: remaining requests go down by one per request and are back at the
limit once the window has passed; tokens count the reservation, then the real usage; a 429 and an
answer refused before admission carry them too; an API key's own tighter limit is the one
reported."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from gateway import gatekeeper
from gateway.app import Gateway, create_app
from gateway.config import load_config
from gateway.rate_limit_headers import duration_text
from tests.gateway.scripted_transport import Answer, ScriptedTransport, ScriptedWorker

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_TOKEN = "r" * 32
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
WORKER_URL = "http://scripted-worker:8301"
MODEL = "scripted-model"
HI = [{"role": "user", "content": "Hello there"}]
LIMIT_HEADERS = {
    f"x-ratelimit-{what}-{kind}"
    for what in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    http: httpx.AsyncClient
    transport: httpx.ASGITransport
    worker: ScriptedWorker
    gateway: Gateway
    clock: FakeClock
    sdk_clients: list[openai.AsyncOpenAI]

    async def tenant(
        self, quotas: dict[str, Any] | None = None, key_quotas: dict[str, Any] | None = None
    ) -> openai.AsyncOpenAI:
        """A new tenant with these quotas, and an SDK client with a key of its (with its own
        quotas)."""
        name = f"t-{uuid.uuid4().hex[:8]}"
        created = await self.http.post(
            "/admin/v1/tenants", json={"name": name, "quotas": quotas or {}}, headers=ADMIN
        )
        assert created.status_code == 201, created.text
        spec = {} if key_quotas is None else {"quotas": key_quotas}
        key = await self.http.post(f"/admin/v1/tenants/{name}/keys", json=spec, headers=ADMIN)
        assert key.status_code == 201, key.text
        client = openai.AsyncOpenAI(
            base_url="http://gateway.test/v1",
            api_key=key.json()["secret"],
            max_retries=0,
            http_client=httpx.AsyncClient(transport=self.transport),
        )
        self.sdk_clients.append(client)
        return client

    def answer(self, text_tokens: int = 4) -> None:
        self.worker.answers.append(Answer(list(range(300, 300 + text_tokens)), "length"))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served_module(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    config = load_config(
        environ={},
        overrides={
            "gateway": {
                "admin_token": ADMIN_TOKEN,
                "colocated_workers": [WORKER_URL],
                "max_loop_lag_s": 10.0,
            },
            "store": {"path": str(tmp_path_factory.mktemp("store") / "fairgate.db")},
            "model": {"name": "null"},
        },
    )
    worker = ScriptedWorker(WORKER_URL, MODEL, max_model_len=2048)
    clock = FakeClock()
    gateway = Gateway(config, transport=ScriptedTransport(worker), quota_clock=clock)
    app = create_app(gateway)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http,
    ):
        served = Served(http, transport, worker, gateway, clock, [])
        yield served
        for client in served.sdk_clients:
            await client.close()


@pytest.fixture
def served(served_module: Served) -> Served:
    served_module.worker.reset()
    return served_module


async def _chat(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    """The raw answer (headers and parsed body) of one chat completion."""
    return await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, **{"max_tokens": 4, **kwargs}
    )


def _seconds(duration: str) -> float:
    """A Go duration as OpenAI writes it ("1m0s", "59.5s", "20ms"), in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?", duration)
    assert parts is not None and duration, duration
    hours, minutes, seconds, ms = (float(p) if p else 0.0 for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds + ms / 1000


async def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration_text(s) for s in (0, 0.0004, 0.02, 1, 1.5, 59.999, 60, 360, 3723.25)] == [
        "0s",
        "0s",
        "20ms",
        "1s",
        "1.5s",
        "59.999s",
        "1m0s",
        "6m0s",
        "1h2m3.25s",
    ]
    assert [_seconds(t) for t in ("1m0s", "59.999s", "20ms", "1h2m3.25s")] == [
        60.0,
        59.999,
        0.02,
        3723.25,
    ]


async def test_remaining_requests_go_down_by_one_per_request_and_reset(served: Served) -> None:
    client = await served.tenant({"requests_per_minute": 5})
    seen = []
    for _ in range(3):
        served.answer()
        raw = await _chat(client)
        assert raw.parse().choices[0].finish_reason == "length"
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        seen.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        served.clock.now += 1.0
    assert seen == [4, 3, 2]
    # The window is full again 60 s after its newest request: that one came 1 s ago.
    served.answer()
    raw = await _chat(client)
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    # (less the real time between admission and the answer's headers going out)
    assert 59.0 < _seconds(raw.headers["x-ratelimit-reset-requests"]) <= 60.0
    served.clock.now += 30.0
    served.answer()
    raw = await _chat(client)
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    # Full: a 429 with the same headers, and Retry-After until the oldest request leaves.
    with pytest.raises(openai.RateLimitError) as refused:
        await _chat(client)
    headers = refused.value.response.headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert 59.0 < _seconds(headers["x-ratelimit-reset-requests"]) <= 60.0
    assert float(headers["retry-after"]) > 0
    # Once the window has passed, the tenant is back at its limit.
    served.clock.now += 61.0
    served.answer()
    raw = await _chat(client)
    assert raw.headers["x-ratelimit-remaining-requests"] == "4"
    # No tokens-per-minute limit anywhere: no tokens headers.
    assert "x-ratelimit-limit-tokens" not in raw.headers


async def test_tokens_count_the_reservation_then_the_real_usage(served: Served) -> None:
    client = await served.tenant({"tokens_per_minute": 10_000})
    served.answer(text_tokens=4)
    raw = await _chat(client, max_tokens=100)
    prompt_tokens = raw.parse().usage.prompt_tokens
    # At admission the request holds prompt + max_tokens.
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 10_000 - (prompt_tokens + 100)
    assert 59.0 < _seconds(raw.headers["x-ratelimit-reset-tokens"]) <= 60.0
    # Settled at its real usage: the next request sees the first at prompt + 4.
    served.clock.now += 2.0
    served.answer(text_tokens=4)
    raw = await _chat(client, max_tokens=100)
    expected = 10_000 - (prompt_tokens + 4) - (prompt_tokens + 100)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == expected
    assert "x-ratelimit-limit-requests" not in raw.headers


async def test_a_streamed_answer_carries_the_headers(served: Served) -> None:
    client = await served.tenant({"requests_per_minute": 10, "tokens_per_minute": 50_000})
    served.answer()
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HI, max_tokens=4, stream=True
    )
    assert raw.headers["x-ratelimit-remaining-requests"] == "9"
    assert set(raw.headers) >= LIMIT_HEADERS
    chunks = [chunk async for chunk in raw.parse()]
    assert chunks


async def test_an_answer_refused_before_admission_carries_them_and_costs_nothing(
    served: Served,
) -> None:
    client = await served.tenant({"requests_per_minute": 10})
    with pytest.raises(openai.BadRequestError) as refused:
        await _chat(client, max_tokens=-1)
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "10"
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.with_raw_response.create(
            model="no-such-model", messages=HI, max_tokens=4
        )
    assert unknown.value.response.headers["x-ratelimit-remaining-requests"] == "10"
    served.answer()
    raw = await _chat(client)
    assert raw.headers["x-ratelimit-remaining-requests"] == "9"


async def test_a_keys_own_tighter_limit_is_the_one_reported(served: Served) -> None:
    client = await served.tenant(
        {"requests_per_minute": 100, "tokens_per_minute": 100_000},
        key_quotas={"requests_per_minute": 2},
    )
    served.answer()
    raw = await _chat(client)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"  # the tenant's: the key has none
    served.answer()
    await _chat(client)
    with pytest.raises(openai.RateLimitError) as refused:
        await _chat(client)
    assert "API key" in refused.value.message
    assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "0"


async def test_a_tenant_without_limits_gets_no_headers(served: Served) -> None:
    client = await served.tenant()
    served.answer()
    raw = await _chat(client)
    assert not LIMIT_HEADERS & set(raw.headers)


async def test_refused_answers_of_one_key_look_at_the_quota_state_once_a_second(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of answers that reserve nothing (here 400s) costs the shared quota state (Redis,
    with replicas) one look per key per second, not one per answer; each still has headers."""
    client = await served.tenant({"requests_per_minute": 10})
    quotas = served.gateway.started.quotas
    looks = 0
    peek = quotas.peek

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal looks
        looks += 1
        return await peek(*args, **kwargs)

    monkeypatch.setattr(quotas, "peek", counted)
    # However slow this machine is, the five answers fall within one reuse period.
    monkeypatch.setattr(gatekeeper, "RECENT_LIMITS_S", 600.0)
    for _ in range(5):
        with pytest.raises(openai.BadRequestError) as refused:
            await _chat(client, max_tokens=-1)
        assert refused.value.response.headers["x-ratelimit-remaining-requests"] == "10"
    assert looks == 1
