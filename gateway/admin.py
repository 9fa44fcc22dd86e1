"""The admin API, ``/admin/v1/…``, for operators (``fairgate admin`` drives it). Every route needs
the admin token; a tenant key gets 403. JSON bodies are the structs of ``gateway.tenants``.

    GET    /admin/v1/tenants                      list
    POST   /admin/v1/tenants                      create            TenantSpec → 201 Tenant
    GET    /admin/v1/tenants/{tenant}             read (id or name)
    PATCH  /admin/v1/tenants/{tenant}             update            TenantPatch → Tenant
    DELETE /admin/v1/tenants/{tenant}             delete, with its keys and usage → 204
    POST   /admin/v1/tenants/{tenant}/keys        create a key      KeySpec → 201 CreatedKey
    GET    /admin/v1/keys?tenant=&prefix=         list keys
    POST   /admin/v1/keys/{key_id}/revoke         revoke            → ApiKey
    GET    /admin/v1/tenants/{tenant}/usage?period=day|month[&at=YYYY-MM(-DD)]
    GET    /admin/v1/workers                      state and load of every worker

Changes reach the running gateway at once: the key cache forgets the tenant or key, the scheduler
gets the new weight, the quota manager reads the tenant's quotas on its next request. Torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ClientError
from gateway.openapi import Endpoint, QueryParam
from gateway.tenants import (
    ApiKey,
    BudgetPeriod,
    CreatedKey,
    KeySpec,
    Tenant,
    TenantPatch,
    TenantSpec,
    Usage,
)
from gateway.workers import WorkerStatus

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["KeyList", "TenantList", "UsageList", "WorkerList", "admin_endpoints", "json_response"]

_T = TypeVar("_T")
_encoder = msgspec.json.Encoder()


class TenantList(msgspec.Struct, frozen=True):
    data: list[Tenant]
    object: str = "list"


class KeyList(msgspec.Struct, frozen=True):
    data: list[ApiKey]
    object: str = "list"


class UsageList(msgspec.Struct, frozen=True):
    data: list[Usage]
    object: str = "list"


class WorkerList(msgspec.Struct, frozen=True):
    data: list[WorkerStatus]
    object: str = "list"


def json_response(message: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(message), status, media_type="application/json")


async def _read_json(request: Request, message_type: type[_T]) -> _T:
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=message_type)
    except msgspec.DecodeError as exc:
        raise ClientError(f"the body is not valid JSON: {exc}") from exc
    except msgspec.ValidationError as exc:
        raise ClientError(f"invalid {message_type.__name__}: {exc}", param=_param(exc)) from exc


def _param(exc: msgspec.ValidationError) -> str | None:
    text = str(exc)
    if "at `$." in text:
        return text.rsplit("at `$.", 1)[1].rstrip("`").split("[")[0].split(".")[0]
    if "unknown field `" in text:
        return text.split("unknown field `", 1)[1].split("`")[0]
    return None


def admin_endpoints(gateway: Gateway) -> list[Endpoint]:
    def check_classes(default_class: str | None, allowed: list[str] | None) -> None:
        known = [c.name for c in gateway.config.slo_classes]
        for name in allowed or []:
            if name not in known:
                raise ClientError(
                    f"unknown SLO class {name!r}; known: {known}", param="allowed_classes"
                )
        if default_class is not None and default_class not in known:
            raise ClientError(
                f"unknown SLO class {default_class!r}; known: {known}", param="default_class"
            )
        if default_class is not None and allowed is not None and default_class not in allowed:
            raise ClientError(
                f"default class {default_class!r} is not among the allowed classes {allowed}",
                param="default_class",
            )

    def tenant_changed(tenant: Tenant) -> None:
        gateway.auth.forget_tenant(tenant.tenant_id)
        gateway.policy.update_tenant(tenant.tenant_id, tenant.weight)

    async def list_tenants(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        return json_response(TenantList(await gateway.store.list_tenants()))

    async def create_tenant(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        spec = await _read_json(request, TenantSpec)
        check_classes(spec.default_class, spec.allowed_classes)
        return json_response(await gateway.store.create_tenant(spec), 201)

    async def get_tenant(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        return json_response(await gateway.store.get_tenant(request.path_params["tenant"]))

    async def update_tenant(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        patch = await _read_json(request, TenantPatch)
        current = await gateway.store.get_tenant(request.path_params["tenant"])
        default_class = (
            current.default_class if patch.default_class is msgspec.UNSET else patch.default_class
        )
        allowed = (
            current.allowed_classes
            if patch.allowed_classes is msgspec.UNSET
            else patch.allowed_classes
        )
        check_classes(default_class, allowed)
        tenant = await gateway.store.update_tenant(current.tenant_id, patch)
        tenant_changed(tenant)
        return json_response(tenant)

    async def delete_tenant(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        tenant = await gateway.store.get_tenant(request.path_params["tenant"])
        await gateway.store.delete_tenant(tenant.tenant_id)
        gateway.auth.forget_tenant(tenant.tenant_id)
        gateway.quotas.forget(tenant.tenant_id)
        return Response(status_code=204)

    async def create_key(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        spec = await _read_json(request, KeySpec)
        return json_response(
            await gateway.store.create_key(request.path_params["tenant"], spec), 201
        )

    async def list_keys(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        tenant = request.query_params.get("tenant")
        tenant_id = None if tenant is None else (await gateway.store.get_tenant(tenant)).tenant_id
        keys = await gateway.store.list_keys(
            tenant_id=tenant_id, prefix=request.query_params.get("prefix")
        )
        return json_response(KeyList(keys))

    async def revoke_key(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        key = await gateway.store.revoke_key(request.path_params["key_id"])
        gateway.auth.forget_key(key.key_id)
        return json_response(key)

    async def usage(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        kind: BudgetPeriod
        match request.query_params.get("period", "month"):
            case "day":
                kind = "day"
            case "month":
                kind = "month"
            case _:
                raise ClientError("period must be 'day' or 'month'", param="period")
        tenant = await gateway.store.get_tenant(request.path_params["tenant"])
        await gateway.usage.flush()  # include requests that finished a moment ago
        rows = await gateway.store.usage(
            tenant.tenant_id, kind, period=request.query_params.get("at")
        )
        return json_response(UsageList(rows))

    async def workers(request: Request) -> Response:
        await gateway.auth.require_admin(request)
        return json_response(WorkerList(gateway.registry.statuses()))

    tenants, tenant = "/admin/v1/tenants", "/admin/v1/tenants/{tenant}"
    read_errors = (401, 403, 404)
    write_errors = (400, 401, 403, 404)
    return [
        Endpoint(
            "GET",
            tenants,
            list_tenants,
            "List tenants",
            "admin",
            response=TenantList,
            errors=(401, 403),
        ),
        Endpoint(
            "POST",
            tenants,
            create_tenant,
            "Create a tenant",
            "admin",
            request_body=TenantSpec,
            response=Tenant,
            status=201,
            errors=(400, 401, 403, 409),
        ),
        Endpoint(
            "GET",
            tenant,
            get_tenant,
            "Read a tenant (by id or name)",
            "admin",
            response=Tenant,
            errors=read_errors,
        ),
        Endpoint(
            "PATCH",
            tenant,
            update_tenant,
            "Update a tenant",
            "admin",
            request_body=TenantPatch,
            response=Tenant,
            errors=(*write_errors, 409),
        ),
        Endpoint(
            "DELETE",
            tenant,
            delete_tenant,
            "Delete a tenant with its keys and usage",
            "admin",
            status=204,
            errors=read_errors,
        ),
        Endpoint(
            "POST",
            tenant + "/keys",
            create_key,
            "Create an API key (the secret is shown only in this answer)",
            "admin",
            request_body=KeySpec,
            response=CreatedKey,
            status=201,
            errors=write_errors,
        ),
        Endpoint(
            "GET",
            "/admin/v1/keys",
            list_keys,
            "List API keys",
            "admin",
            response=KeyList,
            errors=read_errors,
            query=(
                QueryParam("tenant", "only this tenant's keys (id or name)", {"type": "string"}),
                QueryParam(
                    "prefix", "only keys whose display prefix starts with this", {"type": "string"}
                ),
            ),
        ),
        Endpoint(
            "POST",
            "/admin/v1/keys/{key_id}/revoke",
            revoke_key,
            "Revoke an API key",
            "admin",
            response=ApiKey,
            errors=read_errors,
        ),
        Endpoint(
            "GET",
            tenant + "/usage",
            usage,
            "A tenant's usage per day or month",
            "admin",
            response=UsageList,
            errors=write_errors,
            query=(
                QueryParam(
                    "period",
                    "day or month (default month)",
                    {"type": "string", "enum": ["day", "month"]},
                ),
                QueryParam("at", "one period only: YYYY-MM-DD or YYYY-MM", {"type": "string"}),
            ),
        ),
        Endpoint(
            "GET",
            "/admin/v1/workers",
            workers,
            "State and load of every worker",
            "admin",
            response=WorkerList,
            errors=(401, 403),
        ),
    ]
