"""The admin API of API keys (``fairgate admin keys``). Every route needs the admin token; a tenant
key gets 403. JSON bodies are the structs of ``gateway.tenants``.

    POST   /admin/v1/tenants/{tenant}/keys        create a key      KeySpec → 201 CreatedKey
    GET    /admin/v1/keys?tenant=&prefix=         list keys
    GET    /admin/v1/keys/{key_id}                read
    PATCH  /admin/v1/keys/{key_id}                update            KeyPatch → ApiKey
    POST   /admin/v1/keys/{key_id}/revoke         revoke            → ApiKey

A key's own limits (``quotas``) are checked beside its tenant's, so each is at most the tenant's
same limit where the tenant has one (else 400 ``key_quota_over_tenant`` naming it, e.g.
``quotas.tokens_per_minute``: a code of its own, as the refusal depends on the tenant's state); a
key's token budget counts over its tenant's ``budget_period`` when both have a budget (one budget
inside another of a different period would be neither a day's nor a month's share of it). A
tenant's limits changed later are not checked against its keys': the tenant's limit applies
anyway. An ``expires_at`` in the past is taken (the key does not work: 401 ``key_expired``), so
that a patch can stop a key at once; ``null`` makes it never expire.

A change is in the store before the answer, with its audit record in the same transaction
(``gateway.audit``: the key's id, prefix, name, limits and expiry, never its secret; both are
kept or neither), then this replica's key cache forgets the key and the other replicas are told
(``AdminChange("key")``). The routes take the admin API's parts (``gateway.admin.AdminParts``).
Torch-free.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import _ID_SCHEMA, AdminParts, KeyList, _read_json, admin_actor, json_response
from gateway.audit import AuditDraft
from gateway.errors import ClientError
from gateway.openapi_document import Endpoint, PathParam, QueryParam
from gateway.replica_sync import AdminChange
from gateway.tenants import ApiKey, CreatedKey, KeyPatch, KeySpec, Quotas

__all__ = ["LIMIT_FIELDS", "KeyQuotaOverTenant", "check_key_quotas", "key_admin_endpoints"]

# The limits of ``Quotas`` a key's must not exceed its tenant's.
LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "token_budget",
)


class KeyQuotaOverTenant(ClientError):
    """A key's limit is over its tenant's same limit, or its budget's period is not the
    tenant's (400; ``param`` names the field)."""

    code = "key_quota_over_tenant"


def check_key_quotas(key: Quotas, tenant: Quotas) -> None:
    """400 naming the field (``quotas.<field>``) where the key's limit is over its tenant's, or
    where both have a token budget over different periods (module docstring)."""
    for field in LIMIT_FIELDS:
        mine, theirs = getattr(key, field), getattr(tenant, field)
        if mine is not None and theirs is not None and mine > theirs:
            raise KeyQuotaOverTenant(
                f"a key's {field} ({mine}) is at most its tenant's ({theirs})",
                param=f"quotas.{field}",
            )
    if (
        key.token_budget is not None
        and tenant.token_budget is not None
        and key.budget_period != tenant.budget_period
    ):
        raise KeyQuotaOverTenant(
            f"a key's token budget counts over its tenant's budget period "
            f"({tenant.budget_period}), not {key.budget_period}",
            param="quotas.budget_period",
        )


def key_admin_endpoints(parts: AdminParts) -> list[Endpoint]:
    async def create_key(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        spec = await _read_json(request, KeySpec)
        tenant = await parts.store.get_tenant(request.path_params["tenant"])
        check_key_quotas(spec.quotas, tenant.quotas)
        created: CreatedKey = await parts.store.create_key(
            tenant.tenant_id, spec, audit=AuditDraft(actor, "key.create")
        )
        return json_response(created, 201)

    async def list_keys(request: Request) -> Response:
        await parts.auth.require_admin(request)
        tenant = request.query_params.get("tenant")
        tenant_id = None if tenant is None else (await parts.store.get_tenant(tenant)).tenant_id
        keys = await parts.store.list_keys(
            tenant_id=tenant_id, prefix=request.query_params.get("prefix")
        )
        return json_response(KeyList(keys))

    async def get_key(request: Request) -> Response:
        await parts.auth.require_admin(request)
        return json_response(await parts.store.get_key(request.path_params["key_id"]))

    async def update_key(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        patch = await _read_json(request, KeyPatch)
        current = await parts.store.get_key(request.path_params["key_id"])
        if not isinstance(patch.quotas, msgspec.UnsetType):
            tenant = await parts.store.get_tenant(current.tenant_id)
            check_key_quotas(patch.quotas, tenant.quotas)
        key = await parts.store.update_key(
            current.key_id, patch, audit=AuditDraft(actor, "key.update")
        )
        await parts.admin_changed(AdminChange("key", key_id=key.key_id))
        return json_response(key)

    async def revoke_key(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        key = await parts.store.revoke_key(
            request.path_params["key_id"], audit=AuditDraft(actor, "key.revoke")
        )
        await parts.admin_changed(AdminChange("key", key_id=key.key_id))
        return json_response(key)

    tenant_param = (PathParam("tenant", "the tenant's id or name", _ID_SCHEMA),)
    key_param = (PathParam("key_id", "the key's id (key_…)", _ID_SCHEMA),)
    return [
        Endpoint(
            "POST",
            "/admin/v1/tenants/{tenant}/keys",
            create_key,
            "Create an API key (the secret is shown only in this answer)",
            "admin",
            request_body=KeySpec,
            response=CreatedKey,
            status=201,
            errors=(400, 401, 403, 404),
            path_params=tenant_param,
        ),
        Endpoint(
            "GET",
            "/admin/v1/keys",
            list_keys,
            "List API keys",
            "admin",
            response=KeyList,
            errors=(401, 403, 404),
            query=(
                QueryParam("tenant", "only this tenant's keys (id or name)", {"type": "string"}),
                QueryParam(
                    "prefix", "only keys whose display prefix starts with this", {"type": "string"}
                ),
            ),
        ),
        Endpoint(
            "GET",
            "/admin/v1/keys/{key_id}",
            get_key,
            "Read an API key",
            "admin",
            response=ApiKey,
            errors=(401, 403, 404),
            path_params=key_param,
        ),
        Endpoint(
            "PATCH",
            "/admin/v1/keys/{key_id}",
            update_key,
            "Update an API key: its name, limits (each within its tenant's) or expiry",
            "admin",
            request_body=KeyPatch,
            response=ApiKey,
            errors=(400, 401, 403, 404),
            path_params=key_param,
        ),
        Endpoint(
            "POST",
            "/admin/v1/keys/{key_id}/revoke",
            revoke_key,
            "Revoke an API key",
            "admin",
            response=ApiKey,
            errors=(401, 403, 404),
            path_params=key_param,
        ),
    ]
