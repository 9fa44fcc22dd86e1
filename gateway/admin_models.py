"""The admin API of the models behind the gateway and their aliases (``fairgate admin models``,
``fairgate admin aliases``). Every route needs the admin token; a tenant key gets 403.

    GET    /admin/v1/models                       each model's workers, queue, context and cost
    PATCH  /admin/v1/models/{model}               set or clear its cost factor
                                                  ModelPatch → ModelStatus
    GET    /admin/v1/aliases                      every alias
    PUT    /admin/v1/aliases/{alias}              point an alias at a model
                                                  AliasTarget → 201 ModelAlias (new)
                                                  (200: it existed and now names this model)
    DELETE /admin/v1/aliases/{alias}              delete → 204

The models listed are those a worker announced (each one's pool, ``gateway.pools``, live or
not), and those only an alias names (no worker yet: none counted). ``{model}`` and ``{alias}``
take slashes (model ids are often ``org/name``; URL-encoded or not, the server decodes the path
before routing: ``model_routing_path``).

A cost factor (``gateway.model_costs``) is what one token of the model costs in tokens of the
reference model, within [0.01, 100]; ``null`` hands it back to the measurement. An alias names a
model a worker announced (else 400 naming the known ones), and is never a model's id (409). A
change is in the store before the answer, with its record in the audit log (``gateway.audit``)
in the same transaction (both are kept or neither: an audit write that fails fails the change):
a model's admin cost factor (``null``: measured) before and after, an alias before and after.
Then it is applied on this replica (the catalog resolves a moved alias at the next request) and
sent to the others (``AdminChange("models")``: they read the aliases and factors again from the
store). A patch that changes nothing is recorded too (before = after); a route that fails
writes no record. Torch-free.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import _read_json, admin_actor, json_response
from gateway.audit import AuditDraft
from gateway.auth import Authenticator
from gateway.errors import ClientError, NotFound
from gateway.model_catalog import ModelCatalog
from gateway.model_costs import MAX_FACTOR, MIN_FACTOR, CostBook
from gateway.openapi_document import Endpoint, PathParam
from gateway.replica_sync import AdminChange
from gateway.scheduler import ModelBacklog
from gateway.tenants import MAX_MODEL_NAME_LEN, ModelAlias, ModelName, ModelSetting, TenantStore
from gateway.workers import WorkerRegistry, WorkerState
from transfer.messages import WorkerRole

__all__ = [
    "MODEL_ADMIN_OTHER_SUCCESSES",
    "AliasList",
    "AliasTarget",
    "ModelAdminParts",
    "ModelList",
    "ModelPatch",
    "ModelStatus",
    "WorkerCount",
    "model_admin_endpoints",
    "model_routing_path",
]

# A model id or alias in a path: printable (``tenants.ModelName``) and not only dots, which a
# client's URL handling would take for "this" or "the parent" path segment and drop. For the
# document; the handlers look a name up, and one that names nothing is a 404 (a new alias's
# name is checked: ``AliasName``).
_CONTROLS = r"\x00-\x1f\x7f-\x9f"
_NAME_PATTERN = rf"^[^{_CONTROLS}]*[^{_CONTROLS}.][^{_CONTROLS}]*\Z"
AliasName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_MODEL_NAME_LEN, pattern=_NAME_PATTERN)
]
_NAME_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_MODEL_NAME_LEN,
    "pattern": _NAME_PATTERN.removesuffix(r"\Z") + "$",  # ECMA's end of string
}
CostFactor = Annotated[float, msgspec.Meta(ge=MIN_FACTOR, le=MAX_FACTOR)]


class WorkerCount(msgspec.Struct, frozen=True):
    """How many of a model's workers have this role and are in this state (``gateway.workers``:
    only ``ready`` ones take new requests)."""

    role: WorkerRole
    state: WorkerState
    num_workers: int


class ModelStatus(msgspec.Struct, frozen=True):
    """A model as the admin API shows it. ``aliases``: the aliases naming it, sorted;
    ``max_model_len``: the longest sequence its ready workers all take, else what its first
    worker announced (None: no worker yet); ``workers``: its workers by role and state (none
    listed: no worker yet; one that never answered announced no model and is in none);
    ``is_ready``: a colocated worker, or a prefill and a decode worker,
    are ready (else its requests get 503); the queue: requests and prompt tokens waiting, and
    the estimated wait of one arriving now (None: no estimate); the cost factor and where it
    comes from (``gateway.model_costs``), with the measured seconds of worker time per token
    (None: not measured)."""

    model: str
    aliases: list[str]
    max_model_len: int | None
    workers: list[WorkerCount]
    is_ready: bool
    num_queued: int
    num_queued_tokens: int
    est_wait_s: float | None
    cost_factor: float
    cost_source: Literal["admin", "measured", "unmeasured"]
    seconds_per_token: float | None


class ModelList(msgspec.Struct, frozen=True):
    data: list[ModelStatus]
    object: str = "list"


class AliasList(msgspec.Struct, frozen=True):
    data: list[ModelAlias]
    object: str = "list"


class ModelPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: what to change of a model (absent fields stay as they are).
    ``cost_factor``: what one of its tokens costs in tokens of the reference model; ``null``:
    measured again."""

    cost_factor: CostFactor | msgspec.UnsetType | None = msgspec.UNSET


class AliasTarget(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Admin → gateway: the model an alias names, by its id."""

    model: ModelName


@dataclass(frozen=True, slots=True)
class ModelAdminParts:
    """What the model routes use of the gateway."""

    auth: Authenticator
    store: TenantStore
    registry: WorkerRegistry
    catalog: ModelCatalog
    costs: CostBook
    backlogs: Callable[[], Sequence[ModelBacklog]]  # the policy's, one per model with a queue
    # An alias or a cost factor changed: applied on this replica, then sent to the others.
    admin_changed: Callable[[AdminChange], Awaitable[None]]


_MODELS = "/admin/v1/models"
_MODEL = _MODELS + "/{model}"
_ALIASES = "/admin/v1/aliases"
_ALIAS = _ALIASES + "/{alias}"
# Success statuses beside an endpoint's own, as ``gateway.admin``'s ``_OTHER_SUCCESSES``: the
# document gets them from ``gateway.admin.add_other_successes``.
MODEL_ADMIN_OTHER_SUCCESSES = {
    ("put", _ALIAS): (200, "The alias existed: it now names this model"),
}


class _AnyTextConvertor(PathConvertor):
    """A path parameter that takes any text, slashes and control characters included
    (Starlette's ``path`` stops at a newline): the handler, not the router, refuses a bad
    name, as the document says (400 for a new alias's name, 404 for a name nothing has)."""

    regex = r"[\s\S]*"


register_url_convertor("any_text", _AnyTextConvertor())


def model_routing_path(path: str) -> str:
    """The path an endpoint is routed by: ``{model}`` and ``{alias}`` take any text."""
    return path.replace("{model}", "{model:any_text}").replace("{alias}", "{alias:any_text}")


def model_admin_endpoints(parts: ModelAdminParts) -> list[Endpoint]:
    async def stored_setting(model: str) -> ModelSetting:
        settings = await parts.store.list_model_settings()
        return next((s for s in settings if s.model_id == model), ModelSetting(model))

    async def model_statuses(only: str | None = None) -> list[ModelStatus]:
        """Every model (module docstring), by id; only ``only`` when given."""
        aliases: dict[str, list[str]] = {}
        for stored in await parts.store.list_aliases():  # by name: each list sorted
            aliases.setdefault(stored.model_id, []).append(stored.alias)
        models = sorted({*parts.registry.model_ids(), *aliases})
        backlogs = {b.model: b for b in parts.backlogs()}
        return [
            status_of(model, aliases.get(model, []), backlogs.get(model))
            for model in models
            if only is None or model == only
        ]

    def status_of(model: str, aliases: list[str], backlog: ModelBacklog | None) -> ModelStatus:
        registry = parts.registry
        counts: dict[tuple[WorkerRole, WorkerState], int] = {}
        for handle in registry.handles:
            if handle.info is not None and handle.info.model_id == model:
                key = (handle.role, handle.state)
                counts[key] = counts.get(key, 0) + 1
        pool = registry.pools.get(model)
        max_model_len = registry.max_model_len(model) or (
            None if pool is None else pool.reference.max_model_len
        )
        cost = parts.costs.cost(model)
        return ModelStatus(
            model=model,
            aliases=aliases,
            max_model_len=max_model_len,
            workers=[WorkerCount(role, state, n) for (role, state), n in sorted(counts.items())],
            is_ready=registry.can_serve(model),
            num_queued=0 if backlog is None else backlog.num_queued,
            num_queued_tokens=0 if backlog is None else backlog.num_queued_tokens,
            est_wait_s=None if backlog is None else backlog.est_wait_s,
            cost_factor=cost.factor,
            cost_source=cost.source,
            seconds_per_token=cost.seconds_per_token,
        )

    def served_model(request: Request) -> str:
        """The path's model: one a worker announced, else 404."""
        model: str = request.path_params["model"]
        if model not in parts.registry.model_ids():
            known = ", ".join(parts.registry.model_ids()) or "none"
            raise NotFound(f"no worker announced the model {model!r}; known: {known}")
        return model

    async def aliases_changed() -> None:
        """The store's aliases into this replica's catalog, then to the other replicas."""
        stored = await parts.store.list_aliases()
        parts.catalog.set_aliases({a.alias: a.model_id for a in stored})
        await parts.admin_changed(AdminChange("models"))

    async def list_models(request: Request) -> Response:
        await parts.auth.require_admin(request)
        return json_response(ModelList(await model_statuses()))

    async def update_model(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        patch = await _read_json(request, ModelPatch)
        model = served_model(request)
        draft = AuditDraft(actor, "model.update")
        if patch.cost_factor is not msgspec.UNSET:
            # In the store first: a replica that reloads it must see what this one applies.
            await parts.store.set_cost_factor(model, patch.cost_factor, audit=draft)
            parts.costs.set_admin(model, patch.cost_factor)  # (in bounds: the type's)
            await parts.admin_changed(AdminChange("models"))
        else:  # nothing to change, and so nothing to write with the record
            setting = await stored_setting(model)
            await parts.store.record_audit(draft.record(setting, setting))
        [status] = await model_statuses(only=model)
        return json_response(status)

    async def list_aliases(request: Request) -> Response:
        await parts.auth.require_admin(request)
        return json_response(AliasList(await parts.store.list_aliases()))

    async def set_alias(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        target = await _read_json(request, AliasTarget)
        alias = request.path_params["alias"]
        try:
            msgspec.convert(alias, AliasName)
        except msgspec.ValidationError as exc:
            raise ClientError(f"invalid alias {alias!r}: {exc}", param="alias") from exc
        parts.catalog.check_alias(alias)
        known = parts.registry.model_ids()
        if target.model not in known:
            raise ClientError(
                f"no worker announced the model {target.model!r}; an alias names one of: "
                f"{', '.join(known) or 'none yet'}",
                param="model",
            )
        stored, is_new = await parts.store.set_alias(
            alias, target.model, audit=AuditDraft(actor, "alias.set")
        )
        await aliases_changed()
        return json_response(stored, 201 if is_new else 200)

    async def delete_alias(request: Request) -> Response:
        actor = await admin_actor(parts.auth, request)
        alias = request.path_params["alias"]
        if not await parts.store.delete_alias(alias, audit=AuditDraft(actor, "alias.delete")):
            raise NotFound(f"no alias {alias!r}")
        await aliases_changed()
        return Response(status_code=204)

    model_param = (PathParam("model", "the model's id (URL-encoded)", _NAME_SCHEMA),)
    alias_param = (PathParam("alias", "the alias (URL-encoded)", _NAME_SCHEMA),)
    return [
        Endpoint(
            "GET",
            _MODELS,
            list_models,
            "Every model: its aliases, workers, queue, context length and cost factor",
            "admin",
            response=ModelList,
            errors=(401, 403),
        ),
        Endpoint(
            "PATCH",
            _MODEL,
            update_model,
            "Set a model's cost factor, or with null measure it again",
            "admin",
            request_body=ModelPatch,
            response=ModelStatus,
            errors=(400, 401, 403, 404),
            path_params=model_param,
        ),
        Endpoint(
            "GET",
            _ALIASES,
            list_aliases,
            "Every alias and the model it names",
            "admin",
            response=AliasList,
            errors=(401, 403),
        ),
        Endpoint(
            "PUT",
            _ALIAS,
            set_alias,
            "Point an alias at a model (created, or moved: requests follow at once)",
            "admin",
            request_body=AliasTarget,
            response=ModelAlias,
            status=201,
            errors=(400, 401, 403, 409),
            path_params=alias_param,
        ),
        Endpoint(
            "DELETE",
            _ALIAS,
            delete_alias,
            "Delete an alias",
            "admin",
            status=204,
            errors=(401, 403, 404),
            path_params=alias_param,
        ),
    ]
