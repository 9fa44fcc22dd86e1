"""A worker's readiness follows its engine's health: a request that fails alone leaves it ready;
an engine that dies makes it unready and unhealthy at once, says so on stdout, and stops the
server, so that the process exits (issue 16). The null model, a real engine thread, the real
routes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import httpx
import pytest

from engine.engine import LLMEngine
from engine.sequence import SamplingParams, ScheduledRun, StepOutput
from engine.serving import WorkerConfig, WorkerService, create_app
from transfer.errors import ErrorBody, FairgateError, RequestFailed, WorkerNotReady
from transfer.messages import WorkerLoad, WorkerRole, decode_message


class _Service(WorkerService):
    role: ClassVar[WorkerRole] = "decode"


class _Exploding:
    """The engine's runner, but every step raises."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, runs: list[ScheduledRun]) -> list[int]:
        raise RuntimeError("device lost")


def _fail_one(thread: Any, request_id: str) -> StepOutput | FairgateError:
    """Add a request (each of another tenant: its id is its cache salt); the outcome its sink
    hears."""
    heard: list[StepOutput | FairgateError] = []
    done = threading.Event()

    def sink(output: StepOutput | FairgateError) -> None:
        heard.append(output)
        done.set()

    def add(engine: LLMEngine) -> None:
        salt = request_id.encode()
        engine.add_request(request_id, [1, 2, 3], SamplingParams(max_tokens=2), salt=salt)
        thread.watch(request_id, sink)

    thread.submit(add).result(10)
    assert done.wait(10)
    return heard[0]


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_readiness_follows_the_engine_and_a_dead_engine_stops_the_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = _Service(WorkerConfig(role="decode", model="null", num_blocks=64))
    fatal = asyncio.Event()
    service.bind(8201, on_fatal=fatal.set)
    await service.start()
    await _until(lambda: service.engine_thread is not None)
    thread = service.engine_thread
    assert thread is not None
    app = create_app(service)  # its routes only: the lifespan is the one started above
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:

            async def load() -> WorkerLoad:
                return decode_message((await client.get("/v1/load")).content, WorkerLoad)

            await thread.call(lambda e: setattr(e, "runner", _Exploding(e.runner)))
            outcome = await asyncio.to_thread(_fail_one, thread, "first")
            assert isinstance(outcome, RequestFailed) and "request first failed" in outcome.message
            # One request failed; the worker is as ready as before.
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/healthz")).status_code == 200
            assert (await load()).ready and not fatal.is_set()

            for request_id in ("second", "third"):
                await asyncio.to_thread(_fail_one, thread, request_id)
            await asyncio.wait_for(fatal.wait(), 10)
            assert service.engine_failure is thread.error is not None
            readyz = await client.get("/readyz")
            assert readyz.status_code == 503 and "engine died" in readyz.json()["reason"]
            healthz = await client.get("/healthz")
            assert healthz.status_code == 500 and healthz.json()["status"] == "failed"
            assert not (await load()).ready
    finally:
        await service.stop()
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [failed] = [event for event in events if event["event"] == "failed"]
    assert failed["role"] == "decode" and "3 steps in a row" in failed["reason"]


async def test_the_tokenizer_route_answers_not_ready_until_the_model_is_loaded() -> None:
    """A caller that asks a loading worker for its tokenizer is told to come back, as for
    ``/v1/info``, never given an empty spec."""
    service = _Service(WorkerConfig(role="decode", model="null", num_blocks=64))
    service.bind(8202)
    transport = httpx.ASGITransport(app=create_app(service))  # not started: still "loading"
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        for path in ("/v1/tokenizer", "/v1/info"):
            response = await client.get(path)
            assert response.status_code == 503, path
            body = decode_message(response.content, ErrorBody)
            assert body.code == WorkerNotReady.code and "loading" in body.message
