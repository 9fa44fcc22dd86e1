"""``fairgate admin …``: the admin API from the command line, as tables or ``--json``.

Where the gateway is and its admin token come from ``--url`` / ``FAIRGATE_URL`` and
``FAIRGATE_ADMIN_TOKEN``, or else from the ``credentials.json`` that ``fairgate up`` wrote in
``--state-dir``. The token is never taken as a flag (it would show in ``ps``). A worker is named
by its id or its URL, a model by its id and an alias by its name (each sent URL-encoded: model
ids hold slashes). A key's limits and expiry are ``deploy.admin_cli_keys``'; the audit log's
table is ``deploy.admin_cli_audit``'s. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from deploy.admin_cli_audit import AUDIT_COLUMNS, add_audit_parser, audit_params, audit_row
from deploy.admin_cli_keys import add_key_parsers, key_fields, key_row

__all__ = ["AdminCliError", "add_admin_parser", "format_table", "run_admin"]

QUOTA_FLAGS = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "concurrency": "max_concurrent_requests",
    "budget": "token_budget",
}
# ``--model-quota MODEL:FIELD=N``: a field of ``gateway.tenants.Quotas``, or its short flag.
MODEL_QUOTA_FIELDS = [*QUOTA_FLAGS.values(), "budget_period"]
MEASURED = "measured"  # ``models set-cost MODEL measured``: the gateway measures it again


class AdminCliError(RuntimeError):
    """The gateway refused, or could not be reached."""


def add_admin_parser(commands: Any) -> None:
    admin = commands.add_parser(
        "admin",
        help="administer tenants, keys, quotas, workers, models and aliases; read usage and "
        "the audit log",
        description="Talks to the gateway's admin API. Gateway and token: --url / FAIRGATE_URL "
        "and FAIRGATE_ADMIN_TOKEN, else the credentials.json of `fairgate up` in --state-dir.",
    )
    admin.add_argument("--url", default=None, help="the gateway (default: FAIRGATE_URL)")
    admin.add_argument(
        "--state-dir",
        default=None,
        help="where `fairgate up` wrote credentials.json (default: its default)",
    )
    admin.add_argument("--json", action="store_true", help="print the API's JSON")
    nouns = admin.add_subparsers(dest="admin_noun", required=True, metavar="NOUN")

    tenants = nouns.add_parser("tenants", help="list, create, show, update, delete tenants")
    actions = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every tenant")
    create = actions.add_parser("create", help="a new tenant")
    create.add_argument("name")
    _add_tenant_flags(create)
    show = actions.add_parser("show", help="one tenant, by id or name")
    show.add_argument("tenant")
    update = actions.add_parser("update", help="change a tenant (quotas are merged)")
    update.add_argument("tenant")
    update.add_argument("--name", dest="new_name", default=None, help="rename")
    _add_tenant_flags(update)
    delete = actions.add_parser("delete", help="a tenant with its keys and usage")
    delete.add_argument("tenant")

    keys = nouns.add_parser("keys", help="create, list, update, revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_key_parsers(actions)
    key_list = actions.add_parser("list", help="keys, optionally of one tenant or prefix")
    key_list.add_argument("--tenant", default=None)
    key_list.add_argument("--prefix", default=None, help="e.g. fg-Ab3d")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")

    usage = nouns.add_parser("usage", help="a tenant's usage per day or month")
    usage.add_argument("tenant")
    usage.add_argument("--period", choices=["day", "month"], default="month")
    usage.add_argument("--at", default=None, help="one period: YYYY-MM-DD or YYYY-MM")

    workers = nouns.add_parser(
        "workers",
        help="list (the default), add, remove, drain, undrain workers",
        description="Without ACTION: every worker with its state (ready, draining, drained, "
        "not_ready, ejected, dead, incompatible, unknown), where it came from (config, admin, "
        "registered) and its load. Only ready workers take new requests.",
    )
    actions = workers.add_subparsers(dest="action", required=False, metavar="ACTION")
    actions.add_parser("list", help="every worker with its state and load (the default)")
    worker_add = actions.add_parser(
        "add",
        help="add a worker by URL; it is polled at once and serves once found ready",
        description="Add the worker at URL. Adding a URL the gateway knows with the same role "
        "changes nothing; with another role it is refused. A worker of another model joins that "
        "model's pool; one that does not match (its role, protocol or block size, or its "
        "model's pool: tokenizer, KV layout) shows as incompatible and gets no requests.",
    )
    # Not dest "url": that is the gateway's (--url), in the same namespace.
    worker_add.add_argument(
        "worker_url", metavar="URL", help="its base URL, e.g. http://10.0.0.5:8201"
    )
    worker_add.add_argument(
        "--role", required=True, choices=["prefill", "decode", "colocated"], help="its role"
    )
    for action, text in (
        ("remove", "remove a worker; the requests running there move to other workers"),
        ("drain", "stop sending a worker new requests; it is drained once its own are done"),
        ("undrain", "send a drained or draining worker new requests again"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("worker", help="its id or URL")

    models = nouns.add_parser(
        "models",
        help="list models (the default); set a model's cost factor",
        description="Without ACTION: every model a worker announced, and every model only an "
        "alias names (no worker yet), with its aliases, context length (CTX: what its ready "
        "workers all take), workers ready/total per role, queue (requests, prompt tokens, "
        "estimated wait) and cost factor with where it comes from (admin; measured from its "
        "workers' speeds; unmeasured: 1).",
    )
    actions = models.add_subparsers(dest="action", required=False, metavar="ACTION")
    actions.add_parser("list", help="every model with its workers, queue and cost (the default)")
    set_cost = actions.add_parser(
        "set-cost",
        help="set a model's cost factor, or measure it again",
        description="What one token of MODEL costs in tokens of the reference model (the "
        "gateway's own), from 0.01 to 100: tenants' fair shares and usage count its tokens "
        f"times it. '{MEASURED}' drops the admin's factor: the gateway measures it again from "
        "its workers' speeds. Takes effect for requests admitted from now on.",
    )
    set_cost.add_argument("model", help="the model's id")
    set_cost.add_argument(
        "factor", type=_cost_factor, metavar=f"FACTOR|{MEASURED}", help="0.01 to 100"
    )

    aliases = nouns.add_parser(
        "aliases",
        help="list (the default), set, delete model aliases",
        description="An alias is a name tenants may use for a model (e.g. chat-small); moving "
        "it moves their requests at once, with nothing changed on their side. A tenant allowed "
        "an alias follows it when it moves.",
    )
    actions = aliases.add_subparsers(dest="action", required=False, metavar="ACTION")
    actions.add_parser("list", help="every alias and the model it names (the default)")
    alias_set = actions.add_parser(
        "set",
        help="point an alias at a model (create it, or move it)",
        description="Point ALIAS at MODEL, a model a worker announced. An alias may not be a "
        "model's id.",
    )
    alias_set.add_argument("alias")
    alias_set.add_argument("model", help="the model's id")
    alias_delete = actions.add_parser("delete", help="delete an alias")
    alias_delete.add_argument("alias")

    add_audit_parser(nouns)


def _add_tenant_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", type=float, default=None, help="fair-share weight")
    parser.add_argument("--default-class", default=None, help="SLO class when none is asked")
    parser.add_argument(
        "--allowed-classes",
        default=None,
        help="comma-separated SLO classes (the default class is always allowed)",
    )
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent requests")
    parser.add_argument("--budget", type=int, default=None, help="tokens per budget period")
    parser.add_argument("--budget-period", choices=["day", "month"], default=None)
    parser.add_argument(
        "--unlimited",
        action="append",
        default=[],
        choices=sorted(QUOTA_FLAGS),
        help="remove a limit (repeatable)",
    )
    parser.add_argument(
        "--over-quota",
        choices=["reject", "demote"],
        default=None,
        help="429, or serve at the lowest class and weight",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated models (ids or aliases) the tenant may use; '' or 'all': every model",
    )
    parser.add_argument(
        "--model-quota",
        action="append",
        default=[],
        type=_model_quota,
        metavar="MODEL:FIELD=N",
        help="a limit on the tenant's requests to one model, by its id (repeatable; merged "
        "with the tenant's); FIELD: "
        + ", ".join(MODEL_QUOTA_FIELDS)
        + " (or "
        + ", ".join(QUOTA_FLAGS)
        + "); N 'none' removes that limit, and a model left with no limit is removed",
    )


def _cost_factor(text: str) -> float | None:
    if text == MEASURED:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or {MEASURED!r}") from None


def _model_quota(text: str) -> tuple[str, str, int | str | None]:
    """``MODEL:FIELD=N`` → (model, Quotas field, value). A model id may hold ``:``; a field
    does not, so the last one splits."""
    named, is_set, value = text.rpartition("=")
    model, has_field, field = named.rpartition(":")
    field = QUOTA_FLAGS.get(field, field)
    if not (is_set and has_field and model) or field not in MODEL_QUOTA_FIELDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MODEL:FIELD=N with FIELD one of {', '.join(MODEL_QUOTA_FIELDS)}"
        )
    if field == "budget_period":
        if value not in ("day", "month"):
            raise argparse.ArgumentTypeError(f"{text!r}: budget_period is day or month")
        return model, field, value
    if value == "none":
        return model, field, None
    try:
        return model, field, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: N is an integer or 'none'") from None


def run_admin(args: argparse.Namespace) -> int:
    try:
        if args.admin_noun == "keys" and args.action in ("create", "update"):
            key_fields(args, {})  # refuse conflicting flags before calling the gateway
        url, token = _connection(args)
        with httpx.Client(
            base_url=url, timeout=30.0, headers={"authorization": f"Bearer {token}"}
        ) as client:
            result, columns = _call(client, args)
    except (AdminCliError, argparse.ArgumentTypeError) as exc:
        print(f"fairgate admin: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif columns:
        rows = result["data"] if isinstance(result, dict) and "data" in result else [result]
        view = _ROW_VIEWS.get(args.admin_noun)
        print(format_table([view(row) for row in rows] if view else rows, columns))
    return 0


def _connection(args: argparse.Namespace) -> tuple[str, str]:
    url = args.url or os.environ.get("FAIRGATE_URL")
    token = os.environ.get("FAIRGATE_ADMIN_TOKEN")
    if url is None or token is None:
        from deploy.stack import CREDENTIALS_FILE, default_state_dir

        path = Path(args.state_dir or default_state_dir()) / CREDENTIALS_FILE
        try:
            credentials = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AdminCliError(
                f"no gateway given (--url / FAIRGATE_URL, FAIRGATE_ADMIN_TOKEN) and no readable "
                f"{path}: {exc}"
            ) from exc
        url = url or credentials["base_url"]
        token = token or credentials["admin_token"]
    assert url is not None and token is not None
    return url, token


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise AdminCliError(f"{client.base_url}: {exc}") from exc
    if response.status_code == 204:
        return {}
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text, "code": None}}
    if not response.is_success:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise AdminCliError(
            f"{error.get('message', response.text)} (HTTP {response.status_code}, "
            f"{error.get('code')})"
        )
    return body


TENANT_COLUMNS = [
    "tenant_id",
    "name",
    "weight",
    "default_class",
    "over_quota",
    "quotas",
    "models",
    "model_quotas",
]
KEY_COLUMNS = [
    "key_id",
    "tenant_id",
    "prefix",
    "name",
    "quotas",
    "expires_at",
    "created_at",
    "revoked_at",
]
USAGE_COLUMNS = ["period", "requests", "prompt_tokens", "cached_tokens", "completion_tokens"]
MODEL_COLUMNS = [
    "model",
    "aliases",
    "ctx",
    "workers",
    "queued",
    "queued_tokens",
    "est_wait",
    "factor",
    "source",
]
ALIAS_COLUMNS = ["alias", "model_id", "updated_at"]
WORKER_COLUMNS = [
    "url",
    "role",
    "state",
    "source",
    "model_id",
    "worker_id",
    "inflight_requests",
    "last_error",
    "load",
]


def _call(client: httpx.Client, args: argparse.Namespace) -> tuple[Any, list[str]]:
    noun, action = args.admin_noun, getattr(args, "action", None)
    if noun == "workers":
        if action == "remove":
            _request(client, "DELETE", _worker_path(args.worker))
            if not args.json:
                print(f"removed worker {args.worker}")
            return {"removed": args.worker}, []
        return _call_workers(client, args), WORKER_COLUMNS
    if noun == "models":
        if action == "set-cost":
            body = {"cost_factor": args.factor}
            return _request(client, "PATCH", _model_path(args.model), json=body), MODEL_COLUMNS
        return _request(client, "GET", "/admin/v1/models"), MODEL_COLUMNS
    if noun == "aliases":
        return _call_aliases(client, args)
    if noun == "usage":
        params = {"period": args.period, **({"at": args.at} if args.at else {})}
        path = f"/admin/v1/tenants/{args.tenant}/usage"
        return _request(client, "GET", path, params=params), USAGE_COLUMNS
    if noun == "audit":
        return _request(client, "GET", "/admin/v1/audit", params=audit_params(args)), AUDIT_COLUMNS
    if noun == "keys":
        if action == "create":
            path = f"/admin/v1/tenants/{args.tenant}/keys"
            created = _request(client, "POST", path, json=key_fields(args, {}))
            return created, [] if args.json else _print_created_key(created)
        if action == "update":
            path = f"/admin/v1/keys/{quote(args.key_id, safe='')}"
            current = _request(client, "GET", path)
            patch = key_fields(args, current["quotas"])
            return _request(client, "PATCH", path, json=patch), KEY_COLUMNS
        if action == "revoke":
            return _request(client, "POST", f"/admin/v1/keys/{args.key_id}/revoke"), KEY_COLUMNS
        params = {k: v for k, v in (("tenant", args.tenant), ("prefix", args.prefix)) if v}
        return _request(client, "GET", "/admin/v1/keys", params=params), KEY_COLUMNS
    # tenants
    if action == "list":
        return _request(client, "GET", "/admin/v1/tenants"), TENANT_COLUMNS
    if action == "show":
        return _request(client, "GET", f"/admin/v1/tenants/{args.tenant}"), TENANT_COLUMNS
    if action == "delete":
        _request(client, "DELETE", f"/admin/v1/tenants/{args.tenant}")
        if not args.json:
            print(f"deleted tenant {args.tenant}")
        return {"deleted": args.tenant}, []
    if action == "create":
        body = {
            "name": args.name,
            **_tenant_fields(args, current_quotas={}, current_model_quotas={}),
        }
        return _request(client, "POST", "/admin/v1/tenants", json=body), TENANT_COLUMNS
    current = _request(client, "GET", f"/admin/v1/tenants/{args.tenant}")
    patch = _tenant_fields(
        args, current_quotas=current["quotas"], current_model_quotas=current["model_quotas"]
    )
    if args.new_name is not None:
        patch["name"] = args.new_name
    path = f"/admin/v1/tenants/{current['tenant_id']}"
    return _request(client, "PATCH", path, json=patch), TENANT_COLUMNS


def _call_workers(client: httpx.Client, args: argparse.Namespace) -> Any:
    action = args.action or "list"
    if action == "list":
        return _request(client, "GET", "/admin/v1/workers")
    if action == "add":
        return _request(
            client, "POST", "/admin/v1/workers", json={"url": args.worker_url, "role": args.role}
        )
    return _request(client, "POST", f"{_worker_path(args.worker)}/{action}")  # drain, undrain


def _call_aliases(client: httpx.Client, args: argparse.Namespace) -> tuple[Any, list[str]]:
    action = args.action or "list"
    if action == "list":
        return _request(client, "GET", "/admin/v1/aliases"), ALIAS_COLUMNS
    if action == "set":
        body = {"model": args.model}
        return _request(client, "PUT", _alias_path(args.alias), json=body), ALIAS_COLUMNS
    _request(client, "DELETE", _alias_path(args.alias))
    if not args.json:
        print(f"deleted alias {args.alias}")
    return {"deleted": args.alias}, []


def _worker_path(worker: str) -> str:
    return "/admin/v1/workers/" + quote(worker, safe="")  # a URL's slashes too


def _model_path(model: str) -> str:
    return "/admin/v1/models/" + quote(model, safe="")  # an id's slashes too


def _alias_path(alias: str) -> str:
    return "/admin/v1/aliases/" + quote(alias, safe="")


def _tenant_fields(
    args: argparse.Namespace,
    *,
    current_quotas: dict[str, Any],
    current_model_quotas: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.weight is not None:
        fields["weight"] = args.weight
    if args.default_class is not None:
        fields["default_class"] = args.default_class
    if args.allowed_classes is not None:
        fields["allowed_classes"] = [c.strip() for c in args.allowed_classes.split(",") if c]
    if args.over_quota is not None:
        fields["over_quota"] = args.over_quota
    quotas = dict(current_quotas)
    for flag, field in QUOTA_FLAGS.items():
        if getattr(args, flag) is not None:
            quotas[field] = getattr(args, flag)
        if flag in args.unlimited:
            quotas[field] = None
    if args.budget_period is not None:
        quotas["budget_period"] = args.budget_period
    if quotas != current_quotas:
        fields["quotas"] = quotas
    if args.models is not None:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        fields["allowed_models"] = [] if names == ["all"] else names
    model_quotas = _merged_model_quotas(current_model_quotas, args.model_quota)
    if model_quotas != current_model_quotas:
        fields["model_quotas"] = model_quotas
    return fields


def _merged_model_quotas(
    current: dict[str, dict[str, Any]], changes: Sequence[tuple[str, str, Any]]
) -> dict[str, dict[str, Any]]:
    """``current`` with each (model, field, value) of ``--model-quota`` set; a model left with
    no limit is dropped."""
    merged = {model: dict(quotas) for model, quotas in current.items()}
    for model, field, value in changes:
        merged.setdefault(model, {})[field] = value
    return {
        model: quotas
        for model, quotas in merged.items()
        if any(quotas.get(field) is not None for field in QUOTA_FLAGS.values())
    }


def _print_created_key(created: dict[str, Any]) -> list[str]:
    key = created["key"]
    print(f"key {key['key_id']} for tenant {key['tenant_id']}")
    limits = _cell(key.get("quotas") or {})
    if limits != "-" or key.get("expires_at") is not None:
        print(f"limits: {limits}; expires: {key_row(key)['expires_at']}")
    print(f"secret (shown once, store it now): {created['secret']}")
    return []


def _tenant_row(tenant: dict[str, Any]) -> dict[str, Any]:
    by_model = tenant.get("model_quotas") or {}
    return {
        **tenant,
        "models": ",".join(tenant.get("allowed_models") or []) or "all",
        "model_quotas": ";".join(f"{m}:{_cell(q)}" for m, q in by_model.items()) or None,
    }


def _model_row(status: dict[str, Any]) -> dict[str, Any]:
    """A ``ModelStatus`` as the table shows it: workers ready/total per role."""
    by_role: dict[str, list[int]] = {}
    for count in status["workers"]:
        ready_total = by_role.setdefault(count["role"], [0, 0])
        ready_total[0] += count["num_workers"] if count["state"] == "ready" else 0
        ready_total[1] += count["num_workers"]
    wait = status["est_wait_s"]
    return {
        "model": status["model"],
        "aliases": status["aliases"] or None,
        "ctx": status["max_model_len"],
        "workers": ",".join(f"{role}={r}/{t}" for role, (r, t) in by_role.items()) or None,
        "queued": status["num_queued"],
        "queued_tokens": status["num_queued_tokens"],
        "est_wait": None if wait is None else f"{wait:.1f}s",
        "factor": status["cost_factor"],
        "source": status["cost_source"],
    }


def _alias_row(alias: dict[str, Any]) -> dict[str, Any]:
    updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(alias["updated_at"]))
    return {**alias, "updated_at": updated}


# How a noun's rows are shown in a table (the API's JSON as it is with ``--json``).
_ROW_VIEWS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tenants": _tenant_row,
    "models": _model_row,
    "aliases": _alias_row,
    "keys": key_row,
    "audit": audit_row,
}


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned text columns; nested values compactly (``None`` fields of a dict left
    out), missing values as ``-``."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        shown = {k: v for k, v in value.items() if v is not None and not isinstance(v, dict)}
        return ",".join(f"{k}={v}" for k, v in shown.items()) or "-"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
