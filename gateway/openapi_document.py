"""``GET /openapi.json``: the OpenAPI 3.1 document of both APIs, generated from the same endpoint
table the router is built from and from the msgspec structs the handlers decode and encode, so
it cannot drift from what the gateway does. Torch-free.

The document says exactly what the gateway accepts: a body valid by its schema is never refused
for its shape (only by design: an unknown model, tenant or key, a class the tenant may not use, a
prompt longer than the model's context, a quota), and one the schema rejects is a 400 naming the
parameter. Two kinds of value depend on the deployment rather than on the types, so the types
refer to them by name and the document defines them from ``Deployment``: ``SloClassName`` (the
configured SLO classes) and ``TokenId`` (below the tokenizer's vocabulary size).

Bodies are decoded with ``decode_json``: JSON Schema reads ``1.0`` as an integer, so an integer
field takes a number with no fractional part, as the document promises.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import OpenAIErrorBody

__all__ = [
    "SLO_CLASS_NAME",
    "TOKEN_ID",
    "Deployment",
    "Endpoint",
    "Handler",
    "PathParam",
    "QueryParam",
    "component_ref",
    "decode_json",
    "error_param",
    "json_integers",
    "openapi_document",
    "routes_of",
]

Handler = Callable[[Request], Awaitable[Response]]
_T = TypeVar("_T")

REF_TEMPLATE = "#/components/schemas/{name}"
# The components whose values come from the deployment (see ``Deployment``).
SLO_CLASS_NAME = "SloClassName"
TOKEN_ID = "TokenId"


def component_ref(name: str) -> dict[str, str]:
    """``{"$ref": …}`` to a component of the document; a type's ``extra_json_schema`` uses it to
    refer to a deployment's values (its own keywords still apply beside the reference)."""
    return {"$ref": REF_TEMPLATE.format(name=name)}


@dataclass(frozen=True, slots=True)
class Deployment:
    """What the document says that depends on this gateway rather than on its types."""

    slo_classes: Sequence[str]  # the configured SLO class names
    vocab_size: int  # the tokenizer's: a prompt's token ids are below it


_ERROR_TEXT = {
    400: "Bad request: invalid JSON, an unknown or unsupported parameter, or too long a prompt",
    401: "Missing or unknown API key / admin token",
    403: "Revoked key, SLO class not allowed, or a tenant key on an admin route",
    404: "Unknown model, tenant or key",
    409: "Conflict (e.g. a tenant name in use)",
    413: "The body is larger than the gateway takes",
    429: "Rate limit or quota exhausted; see Retry-After",
    503: "No worker available, or the request could not be served in time; see Retry-After",
}


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    description: str
    schema: dict[str, Any]
    required: bool = False


@dataclass(frozen=True, slots=True)
class PathParam:
    """A ``{name}`` of the path: the values the document says it takes (a string by default)."""

    name: str
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: how it is served and how it is documented."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str  # Starlette syntax: /admin/v1/tenants/{tenant}
    handler: Handler
    summary: str
    tag: Literal["openai", "admin", "meta"]
    request_body: Any = None  # a msgspec type
    response: Any = None  # a msgspec type; None: no body
    status: int = 200
    errors: tuple[int, ...] = (400, 401)
    query: tuple[QueryParam, ...] = ()
    path_params: tuple[PathParam, ...] = ()
    streams: Any = None  # the SSE chunk type when ``stream: true`` is allowed
    public: bool = False  # no Authorization needed


def routes_of(endpoints: Sequence[Endpoint]) -> list[Route]:
    by_path: dict[str, dict[str, Handler]] = {}
    for endpoint in endpoints:
        by_path.setdefault(endpoint.path, {})[endpoint.method] = endpoint.handler
    return [
        Route(path, _by_method(handlers), methods=list(handlers))
        for path, handlers in by_path.items()
    ]


def _by_method(handlers: dict[str, Handler]) -> Handler:
    if len(handlers) == 1:
        return next(iter(handlers.values()))

    async def dispatch(request: Request) -> Response:
        return await handlers[request.method](request)

    return dispatch


def decode_json(body: bytes, message_type: type[_T]) -> _T:
    """``body`` as ``message_type``, reading a number with no fractional part (``1.0``,
    ``1e3``) as an integer, as JSON Schema does; raises ``msgspec.DecodeError`` (not JSON) or
    its subclass ``msgspec.ValidationError`` (not of the type)."""
    try:
        return msgspec.json.decode(body, type=message_type)
    except msgspec.ValidationError as refused:
        # The slow path, only for a body refused as it is: a second look with its integral
        # floats as integers, which reports the same error if they were not all that was wrong.
        try:
            value = msgspec.json.decode(body)  # fails where the body has a number out of range
        except msgspec.DecodeError:
            raise refused from None
        normalized = json_integers(value)
        if normalized is value:
            raise
        return msgspec.convert(normalized, message_type)


def error_param(error: str) -> str | None:
    """The top-level field a ``msgspec.ValidationError``'s text names: ``… - at `$.stop[0]``` →
    ``stop`` (a key of it: ``… - at `key` in `$.model_quotas``` → ``model_quotas``), ``Object
    contains unknown field `foo``` → ``foo``, ``Object missing required field `model``` →
    ``model``; None when it names none (the body is not an object)."""
    # A mapping's key is "… - at `key` in `$.model_quotas`".
    located = re.search(r" - at `(?:key` in `)?\$\.([^`]*)`\Z", error)
    if located is not None:
        return re.split(r"[.\[]", located.group(1), maxsplit=1)[0]
    match = re.search(r"(?:unknown|missing required) field `([^`]*)`", error)
    return match.group(1) if match else None


def json_integers(value: Any) -> Any:
    """Decoded JSON ``value`` with every float that is an integer turned into an int, as JSON
    Schema reads it; the very object when there is none. A float field takes an int as it is, so
    only integer fields notice."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, list):
        items = [json_integers(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        entries = {k: json_integers(v) for k, v in value.items()}
        return value if all(entries[k] is v for k, v in value.items()) else entries
    return value


def openapi_document(
    endpoints: Sequence[Endpoint], *, version: str, deployment: Deployment | None = None
) -> dict[str, Any]:
    """``deployment``: the values the ``SloClassName`` and ``TokenId`` components list; without
    it they say only what every deployment shares (a string, an integer ≥ 0)."""
    types: list[Any] = [OpenAIErrorBody]
    for endpoint in endpoints:
        types += [t for t in (endpoint.request_body, endpoint.response, endpoint.streams) if t]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    for t, schema in zip(types, schemas, strict=True):
        # A struct's rules between its fields, which its type cannot say (``json_schema_extra``).
        extra = getattr(t, "json_schema_extra", None)
        if extra is not None:
            components[schema["$ref"].rsplit("/", 1)[1]].update(extra)
    components = _ecma_patterns(components) | _deployment_components(deployment)
    schema_of = dict(zip(map(_type_key, types), schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(
            endpoint, schema_of
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fairgate",
            "version": version,
            "description": "OpenAI-compatible API for tenants (Bearer API key) and the admin API "
            "for operators (Bearer admin token).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "tenant key fg-…"},
                "adminToken": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def _ecma_patterns(node: Any) -> Any:
    """``node`` with every ``pattern`` spelled for JSON Schema (ECMA-262): the types' patterns
    end with Python's ``\\Z`` (its ``$`` also matches before a final newline), which is ECMA's
    ``$``."""
    if isinstance(node, dict):
        return {
            key: (
                re.sub(r"\\Z$", "$", value)
                if key == "pattern" and isinstance(value, str)
                else _ecma_patterns(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(item) for item in node]
    return node


def _deployment_components(deployment: Deployment | None) -> dict[str, Any]:
    slo_class: dict[str, Any] = {
        "type": "string",
        "description": "One of the gateway's SLO classes (its configuration lists them)",
    }
    token_id: dict[str, Any] = {
        "type": "integer",
        "minimum": 0,
        "description": "A token id of the served model's vocabulary",
    }
    if deployment is not None:
        slo_class["enum"] = list(deployment.slo_classes)
        token_id["maximum"] = deployment.vocab_size - 1
    return {SLO_CLASS_NAME: slo_class, TOKEN_ID: token_id}


def _type_key(t: Any) -> str:
    return repr(t)


def _operation(endpoint: Endpoint, schema_of: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
        "operationId": _operation_id(endpoint),
    }
    if not endpoint.public:
        scheme = "adminToken" if endpoint.tag == "admin" else "apiKey"
        operation["security"] = [{scheme: []}]
    declared = {p.name: p for p in endpoint.path_params}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        | (
            {"description": declared[name].description, "schema": declared[name].schema}
            if name in declared
            else {}
        )
        for name in _path_params(endpoint.path)
    ] + [
        {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": q.schema,
        }
        for q in endpoint.query
    ]
    if parameters:
        operation["parameters"] = parameters
    if endpoint.request_body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": schema_of[_type_key(endpoint.request_body)]}
            },
        }
    success: dict[str, Any] = {"description": "OK"}
    content: dict[str, Any] = {}
    if endpoint.response is not None:
        content["application/json"] = {"schema": schema_of[_type_key(endpoint.response)]}
    if endpoint.streams is not None:
        content["text/event-stream"] = {
            "schema": _event_schema(
                schema_of[_type_key(endpoint.streams)], schema_of[_type_key(OpenAIErrorBody)]
            ),
            "description": "with stream: true, server-sent events: one chunk per `data:` line, "
            "ending with `data: [DONE]`; an error after the first chunk is the last event",
        }
    if content:
        success["content"] = content
    error_schema = {"application/json": {"schema": schema_of[_type_key(OpenAIErrorBody)]}}
    operation["responses"] = {
        str(endpoint.status): success,
        **{
            str(code): {"description": _ERROR_TEXT[code], "content": error_schema}
            for code in endpoint.errors
        },
    }
    return operation


def _event_schema(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event of a stream, as OpenAPI 3.2 and its tools read an event stream's
    schema (``data`` holds JSON as text: ``contentMediaType`` and ``contentSchema``)."""
    as_json = {"type": "string", "contentMediaType": "application/json"}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "anyOf": [
                    {**as_json, "contentSchema": chunk},
                    {**as_json, "contentSchema": error},
                    {"const": "[DONE]"},
                ]
            },
        },
    }


def _operation_id(endpoint: Endpoint) -> str:
    words = [w for w in endpoint.path.replace("{", "").replace("}", "").split("/") if w]
    return "_".join([endpoint.method.lower(), *words]).replace("-", "_").replace(".", "_")


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]
