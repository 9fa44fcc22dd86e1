"""The admin API, ``/admin/v1/…``, for operators (``fairgate admin`` drives it). Every route needs
the admin token; a tenant key gets 403. JSON bodies are the structs of ``gateway.tenants``.

    GET    /admin/v1/tenants                      list
    POST   /admin/v1/tenants                      create            TenantSpec → 201 Tenant
    GET    /admin/v1/tenants/{tenant}             read (id or name)
    PATCH  /admin/v1/tenants/{tenant}             update            TenantPatch → Tenant
    DELETE /admin/v1/tenants/{tenant}             delete, with its keys and usage → 204
    GET    /admin/v1/tenants/{tenant}/usage?period=day|month[&at=YYYY-MM(-DD)]
    GET    /admin/v1/workers                      state and load of every worker
    POST   /admin/v1/workers                      add one by URL    NewWorker → 201 WorkerStatus
                                                  (200: that URL is known already, same role)
    DELETE /admin/v1/workers/{worker}             remove → 204
    POST   /admin/v1/workers/{worker}/drain       no new requests  → 202 WorkerStatus (draining;
                                                  200 when it is drained already)
    POST   /admin/v1/workers/{worker}/undrain     new requests again → WorkerStatus

Keys (``gateway.admin_keys``) and the audit log (``gateway.admin_audit``) have routes of their
own, over the same ``AdminParts``. Every route here that changes something leaves one record in
the audit log (``gateway.audit``), naming the credential that made it; one that fails leaves
none. A tenant's record is written by the store in the change's own transaction (an audit write
that fails fails the change, before anything is applied or sent to the other replicas); a
worker's after the registry's change, retried, and logged as an ERROR if it cannot be written.

Changes reach the running gateway at once: the key cache forgets the tenant or key, the scheduler
gets the new weight, the quota manager reads the tenant's quotas on its next request. SLO classes
must be configured ones (the document lists them); a tenant's default class is always among its
allowed classes, added to them when a body leaves it out (JSON Schema cannot say "one of the
other field's items", and the default class is one the tenant uses anyway).

Workers (``gateway.workers`` has their states): ``{worker}`` is a worker's id or its URL,
URL-encoded (the server decodes the path before routing, so that parameter takes slashes). A
worker added is polled at once; it takes requests once a poll finds it ready and compatible. A
removed worker's requests move to other workers; a draining one's finish where they are.

Workers register themselves on two more routes (``transfer.registration``), with the
registration token (``gateway.registration_token``, compared in constant time; "" turns them
off: 403) instead of the admin token. Workers call them, not operators, so they are not in the
OpenAPI document:

    POST   /v1/workers/register                   WorkerRegistration → 201 / 200 WorkerStatus
    POST   /v1/workers/unregister                 WorkerDeregistration → 204

A registration is audited when it adds the worker (201), not when it renews one (200: the
heartbeat, every few seconds, changes nothing); an unregistration when it removes one.

Internal URLs appear in these answers only, never in a tenant's. The routes take the parts of the
gateway they use (``AdminParts``). Torch-free.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.audit import AuditDraft, AuditLog, CredentialKind, actor_of
from gateway.auth import Authenticator, bearer_token
from gateway.config import Config
from gateway.errors import ClientError, Conflict, InvalidApiKey, NotFound, PermissionDenied
from gateway.openapi_document import Endpoint, PathParam, QueryParam, decode_json, error_param
from gateway.replica_sync import AdminChange
from gateway.tenants import (
    ApiKey,
    BudgetPeriod,
    Quotas,
    Tenant,
    TenantPatch,
    TenantSpec,
    TenantStore,
    Usage,
    with_default_allowed,
)
from gateway.usage import UsageRecorder
from gateway.workers import WorkerHandle, WorkerRegistry, WorkerStatus
from transfer.messages import WorkerRole
from transfer.registration import (
    MAX_URL_LENGTH,
    REGISTER_PATH,
    UNREGISTER_PATH,
    WORKER_URL_PATTERN,
    WorkerDeregistration,
    WorkerRegistration,
)

__all__ = [
    "AdminParts",
    "KeyList",
    "NewWorker",
    "TenantList",
    "UsageList",
    "WorkerList",
    "add_other_successes",
    "admin_actor",
    "admin_endpoints",
    "json_response",
    "registration_routes",
    "routing_path",
    "worker_view",
]

_T = TypeVar("_T")
_encoder = msgspec.json.Encoder()

# A tenant or key in a path: an id (tn_…, key_…) or a tenant's name, which look alike. ECMA's $,
# for the document only: a path value is looked up, and one that names nothing is a 404.
_ID_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 64,
    "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
}
_PERIOD_NAME = re.compile(r"[0-9]{4}-[0-9]{2}(?:-[0-9]{2})?")


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


@dataclass(frozen=True, slots=True)
class AdminParts:
    """What the admin routes use of the gateway."""

    config: Config  # the SLO classes
    auth: Authenticator
    store: TenantStore
    usage: UsageRecorder  # flushed before usage is read
    registry: WorkerRegistry
    # A tenant or key changed: applied on this replica, then sent to the others.
    admin_changed: Callable[[AdminChange], Awaitable[None]]
    # The admins' aliases now (alias -> model id): a model quota is keyed by a model's id.
    aliases: Callable[[], Mapping[str, str]] = dict


class NewWorker(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: a worker to add, by its base URL and the role it must have."""

    url: Annotated[str, msgspec.Meta(pattern=WORKER_URL_PATTERN, max_length=MAX_URL_LENGTH)]
    role: WorkerRole


_WORKERS = "/admin/v1/workers"
_WORKER = _WORKERS + "/{worker}"
# Success statuses beside an endpoint's own (``Endpoint.status``), with what they mean; the
# document gets them from ``add_other_successes``.
_OTHER_SUCCESSES = {
    ("post", _WORKERS): (200, "That URL is known already, with this role: its status"),
    ("post", _WORKER + "/drain"): (200, "Drained already: nothing is left on it"),
}


def routing_path(path: str) -> str:
    """The path an endpoint is routed by: ``{worker}`` takes slashes (a URL-encoded URL, which
    the server decodes before routing)."""
    return path.replace("{worker}", "{worker:path}")


def add_other_successes(
    document: dict[str, Any],
    successes: Mapping[tuple[str, str], tuple[int, str]] = _OTHER_SUCCESSES,
) -> None:
    """Document the second success status of the routes that have one (same body as the
    first): ``gateway.openapi_document.Endpoint`` names only one. ``successes``: by (method,
    path), the status and what it means (default: this module's routes')."""
    for (method, path), (status, description) in successes.items():
        responses = document["paths"][path][method]["responses"]
        first = next(answer for code, answer in responses.items() if code.startswith("2"))
        responses[str(status)] = {**first, "description": description}


def json_response(message: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(message), status, media_type="application/json")


async def admin_actor(auth: Authenticator, request: Request) -> str:
    """Returns for the admin token (else ``require_admin``'s 401 or 403) how the audit log names
    it (``gateway.audit.actor_of``)."""
    await auth.require_admin(request)
    return _actor(request, "admin-token")


def _actor(request: Request, kind: CredentialKind) -> str:
    token = bearer_token(request)
    assert token is not None, "checked by the caller"
    return actor_of(kind, token)


def worker_view(handle: WorkerHandle, now: float) -> dict[str, Any]:
    """What the audit log keeps of a worker: who and where it is, and its state."""
    status = handle.status(now)
    return {
        "url": status.url,
        "role": handle.expected_role,
        "state": status.state,
        "source": status.source,
        "worker_id": status.worker_id,
        "model_id": status.model_id,
        "drain_requested": status.drain_requested,
    }


async def _read_json(request: Request, message_type: type[_T]) -> _T:
    body = await request.body()
    try:
        return decode_json(body, message_type)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: caught first
        param = error_param(str(exc))
        raise ClientError(f"invalid {message_type.__name__}: {exc}", param=param) from exc
    except msgspec.DecodeError as exc:
        raise ClientError(f"the body is not valid JSON: {exc}") from exc


def admin_endpoints(parts: AdminParts) -> list[Endpoint]:
    audit = AuditLog(parts.store)

    def allowed_classes(default_class: str, allowed: list[str]) -> list[str]:
        """``allowed`` with the default added (once each); 400 naming the field for a class
        that is not configured."""
        known = [c.name for c in parts.config.slo_classes]
        for name in allowed:
            if name not in known:
                raise ClientError(
                    f"unknown SLO class {name!r}; known: {known}", param="allowed_classes"
                )
        if default_class not in known:
            raise ClientError(
                f"unknown SLO class {default_class!r}; known: {known}", param="default_class"
            )
        return with_default_allowed(default_class, allowed)

    def check_model_quotas(model_quotas: Mapping[str, Quotas] | msgspec.UnsetType) -> None:
        """400 for a quota keyed by an alias: it would never apply (a request's quota is its
        model's, by id, so that moving an alias moves no quota)."""
        if isinstance(model_quotas, msgspec.UnsetType):
            return
        aliases = parts.aliases()
        for name in model_quotas:
            if name in aliases:
                raise ClientError(
                    f"{name!r} is an alias (of {aliases[name]!r}): a model quota is keyed by "
                    "the model's id",
                    param="model_quotas",
                )

    async def tenant_changed(tenant: Tenant) -> None:
        change = AdminChange("tenant", tenant.tenant_id, weight=tenant.weight)
        await parts.admin_changed(change)

    async def list_tenants(request: Request) -> Response:
        await parts.auth.require_admin(request)
        return json_response(TenantList(await parts.store.list_tenants()))

    async def create_tenant(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        spec = await _read_json(request, TenantSpec)
        check_model_quotas(spec.model_quotas)
        allowed = allowed_classes(spec.default_class, spec.allowed_classes)
        spec = msgspec.structs.replace(spec, allowed_classes=allowed)
        tenant = await parts.store.create_tenant(spec, audit=AuditDraft(actor, "tenant.create"))
        return json_response(tenant, 201)

    async def get_tenant(request: Request) -> Response:
        await parts.auth.require_admin(request)
        return json_response(await parts.store.get_tenant(request.path_params["tenant"]))

    async def update_tenant(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        patch = await _read_json(request, TenantPatch)
        check_model_quotas(patch.model_quotas)
        # Read for the classes' check only: the record's ``before`` is read under the write's
        # lock, by the store.
        current = await parts.store.get_tenant(request.path_params["tenant"])
        default_class = (
            current.default_class if patch.default_class is msgspec.UNSET else patch.default_class
        )
        given = (
            current.allowed_classes
            if patch.allowed_classes is msgspec.UNSET
            else patch.allowed_classes
        )
        allowed = allowed_classes(default_class, given)
        if allowed != given:
            patch = msgspec.structs.replace(patch, allowed_classes=allowed)
        tenant = await parts.store.update_tenant(
            current.tenant_id, patch, audit=AuditDraft(actor, "tenant.update")
        )
        await tenant_changed(tenant)
        return json_response(tenant)

    async def delete_tenant(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        tenant = await parts.store.delete_tenant(
            request.path_params["tenant"], audit=AuditDraft(actor, "tenant.delete")
        )
        await parts.admin_changed(AdminChange("tenant_deleted", tenant.tenant_id))
        return Response(status_code=204)

    async def usage(request: Request) -> Response:
        await parts.auth.require_admin(request)
        kind: BudgetPeriod
        match request.query_params.get("period", "month"):
            case "day":
                kind = "day"
            case "month":
                kind = "month"
            case _:
                raise ClientError("period must be 'day' or 'month'", param="period")
        at = request.query_params.get("at")
        if at is not None and _PERIOD_NAME.fullmatch(at) is None:
            raise ClientError("at must be YYYY-MM-DD or YYYY-MM", param="at")
        tenant = await parts.store.get_tenant(request.path_params["tenant"])
        await parts.usage.flush()  # include requests that finished a moment ago
        rows = await parts.store.usage(tenant.tenant_id, kind, period=at)
        return json_response(UsageList(rows))

    async def workers(request: Request) -> Response:
        await parts.auth.require_admin(request)
        return json_response(WorkerList(parts.registry.statuses()))

    def status_of(handle: WorkerHandle) -> WorkerStatus:
        return handle.status(parts.registry.clock())

    def worker_named(request: Request) -> WorkerHandle:
        name = request.path_params["worker"]
        handle = parts.registry.find(name)
        if handle is None:
            raise NotFound(f"no worker has the id or URL {name!r}")
        return handle

    def view(handle: WorkerHandle) -> dict[str, Any]:
        return worker_view(handle, parts.registry.clock())

    async def add_worker(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        spec = await _read_json(request, NewWorker)
        known = parts.registry.find_url(spec.url)
        before = None if known is None else view(known)
        handle, is_new = parts.registry.add(spec.url, spec.role, source="admin")
        await audit.record(actor, "worker.add", handle.url, before=before, after=view(handle))
        return json_response(status_of(handle), 201 if is_new else 200)

    async def remove_worker(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        handle = worker_named(request)
        before = view(handle)
        parts.registry.remove(handle, reason="by the admin")
        await audit.record(actor, "worker.remove", handle.url, before=before)
        return Response(status_code=204)

    async def drain_worker(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        handle = worker_named(request)
        before = view(handle)
        parts.registry.drain(handle)
        await parts.registry.refresh(handle)  # drained already? (a poll: seconds at most)
        await audit.record(actor, "worker.drain", handle.url, before=before, after=view(handle))
        return json_response(status_of(handle), 200 if handle.state == "drained" else 202)

    async def undrain_worker(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        handle = worker_named(request)
        before = view(handle)
        parts.registry.undrain(handle)
        await audit.record(actor, "worker.undrain", handle.url, before=before, after=view(handle))
        return json_response(status_of(handle))

    tenants, tenant = "/admin/v1/tenants", "/admin/v1/tenants/{tenant}"
    tenant_param = (PathParam("tenant", "the tenant's id or name", _ID_SCHEMA),)
    worker_param = (
        PathParam(
            "worker",
            "the worker's id, or its URL (URL-encoded)",
            {"type": "string", "minLength": 1, "maxLength": MAX_URL_LENGTH},
        ),
    )
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
            path_params=tenant_param,
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
            path_params=tenant_param,
        ),
        Endpoint(
            "DELETE",
            tenant,
            delete_tenant,
            "Delete a tenant with its keys and usage",
            "admin",
            status=204,
            errors=read_errors,
            path_params=tenant_param,
        ),
        Endpoint(
            "GET",
            tenant + "/usage",
            usage,
            "A tenant's usage per day or month",
            "admin",
            response=UsageList,
            errors=write_errors,
            path_params=tenant_param,
            query=(
                QueryParam(
                    "period",
                    "day or month (default month)",
                    {"type": "string", "enum": ["day", "month"]},
                ),
                QueryParam(
                    "at",
                    "one period only: YYYY-MM-DD or YYYY-MM (a period with nothing recorded, of "
                    "either kind, is one row of zeros)",
                    {"type": "string", "pattern": "^" + _PERIOD_NAME.pattern + "$"},
                ),
            ),
        ),
        Endpoint(
            "GET",
            _WORKERS,
            workers,
            "State and load of every worker",
            "admin",
            response=WorkerList,
            errors=(401, 403),
        ),
        Endpoint(
            "POST",
            _WORKERS,
            add_worker,
            "Add a worker by URL (polled at once; it serves once it is found ready)",
            "admin",
            request_body=NewWorker,
            response=WorkerStatus,
            status=201,
            errors=(400, 401, 403, 409),
        ),
        Endpoint(
            "DELETE",
            _WORKER,
            remove_worker,
            "Remove a worker (its requests move to other workers)",
            "admin",
            status=204,
            errors=read_errors,
            path_params=worker_param,
        ),
        Endpoint(
            "POST",
            _WORKER + "/drain",
            drain_worker,
            "Drain a worker: it takes no new requests, and is drained once its own are done",
            "admin",
            response=WorkerStatus,
            status=202,
            errors=read_errors,
            path_params=worker_param,
        ),
        Endpoint(
            "POST",
            _WORKER + "/undrain",
            undrain_worker,
            "Undrain a worker: it takes new requests again",
            "admin",
            response=WorkerStatus,
            errors=read_errors,
            path_params=worker_param,
        ),
    ]


def registration_routes(
    registration_token: str, registry: WorkerRegistry, store: TenantStore
) -> list[Route]:
    """The workers' own routes (module docstring), with this token ("": off), audited in
    ``store``."""
    audit = AuditLog(store)

    def require_registration_token(request: Request) -> None:
        token = registration_token
        if not token:
            raise PermissionDenied(
                "self-registration is off on this gateway (gateway.registration_token)"
            )
        secret = bearer_token(request)
        if secret is None:
            raise InvalidApiKey("missing registration token: send it as 'Authorization: Bearer …'")
        if not hmac.compare_digest(secret.encode(), token.encode()):
            raise InvalidApiKey("invalid registration token")

    async def register(request: Request) -> Response:
        require_registration_token(request)
        spec = await _read_json(request, WorkerRegistration)
        handle, is_new = registry.add(
            spec.url, spec.role, source="registered", heartbeat_s=spec.heartbeat_s
        )
        if is_new:  # a renewal (the heartbeat) changes nothing
            after = worker_view(handle, registry.clock())
            actor = _actor(request, "registration-token")
            await audit.record(actor, "worker.register", handle.url, after=after)
        return json_response(handle.status(registry.clock()), 201 if is_new else 200)

    async def unregister(request: Request) -> Response:
        require_registration_token(request)
        spec = await _read_json(request, WorkerDeregistration)
        handle = registry.find_url(spec.url)
        if handle is not None:  # one already gone is what it asks for
            if handle.source != "registered":
                raise Conflict(
                    f"{handle.url} was not registered by itself ({handle.source}): only the "
                    "admin removes it"
                )
            before = worker_view(handle, registry.clock())
            registry.remove(handle, reason="it unregistered", by_admin=False)
            actor = _actor(request, "registration-token")
            await audit.record(actor, "worker.unregister", handle.url, before=before)
        return Response(status_code=204)

    return [
        Route(REGISTER_PATH, register, methods=["POST"]),
        Route(UNREGISTER_PATH, unregister, methods=["POST"]),
    ]
