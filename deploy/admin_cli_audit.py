"""``fairgate admin audit``: the audit log of admin changes as a table, newest first.

Each row: when (UTC), which credential (``admin-token:3f9a1c2b``: the first hex digits of its
SHA-256, never the token), the action, its target, the tenant it concerns, and what changed,
compactly: ``created name=acme, weight=1``, ``deleted``, or the fields that differ,
``weight: 1 → 2, quotas.tokens_per_minute: - → 5000``. ``--since`` takes an ISO 8601 time or a
span back from now: ``1h``, ``7d`` (or ``--since=-1h``: argparse takes a separate ``-1h`` for a
flag). Used by ``deploy.admin_cli``. Torch-free.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from deploy.admin_cli_keys import parse_time

__all__ = [
    "AUDIT_COLUMNS",
    "MAX_CHANGE_CHARS",
    "add_audit_parser",
    "audit_params",
    "audit_row",
    "parse_since",
]

AUDIT_COLUMNS = ["time", "actor", "action", "target", "tenant_id", "change"]
MAX_CHANGE_CHARS = 120  # a longer change is cut, ending in "…" (--json has all of it)
_BARE_SPAN = re.compile(r"[0-9]+(?:\.[0-9]+)?[smhd]")


def parse_since(text: str) -> float:
    """``--since``: ISO 8601, or a span back from now, signed or not (``1h`` is ``-1h``)."""
    text = text.strip()
    if _BARE_SPAN.fullmatch(text):
        text = "-" + text
    if text.startswith("+"):
        raise argparse.ArgumentTypeError(f"{text!r}: --since is in the past (e.g. 1h, -7d)")
    return parse_time(text)


def add_audit_parser(nouns: Any) -> None:
    audit = nouns.add_parser(
        "audit",
        help="the audit log of admin changes (who changed what, when, from what to what)",
        description="Every admin change, newest first: time (UTC), the credential that made it "
        "(admin-token:… or registration-token:…: the first hex digits of its SHA-256), the "
        "action, its target, the tenant, and what changed (before → after; --json: the whole "
        "records).",
    )
    audit.add_argument(
        "--since",
        type=parse_since,
        default=None,
        metavar="ISO8601|1h",
        help="only changes at or after this: an ISO 8601 time, or Nh / Nd / Nm back from now "
        "(also --since=-1h)",
    )
    audit.add_argument("--tenant", default=None, help="only this tenant's (id or name)")
    audit.add_argument(
        "--limit", type=int, default=100, help="at most this many records (default 100)"
    )


def audit_params(args: argparse.Namespace) -> dict[str, str]:
    params = {"limit": str(args.limit)}
    if args.since is not None:
        params["since"] = repr(args.since)
    if args.tenant is not None:
        params["tenant"] = args.tenant
    return params


def audit_row(record: dict[str, Any]) -> dict[str, Any]:
    """An ``AuditRecord`` as the table shows it."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record["at"])),
        "actor": record["actor"],
        "action": record["action"],
        "target": record["target"],
        "tenant_id": record["tenant_id"] or None,
        "change": _cut(_change(record.get("before"), record.get("after"))),
    }


def _change(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    if before is None and after is None:
        return "-"
    if before is None:
        assert after is not None
        shown = {k: v for k, v in _flat(after).items() if v is not None}
        return "created " + ", ".join(f"{k}={_value(k, v)}" for k, v in shown.items())
    if after is None:
        return "deleted"
    old, new = _flat(before), _flat(after)
    changed = [
        f"{k}: {_value(k, old.get(k))} → {_value(k, new.get(k))}"
        for k in [*old, *(k for k in new if k not in old)]
        if old.get(k) != new.get(k)
    ]
    return ", ".join(changed) or "no change"


def _flat(thing: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted keys; ``None`` values of a creation's objects are kept (a
    change from or to ``None`` shows)."""
    flat: dict[str, Any] = {}
    for key, value in thing.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_at") and isinstance(value, int | float):  # a time: UTC
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{}"
    return str(value)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHANGE_CHARS else text[: MAX_CHANGE_CHARS - 1] + "…"
