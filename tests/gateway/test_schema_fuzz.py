"""The gateway against its own OpenAPI document, with schemathesis: a real stack (gateway, prefill
and decode worker processes, null engine), every route of ``GET /openapi.json`` driven with the
document's own valid and invalid requests (its coverage phase's boundary values, then random
ones), tenant routes with a tenant key and admin routes with the admin token.

What must hold, per request:

- no 5xx, and every status and body is one the document names for the route;
- a request the document calls valid is served (2xx), except for the outcomes that depend on
  state rather than on the request's shape, named narrowly below (``_BY_DESIGN``);
- a request the document calls invalid is refused: 400 with OpenAI's error body naming the
  parameter at fault, or 404 where the invalid part is an id that names nothing, or 401 where it
  is the credential.

Generation is bounded (``MAX_EXAMPLES`` random requests per route and mode, after the coverage
phase): the module takes about a minute on two cores (50 s measured, stack start included).
The seed of each run is in its failure report.
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, CheckContext, GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import Failure
from schemathesis.engine import events
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER

from deploy.stack import Stack
from engine.null_engine import NullEngineConfig
from gateway.openapi_document import SLO_CLASS_NAME, TOKEN_ID

MAX_EXAMPLES = 50  # random requests per route and generation mode, after the coverage phase
# The null engine decodes a step in 5 ms: a request for thousands of tokens would take seconds
# each, so the generated limits the context can take are cut to this (``_fast_limits``); larger
# ones stay, and are refused at once (context_length_exceeded).
MAX_GENERATED_TOKENS = 16
MAX_MODEL_LEN = NullEngineConfig().max_model_len

_GENERATION = ("/v1/chat/completions", "/v1/completions")
# Non-2xx answers to requests the document calls valid that are right all the same, because they
# depend on the gateway's state, not on the request: (method, path) → {(status, error code)}.
_LOOKUP = {(404, "not_found")}  # an id or name that names no tenant or key: any string may
_BY_DESIGN: dict[tuple[str, str], set[tuple[int, str]]] = {
    # The prompt's token count (chat template included) plus max_tokens against the model's
    # context: no schema can count tokens.
    ("POST", "/v1/chat/completions"): {(400, "context_length_exceeded")},
    # A prompt whose every character the tokenizer drops (SmolLM2's lacks six ASCII controls)
    # makes no token: the schema cannot know the vocabulary either.
    ("POST", "/v1/completions"): {(400, "context_length_exceeded"), (400, "empty_prompt")},
    ("POST", "/admin/v1/tenants"): {(409, "conflict")},  # the name is in use
    ("GET", "/admin/v1/tenants/{tenant}"): _LOOKUP,
    ("PATCH", "/admin/v1/tenants/{tenant}"): _LOOKUP | {(409, "conflict")},  # renamed onto one
    ("DELETE", "/admin/v1/tenants/{tenant}"): _LOOKUP,
    # A key's limit over its tenant's (which another generated request may have set).
    ("POST", "/admin/v1/tenants/{tenant}/keys"): _LOOKUP | {(400, "key_quota_over_tenant")},
    ("GET", "/admin/v1/keys"): _LOOKUP,  # ?tenant= names none
    ("GET", "/admin/v1/keys/{key_id}"): _LOOKUP,
    ("PATCH", "/admin/v1/keys/{key_id}"): _LOOKUP | {(400, "key_quota_over_tenant")},
    ("POST", "/admin/v1/keys/{key_id}/revoke"): _LOOKUP,
    ("GET", "/admin/v1/tenants/{tenant}/usage"): _LOOKUP,
    ("GET", "/admin/v1/tenants/{tenant}/fairness"): _LOOKUP,
    ("DELETE", "/admin/v1/workers/{worker}"): _LOOKUP,  # an id or URL no worker has
    ("POST", "/admin/v1/workers/{worker}/drain"): _LOOKUP,
    ("POST", "/admin/v1/workers/{worker}/undrain"): _LOOKUP,
    ("PATCH", "/admin/v1/models/{model}"): _LOOKUP,  # a model no worker announced
    ("DELETE", "/admin/v1/aliases/{alias}"): _LOOKUP,
    ("PUT", "/admin/v1/aliases/{alias}"): {(409, "conflict")},  # the alias is a model's id
}
# Not fuzzed: adding a worker makes the gateway poll the URL it names, and generated URLs name
# any host (test traffic goes only to loopback). ``tests/gateway/test_membership.py`` covers it.
_NOT_FUZZED = [("POST", "/admin/v1/workers")]


# "Bearer …" of the credentials the run uses (``acting_as``): a request that sends none of them
# is refused with 401 before its body is looked at.
_credentials: set[str] = set()


@dataclass(frozen=True, slots=True)
class Target:
    """Who the generated requests act as, and on."""

    stack: Stack
    tenant_key: str  # the tenant routes' key: a tenant with every class and no quotas
    tenant_id: str  # another tenant, for the admin routes to find now and then (not DELETE)
    key_id: str  # a key of that tenant, to revoke


@pytest.fixture(scope="module")
def target(stack: Stack) -> Target:
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    with httpx.Client(base_url=stack.base_url, headers=admin, timeout=30) as client:
        served = _new_tenant(client)
        acted_on = _new_tenant(client)
    return Target(stack, served["secret"], acted_on["key"]["tenant_id"], acted_on["key"]["key_id"])


def _new_tenant(client: httpx.Client) -> dict[str, Any]:
    """A tenant with the defaults (every class, no quotas) and its key (``CreatedKey``)."""
    tenant = client.post("/admin/v1/tenants", json={"name": f"fuzz-{uuid.uuid4().hex[:8]}"})
    tenant.raise_for_status()
    created = client.post(f"/admin/v1/tenants/{tenant.json()['tenant_id']}/keys", json={})
    created.raise_for_status()
    result: dict[str, Any] = created.json()
    return result


def _fast_limits(body: Any, path: str) -> None:
    """A tenant route's body as generated, but for the served model (any string is a valid model
    request, and an unknown one is a 404 that tests nothing else) and a small token limit where
    the context can take it. Both keep the body as valid or invalid as it was: a string for a
    string, an integer in range for one in range, and a limit set only where none is given."""
    if not isinstance(body, dict) or path not in _GENERATION:
        return
    if isinstance(body.get("model"), str):
        body["model"] = "null"
    limits = ("max_tokens", "max_completion_tokens")
    if all(body.get(name) is None for name in limits):  # null is not given: the whole context
        body["max_tokens"] = MAX_GENERATED_TOKENS
    for name in limits:
        value: Any = body.get(name)  # 2524.0 is an integer too, as JSON Schema reads it
        is_integer = type(value) in (int, float) and float(value).is_integer()
        if is_integer and MAX_GENERATED_TOKENS < value < MAX_MODEL_LEN:
            body[name] = 1 + int(value) % MAX_GENERATED_TOKENS


def _sometimes_known(target: Target, case: Case[Any]) -> None:
    """Half the generated tenant and key ids (chosen by their hash, so a case is the same
    whenever it is replayed) name real ones, so the admin routes get past their lookup too
    (random ones name nothing: a 404 by design); never for ``DELETE``, which would leave none."""
    if case.method.upper() == "DELETE":
        return
    known = {"tenant": target.tenant_id, "key_id": target.key_id, "model": "null"}
    for values in (case.path_parameters, case.query):
        for name, value in list((values or {}).items()):
            if name in known and zlib.crc32(repr(value).encode()) % 2:
                values[name] = known[name]


def _served_target(case: Case[Any]) -> None:
    """An alias's target as generated, but the served model: any string is a valid target to
    the schema, and one no worker serves is a 400 that tests nothing else."""
    body = case.body
    is_target = isinstance(body, dict) and isinstance(body.get("model"), str)
    if case.path == "/admin/v1/aliases/{alias}" and is_target:
        body["model"] = "null"


@pytest.fixture
def acting_as(target: Target) -> Iterator[None]:
    """While a test runs, every generated request is adjusted as ``_fast_limits`` and
    ``_sometimes_known`` say before it is sent (schemathesis then reclassifies it as valid or
    invalid as sent)."""

    def before_call(context: Any, case: Case[Any], kwargs: dict[str, Any]) -> None:
        _fast_limits(case.body, case.path)
        _sometimes_known(target, case)
        _served_target(case)

    GLOBAL_HOOK_DISPATCHER.register_hook_with_name(before_call, "before_call")
    _credentials.update(f"Bearer {t}" for t in (target.tenant_key, target.stack.admin_token))
    try:
        yield
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)
        _credentials.clear()


@schemathesis.check
def answered_as_documented(ctx: CheckContext, response: Any, case: Case[Any]) -> bool | None:
    """What schemathesis' acceptance and rejection checks say, narrowed: a valid request is
    refused only by design (``_BY_DESIGN``), and an invalid one with 400 naming its parameter
    (or 401 without a credential, 404 for an id that names nothing)."""
    status = response.status_code
    meta = case.meta
    if meta is None or case.method.upper() != case.operation.method.upper():
        return None  # another method on the path: schemathesis' unsupported_method checks it
    error = _error_of(response)
    if meta.generation.mode is GenerationMode.POSITIVE:
        allowed = _BY_DESIGN.get((case.method.upper(), case.path), set())
        if not 200 <= status < 300 and (status, error.get("code")) not in allowed:
            raise Failure(
                operation=case.operation.label,
                title="Valid request refused",
                message=f"{status} {error}: the document says this request is valid",
            )
        return None
    headers = response.request.headers
    if case.body is not None and headers.get("content-type") != "application/json":
        # A JSON body sent as another media type is read as JSON all the same (the gateway does
        # not look at Content-Type): a leniency, not a refusal of anything valid.
        return None
    # An answer that treats invalid data as valid (a 2xx, a 409, …) fails here.
    _NEGATIVE_DATA_REJECTION(ctx, response, case)  # type: ignore[call-arg]
    if 200 <= status < 300:
        return None  # schemathesis found the request valid as sent after all
    sent = headers.get("authorization")
    if status == 404 and error.get("code") == "not_found":
        return None
    if status == 401 and sent not in _credentials:
        return None  # the invalid part is the credential (none, or not a key)
    if status != 400:
        raise Failure(
            operation=case.operation.label,
            title="Invalid request not refused with 400",
            message=f"{status} {error}",
        )
    if isinstance(case.body, dict) and error.get("param") is None:
        raise Failure(
            operation=case.operation.label,
            title="A refusal that names no parameter",
            message=f"{error}",
        )
    return None


def _error_of(response: Any) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


# Schemathesis' own checks of answers (no 5xx; statuses, content types, headers and bodies as
# documented) and ours, which replaces its acceptance and rejection checks (their allowed
# statuses are wider than ``_BY_DESIGN``).
load_all_checks()  # schemathesis registers its own checks on first use
_NEGATIVE_DATA_REJECTION = next(
    check for check in CHECKS.get_all() if check.__name__ == "negative_data_rejection"
)
_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "unsupported_method",
    answered_as_documented.__name__,
)


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # operation, check and what failed
    detail: str  # the answer, and a curl that reproduces it


def _run(target: Target, tag: str, *, stateful: bool) -> None:
    """Schemathesis' whole run (its coverage phase's boundary values, random requests, and
    with ``stateful`` chains of requests that follow the document's links) over the routes with
    this tag; fails with what went wrong, if anything."""
    seed = random.getrandbits(64)
    config = schemathesis.Config.from_dict(
        {
            "seed": seed,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
            "phases": {"examples": {"enabled": False}, "stateful": {"enabled": stateful}},
            "checks": {
                "enabled": False,
                **{name: {"enabled": True} for name in _CHECKS},
                # What ``answered_as_documented`` runs it with: the statuses an invalid request
                # may get (401: no credential; 404: an id that names nothing).
                "negative_data_rejection": {"expected-statuses": [400, 401, 404]},
            },
            # Each route gets its security scheme's credentials.
            "auth": {
                "openapi": {
                    "apiKey": {"bearer": target.tenant_key},
                    "adminToken": {"bearer": target.stack.admin_token},
                }
            },
        }
    )
    url = target.stack.base_url + "/openapi.json"
    schema = schemathesis.openapi.from_url(url, config=config).include(tag=tag)
    for method, path in _NOT_FUZZED:
        schema = schema.exclude(method=method, path=path)
    components = schema.raw_schema["components"]["schemas"]
    # The document lists this deployment's values (gateway.openapi_document.Deployment): without
    # them, valid-looking SLO classes and token ids would be refused.
    deployment = (components[SLO_CLASS_NAME].get("enum"), components[TOKEN_ID].get("maximum"))
    expected = (["interactive", "standard", "batch"], NullEngineConfig().vocab_size - 1)
    assert deployment == expected, "the document does not list the deployment's values"
    problems: list[Problem] = []
    num_cases = 0
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            num_cases += len(event.recorder.cases)
            problems += _problems_of(event.recorder)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            problems.append(Problem("schemathesis could not run", repr(event)))
    assert num_cases > 0
    assert not problems, _report(problems, seed)


def _problems_of(recorder: Any) -> list[Problem]:
    return [
        Problem(
            f"{recorder.label}: {node.name}: {info.failure.title}",
            f"{info.failure.message}\n{info.code_sample}",
        )
        for nodes in recorder.checks.values()
        for node in nodes
        if (info := node.failure_info) is not None
    ]


def _report(problems: list[Problem], seed: int, num_shown: int = 3) -> str:
    """How many of each kind, and the first few of each in full."""
    by_kind: dict[str, list[str]] = {}
    for problem in problems:
        by_kind.setdefault(problem.kind, []).append(problem.detail)
    lines = [f"{len(problems)} failures (seed {seed}):"]
    for kind, details in by_kind.items():
        lines.append(f"== {len(details)} × {kind}")
        lines += [f"-- {detail}" for detail in details[:num_shown]]
    return "\n".join(lines)


def test_tenant_routes_answer_as_documented(target: Target, acting_as: None) -> None:
    _run(target, "openai", stateful=False)


def test_admin_routes_answer_as_documented(target: Target, acting_as: None) -> None:
    # After the tenant routes' test: this one may revoke or delete whatever it finds.
    _run(target, "admin", stateful=True)
