"""``fairgate admin keys create|update``: a key's own limits and expiry, as flags.

A key's limits are checked beside its tenant's, each at most the tenant's (the gateway refuses one
over it, naming the field). ``--expires`` takes an ISO 8601 time (UTC unless it names its offset)
or a span from now: ``+30d``, ``+12h``, ``+45m``. ``keys update`` merges the limits given into the
key's (``--unlimited rpm`` removes one) and ``--no-expiry`` makes it never expire. Used by
``deploy.admin_cli``, which sends the bodies built here. Torch-free.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from typing import Any

__all__ = [
    "KEY_QUOTA_FLAGS",
    "add_key_parsers",
    "key_fields",
    "key_row",
    "parse_expires",
    "parse_time",
]

# ``--FLAG N``: a field of ``gateway.tenants.Quotas``.
KEY_QUOTA_FLAGS = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "concurrency": "max_concurrent_requests",
    "budget": "token_budget",
}
_SPAN = re.compile(r"([+-])([0-9]+(?:\.[0-9]+)?)([smhd])")
_SPAN_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now: float | None = None) -> float:
    """``text`` as Unix seconds: ``+30d`` / ``-1h`` (from now; s, m, h or d), or ISO 8601 (naive:
    UTC). ``argparse.ArgumentTypeError`` for anything else."""
    span = _SPAN.fullmatch(text.strip())
    if span is not None:
        sign, amount, unit = span.groups()
        seconds = float(amount) * _SPAN_S[unit]
        return (time.time() if now is None else now) + (seconds if sign == "+" else -seconds)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time (e.g. 2026-12-31T23:59:59Z) nor a span "
            "from now (e.g. +30d, -1h)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def parse_expires(text: str) -> float:
    """``--expires``: an ISO 8601 time, or a span from now (``+30d``, ``+12h``)."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r}: an expiry is in the future (e.g. +30d)")
    return parse_time(text)


def add_key_parsers(actions: Any) -> None:
    """``keys create`` and ``keys update`` with their flags."""
    create = actions.add_parser(
        "create",
        help="a key for a tenant, with its own limits and expiry; the secret shows once",
        description="Create a key for TENANT (id or name). Its limits are checked beside the "
        "tenant's, each at most the tenant's same limit; its budget counts over the tenant's "
        "budget period when the tenant has a budget. --expires: ISO 8601 (UTC unless an "
        "offset is given) or +30d / +12h / +45m from now.",
    )
    create.add_argument("tenant")
    create.add_argument("--name", default="", help="a label for the key")
    _add_limit_flags(create)
    update = actions.add_parser(
        "update",
        help="change a key's name, limits (merged) or expiry",
        description="Change KEY_ID's name, limits or expiry. Limits given are merged into the "
        "key's (--unlimited FLAG removes one); --no-expiry: it never expires; an --expires in "
        "the past stops it at once. It takes effect on the key's next request.",
    )
    update.add_argument("key_id")
    update.add_argument("--name", default=None, help="a new label")
    _add_limit_flags(update)
    update.add_argument(
        "--unlimited",
        action="append",
        default=[],
        choices=sorted(KEY_QUOTA_FLAGS),
        help="remove one of the key's limits (repeatable)",
    )
    update.add_argument("--no-expiry", action="store_true", help="the key never expires")


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent requests")
    parser.add_argument("--budget", type=int, default=None, help="tokens per budget period")
    parser.add_argument(
        "--budget-period",
        choices=["day", "month"],
        default=None,
        help="the budget's period (the tenant's, when it has a budget)",
    )
    parser.add_argument(
        "--expires",
        type=parse_expires,
        default=None,
        metavar="ISO8601|+30d",
        help="when the key stops working: an ISO 8601 time, or +Nd / +Nh / +Nm from now",
    )


def key_fields(args: argparse.Namespace, current_quotas: dict[str, Any]) -> dict[str, Any]:
    """The body of ``keys create`` (``current_quotas`` {}) or ``keys update`` from the flags:
    only what they change."""
    fields: dict[str, Any] = {}
    if args.name is not None and (args.name or args.action == "update"):
        fields["name"] = args.name
    quotas = dict(current_quotas)
    for flag, field in KEY_QUOTA_FLAGS.items():
        if getattr(args, flag) is not None:
            quotas[field] = getattr(args, flag)
        if flag in getattr(args, "unlimited", []):
            quotas[field] = None
    if args.budget_period is not None:
        quotas["budget_period"] = args.budget_period
    if quotas != current_quotas:
        fields["quotas"] = quotas
    if getattr(args, "no_expiry", False):
        if args.expires is not None:
            raise argparse.ArgumentTypeError("--expires and --no-expiry: one or the other")
        fields["expires_at"] = None
    elif args.expires is not None:
        fields["expires_at"] = args.expires
    return fields


def key_row(key: dict[str, Any]) -> dict[str, Any]:
    """An ``ApiKey`` as the keys table shows it: times in UTC."""
    return {
        **key,
        "created_at": _time(key.get("created_at")),
        "revoked_at": _time(key.get("revoked_at")),
        "expires_at": _time(key.get("expires_at")) or "never",
    }


def _time(at: float | None) -> str | None:
    return None if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
