"""``GET /openapi.json``: the OpenAPI 3.1 document of both APIs, generated from the same endpoint
table the router is built from and from the msgspec structs the handlers decode and encode, so
it cannot drift from what the gateway does. Torch-free.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import OpenAIErrorBody

__all__ = ["Endpoint", "QueryParam", "openapi_document", "routes_of"]

Handler = Callable[[Request], Awaitable[Response]]

_ERROR_TEXT = {
    400: "Bad request: invalid JSON, an unknown or unsupported parameter, or too long a prompt",
    401: "Missing or unknown API key / admin token",
    403: "Revoked key, SLO class not allowed, or a tenant key on an admin route",
    404: "Unknown model, tenant or key",
    409: "Conflict (e.g. a tenant name in use)",
    429: "Rate limit or quota exhausted; see Retry-After",
    503: "No worker available",
}


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    description: str
    schema: dict[str, Any]
    required: bool = False


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route: how it is served and how it is documented."""

    method: Literal["GET", "POST", "PATCH", "DELETE"]
    path: str  # Starlette syntax: /admin/v1/tenants/{tenant}
    handler: Handler
    summary: str
    tag: Literal["openai", "admin", "meta"]
    request_body: Any = None  # a msgspec type
    response: Any = None  # a msgspec type; None: no body
    status: int = 200
    errors: tuple[int, ...] = (400, 401)
    query: tuple[QueryParam, ...] = ()
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


def openapi_document(endpoints: Sequence[Endpoint], *, version: str) -> dict[str, Any]:
    types: list[Any] = [OpenAIErrorBody]
    for endpoint in endpoints:
        types += [t for t in (endpoint.request_body, endpoint.response, endpoint.streams) if t]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
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
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
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
            "schema": schema_of[_type_key(endpoint.streams)],
            "description": "with stream: true, server-sent events: one chunk per `data:` line, "
            "ending with `data: [DONE]`",
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


def _operation_id(endpoint: Endpoint) -> str:
    words = [w for w in endpoint.path.replace("{", "").replace("}", "").split("/") if w]
    return "_".join([endpoint.method.lower(), *words]).replace("-", "_").replace(".", "_")


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")]
