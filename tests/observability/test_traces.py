"""Traces and request logs through the real processes: a stack (null engine, one prefill and one
decode worker, decode preemption by recompute) exporting over OTLP/HTTP to a receiver inside the
test. Every request is one trace with spans from all three services, linked to the gateway's
span; a request handed back by its decode worker stays in its trace; no span carries prompt
text or a key; the gateway's JSON request log line names the trace."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.otlp_receiver import OtlpReceiver, ReceivedSpan
from deploy.stack import Stack
from tests.gateway.conftest import start_test_stack

MARKER = "zebra-quartz-7731"  # in the prompt: must appear in no span and no log line
SERVICES = {"fairgate-gateway", "fairgate-prefill", "fairgate-decode"}
GEN_AI_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "gen_ai.request.max_tokens",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.response.finish_reasons",
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


@pytest.fixture(scope="module")
def traced_stack(
    receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("traced")
    started = start_test_stack(
        state_dir,
        engine="null",
        # 40 blocks and 20 ms decode steps: room for the preemption test below.
        worker_args=["--log-level", "warning", "--num-blocks", "40"],
        decode_worker_args=["--preemption", "recompute"],
        gateway_args=["--log-format", "json"],
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "FAIRGATE_NULL_DECODE_STEP_S": "0.02",
        },
        log_dir=state_dir / "logs",
    )
    try:
        yield started
    finally:
        started.stop()


def _trace_of(
    receiver: OtlpReceiver, request_id: str, *, num_decode_spans: int = 1
) -> list[ReceivedSpan]:
    """The spans of the trace whose gateway span answered ``request_id``, once its gateway,
    queue, prefill, kv_transfer and decode spans have all arrived."""

    def gateway_span(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
        return next(
            (s for s in spans if s.attributes.get("gen_ai.response.id") == request_id), None
        )

    def complete(spans: list[ReceivedSpan]) -> bool:
        root = gateway_span(spans)
        if root is None:
            return False
        names = [s.name for s in spans if s.trace_id == root.trace_id]
        decoded = [
            s
            for s in spans
            if s.trace_id == root.trace_id
            and s.name == "decode"
            and "fairgate.output_tokens" in s.attributes
        ]
        return (
            len(decoded) >= num_decode_spans
            and names.count("kv_transfer") >= num_decode_spans
            and "queue" in names
            and "prefill" in names
        )

    spans = receiver.wait_for(complete, timeout_s=20.0)
    root = gateway_span(spans)
    assert root is not None
    return [s for s in spans if s.trace_id == root.trace_id]


def _assert_no_text(spans: list[ReceivedSpan], *secrets: str) -> None:
    for span in spans:
        values = [*span.attributes.values(), *span.resource_attributes.values()]
        for event in span.events:
            values += [event.name, *event.attributes.values()]
        text = json.dumps([span.name, *map(str, values)])
        for secret in secrets:
            assert secret not in text, f"{secret!r} in span {span.name}"


def _assert_linked(trace: list[ReceivedSpan]) -> ReceivedSpan:
    """One gateway root span; queue, prefill and decode under it; kv_transfer under a
    prefill. Returns the root."""
    [root] = [s for s in trace if s.service_name == "fairgate-gateway" and s.kind == "SERVER"]
    assert root.parent_span_id is None
    assert {s.service_name for s in trace} == SERVICES
    by_id = {s.span_id: s for s in trace}
    for span in trace:
        if span.name in ("queue", "prefill", "decode"):
            assert span.parent_span_id == root.span_id, span.name
        if span.name == "kv_transfer":
            assert span.parent_span_id is not None
            assert by_id[span.parent_span_id].name == "prefill"
    assert {s.service_name for s in trace if s.name == "prefill"} == {"fairgate-prefill"}
    assert {s.service_name for s in trace if s.name == "decode"} == {"fairgate-decode"}
    return root


async def test_a_request_is_one_trace_across_three_services(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    stack = traced_stack
    headers = {"authorization": f"Bearer {stack.demo_key}"}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as client:
        model = (await client.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": f"Tell me about {MARKER}."}],
                "max_tokens": 12,
            },
            headers=headers,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    request_id = body["id"]
    trace = await asyncio.to_thread(_trace_of, receiver, request_id)

    root = _assert_linked(trace)
    assert root.name == f"chat {model}"
    for name in GEN_AI_ATTRIBUTES:
        assert name in root.attributes, name
    attributes = root.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == model
    assert attributes["gen_ai.request.max_tokens"] == 12
    assert attributes["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == (body["choices"][0]["finish_reason"],)
    assert attributes["fairgate.tenant"] == "demo"
    assert "first_token" in [event.name for event in root.events]
    [queue] = [s for s in trace if s.name == "queue"]
    assert queue.attributes["fairgate.policy"] in ("dlpm", "d2lpm")
    assert {"fairgate.counter", "fairgate.decode_worker", "fairgate.prefill_worker"} <= set(
        queue.attributes
    )
    [prefill] = [s for s in trace if s.name == "prefill"]
    assert prefill.attributes["fairgate.prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert prefill.attributes["fairgate.prefill_chunks"] >= 1
    [transfer] = [s for s in trace if s.name == "kv_transfer"]
    assert transfer.attributes["fairgate.kv.backend"] == "gloo"
    assert transfer.attributes["fairgate.kv.blocks"] >= 1
    [decode] = [s for s in trace if s.name == "decode"]
    assert decode.attributes["fairgate.output_tokens"] == body["usage"]["completion_tokens"]
    # The model on every span: the client's name and the model it meant at the root, the
    # model's id on the others.
    assert (attributes["gen_ai.response.model"], attributes["fairgate.model"]) == (model, model)
    assert queue.attributes["fairgate.model"] == model
    for span in (prefill, transfer, decode):
        assert span.attributes["gen_ai.request.model"] == model, span.name
    _assert_no_text(trace, MARKER, stack.demo_key)

    # The request log's one line leads to the trace, and holds no prompt text either.
    log_path = stack.state_dir / "logs" / "gateway-0.log"
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    [entry] = [line for line in lines if line.get("request_id") == request_id]
    assert entry["trace_id"] == root.trace_id
    assert entry["tenant"] == "demo" and entry["outcome"] == "ok"
    assert entry["completion_tokens"] == body["usage"]["completion_tokens"]
    assert MARKER not in log_path.read_text()


async def test_a_preempted_request_stays_in_its_trace(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    """Two batch requests fill the 40-block decode cache; an interactive one gets room by
    preempting one of them (recompute), which is queued, prefilled and decoded again: all of it
    under its one gateway span."""
    stack = traced_stack
    headers = {"authorization": f"Bearer {stack.demo_key}"}
    rng = random.Random(5)

    def body(num_prompt_tokens: int, max_tokens: int, slo_class: str) -> dict[str, Any]:
        prompt = [rng.randrange(1000, 4000) for _ in range(num_prompt_tokens)]
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "fairgate_class": slo_class,
            "stream": True,
        }

    async def run(request: dict[str, Any], started: asyncio.Event | None = None) -> str:
        request_id = ""
        async with client.stream(
            "POST", "/v1/completions", json=request, headers=headers
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            async for line in response.aiter_lines():
                if started is not None and line.startswith("data: {"):
                    started.set()
        return request_id

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as client:
        model = (await client.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        started = [asyncio.Event(), asyncio.Event()]
        batch = [asyncio.create_task(run(body(240, 64, "batch"), e)) for e in started]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30.0)
        await run(body(200, 8, "interactive"))
        batch_ids = await asyncio.gather(*batch)

    traces = [await asyncio.to_thread(_trace_of, receiver, request_id) for request_id in batch_ids]
    preempted = [
        t for t in traces if any(s.attributes.get("fairgate.handed_back") is True for s in t)
    ]
    assert preempted, "neither batch request was handed back"
    trace = await asyncio.to_thread(
        _trace_of, receiver, _request_id(preempted[0]), num_decode_spans=2
    )
    root = _assert_linked(trace)
    assert root.attributes["fairgate.preemptions"] >= 1
    assert root.attributes["gen_ai.usage.output_tokens"] == 64
    queues = [s for s in trace if s.name == "queue"]
    assert [q.attributes["fairgate.requeued"] for q in queues].count(True) >= 1
    decodes = sorted((s for s in trace if s.name == "decode"), key=lambda s: s.start_ns)
    # An attempt that found no room after all (the gateway's view of the worker was a report
    # old), or that the gateway gave up before its KV came, is in the trace too, ended as
    # such; the others carry their tokens.
    for attempt in decodes:
        if "fairgate.output_tokens" not in attempt.attributes:
            assert (
                attempt.status_code == "ERROR"
                or attempt.attributes.get("fairgate.outcome") == "caller_left"
            ), attempt.attributes
    decodes = [s for s in decodes if "fairgate.output_tokens" in s.attributes]
    assert decodes[0].attributes["fairgate.handed_back"] is True
    assert decodes[-1].attributes["fairgate.handed_back"] is False
    assert decodes[-1].attributes["fairgate.output_tokens"] == 64
    assert decodes[-1].attributes["fairgate.resumed_output_tokens"] > 0
    assert len({s.trace_id for s in trace}) == 1
    _assert_no_text(trace, stack.demo_key)


def _request_id(trace: list[ReceivedSpan]) -> str:
    [root] = [s for s in trace if s.service_name == "fairgate-gateway" and s.kind == "SERVER"]
    return str(root.attributes["gen_ai.response.id"])


def test_tracing_is_off_without_an_exporter(tmp_path: Path) -> None:
    from transfer import telemetry

    assert not telemetry.setup_tracing("gateway", environ={})
    assert not telemetry.is_tracing()
    assert telemetry.start_span("chat", {}) is None
    # An explicit off wins over an endpoint.
    assert not telemetry.setup_tracing(
        "gateway",
        otlp_endpoint="http://127.0.0.1:9",
        environ={"OTEL_SDK_DISABLED": "true"},
    )
    assert not telemetry.is_tracing()
