"""The admin API's read of the audit log (``fairgate admin audit``); the admin token only.

    GET    /admin/v1/audit?since=&tenant=&limit=  the admin changes, newest first → AuditList

``since``: Unix seconds (``fairgate admin audit`` turns ISO 8601 times and spans like ``1h`` into
them): only records at or after it. ``tenant``: a tenant's id or name; the id of a deleted tenant
still finds its records (they outlive it). ``limit``: at most this many records, 1 to
``MAX_AUDIT_LIMIT`` (default 100). The records are written by the routes that change things
(``gateway.audit``). Torch-free.
"""

from __future__ import annotations

import contextlib
import re

from starlette.requests import Request
from starlette.responses import Response

from gateway.admin import AdminParts, json_response
from gateway.audit import MAX_AUDIT_LIMIT, AuditList
from gateway.errors import ClientError, NotFound
from gateway.openapi_document import Endpoint, QueryParam
from gateway.tenants import MAX_TIME

__all__ = ["DEFAULT_AUDIT_LIMIT", "audit_endpoints", "parse_since"]

DEFAULT_AUDIT_LIMIT = 100
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")  # JSON's


def parse_since(text: str) -> float:
    """``since`` as Unix seconds: a JSON number from 0 to ``MAX_TIME``; ``ValueError``."""
    if _NUMBER.fullmatch(text) is None:
        raise ValueError(text)
    since = float(text)
    if not 0 <= since <= MAX_TIME:
        raise ValueError(text)
    return since


def audit_endpoints(parts: AdminParts) -> list[Endpoint]:
    async def list_audit(request: Request) -> Response:
        await parts.auth.require_admin(request)
        query = request.query_params
        since = None
        if "since" in query:
            try:
                since = parse_since(query["since"])
            except ValueError as exc:
                raise ClientError(
                    f"since is Unix seconds, from 0 to {MAX_TIME:.0f}", param="since"
                ) from exc
        limit = DEFAULT_AUDIT_LIMIT
        if "limit" in query:
            text = query["limit"]
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_AUDIT_LIMIT:
                raise ClientError(f"limit is 1 to {MAX_AUDIT_LIMIT}", param="limit")
            limit = int(text)
        tenant_id = query.get("tenant")
        if tenant_id is not None:
            # A deleted tenant's id names no tenant: its records are still there.
            with contextlib.suppress(NotFound):
                tenant_id = (await parts.store.get_tenant(tenant_id)).tenant_id
        records = await parts.store.list_audit(since=since, tenant_id=tenant_id, limit=limit)
        return json_response(AuditList(records))

    return [
        Endpoint(
            "GET",
            "/admin/v1/audit",
            list_audit,
            "The audit log of admin changes, newest first",
            "admin",
            response=AuditList,
            errors=(400, 401, 403),
            query=(
                QueryParam(
                    "since",
                    "only records at or after this time (Unix seconds)",
                    {"type": "number", "minimum": 0, "maximum": MAX_TIME},
                ),
                QueryParam(
                    "tenant",
                    "only this tenant's records (its id or name; a deleted tenant's id)",
                    {"type": "string"},
                ),
                QueryParam(
                    "limit",
                    f"at most this many records (default {DEFAULT_AUDIT_LIMIT})",
                    {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_LIMIT},
                ),
            ),
        ),
    ]
