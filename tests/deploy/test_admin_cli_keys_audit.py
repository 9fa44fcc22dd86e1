"""``fairgate admin keys`` flags and ``fairgate admin audit``'s table, without a gateway: the times
the flags take, the bodies they make, and how a record's change reads. (They run against a real
gateway in ``tests/gateway/test_admin_keys_audit.py``.)"""

from __future__ import annotations

import argparse
import datetime as dt

import pytest

from deploy.admin_cli import add_admin_parser
from deploy.admin_cli_audit import audit_row, parse_since
from deploy.admin_cli_keys import key_fields, parse_expires, parse_time

NOW = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.UTC).timestamp()


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_admin_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["admin", *argv])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+30d", NOW + 30 * 86400),
        ("+12h", NOW + 12 * 3600),
        ("+45m", NOW + 45 * 60),
        ("-1h", NOW - 3600),
        ("2026-12-07T10:00:00Z", dt.datetime(2026, 12, 7, 10, tzinfo=dt.UTC).timestamp()),
        ("2026-12-07T10:00:00", dt.datetime(2026, 12, 7, 10, tzinfo=dt.UTC).timestamp()),
        ("2026-12-07T12:00:00+02:00", dt.datetime(2026, 12, 7, 10, tzinfo=dt.UTC).timestamp()),
    ],
)
def test_times_are_iso_8601_or_spans_from_now(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["tomorrow", "+30x", "30 days", ""])
def test_other_times_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time(text, now=NOW)


def test_an_expiry_is_in_the_future_and_since_in_the_past() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="future"):
        parse_expires("-1d")
    with pytest.raises(argparse.ArgumentTypeError, match="past"):
        parse_since("+1h")
    assert parse_since("1h") == pytest.approx(parse_since("-1h"), abs=1.0)


def test_key_flags_make_the_body_of_create_and_the_merged_patch_of_update() -> None:
    args = _parse("keys", "create", "acme", "--tpm", "500", "--budget", "9", "--expires", "+1d")
    body = key_fields(args, {})
    assert body["quotas"] == {"tokens_per_minute": 500, "token_budget": 9}
    assert "name" not in body and body["expires_at"] > NOW

    current = {"requests_per_minute": 3, "tokens_per_minute": 500, "budget_period": "month"}
    args = _parse("keys", "update", "key_1", "--rpm", "4", "--unlimited", "tpm", "--no-expiry")
    assert key_fields(args, current) == {
        "quotas": {"requests_per_minute": 4, "tokens_per_minute": None, "budget_period": "month"},
        "expires_at": None,
    }
    assert key_fields(_parse("keys", "update", "key_1", "--name", ""), current) == {"name": ""}
    assert key_fields(_parse("keys", "update", "key_1"), current) == {}


def test_an_audit_row_shows_what_changed_compactly() -> None:
    record = {
        "audit_id": "au_1",
        "at": NOW,
        "actor": "admin-token:3f9a1c2b",
        "action": "tenant.update",
        "target": "tn_1",
        "tenant_id": "tn_1",
        "before": {"weight": 1.0, "quotas": {"tokens_per_minute": None, "budget_period": "month"}},
        "after": {"weight": 2.0, "quotas": {"tokens_per_minute": 500, "budget_period": "month"}},
    }
    assert audit_row(record) == {
        "time": "2026-01-31T12:00:00Z",
        "actor": "admin-token:3f9a1c2b",
        "action": "tenant.update",
        "target": "tn_1",
        "tenant_id": "tn_1",
        "change": "weight: 1 → 2, quotas.tokens_per_minute: - → 500",
    }
    created = {**record, "before": None, "after": {"name": "acme", "x": None, "created_at": NOW}}
    assert audit_row(created)["change"] == "created name=acme, created_at=2026-01-31T12:00:00Z"
    assert audit_row({**record, "after": None, "tenant_id": ""})["change"] == "deleted"
    assert audit_row({**record, "after": record["before"]})["change"] == "no change"
    long = {**record, "before": None, "after": {"name": "x" * 500}}
    assert len(audit_row(long)["change"]) == 120 and audit_row(long)["change"].endswith("…")
