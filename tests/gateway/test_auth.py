"""``Authenticator`` on a real SQLite store and real starlette requests: tenant keys, the admin
token, the errors and their statuses, and the key cache that admin changes must clear."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.requests import Request

from gateway.auth import Authenticator
from gateway.errors import InvalidApiKey, KeyRevoked, PermissionDenied
from gateway.store import SQLiteStore
from gateway.tenants import CreatedKey, KeySpec, Tenant, TenantPatch, TenantSpec

ADMIN_TOKEN = "admin-token-0123456789abcdef"


def request_with(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/v1/models", "headers": headers})


def bearer(secret: str) -> Request:
    return request_with(f"Bearer {secret}")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore.open(tmp_path / "fairgate.db")
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def auth(store: SQLiteStore) -> Authenticator:
    return Authenticator(store, ADMIN_TOKEN)


@pytest.fixture
async def acme(store: SQLiteStore) -> Tenant:
    return await store.create_tenant(TenantSpec(name="acme", weight=2.0))


@pytest.fixture
async def acme_key(store: SQLiteStore, acme: Tenant) -> CreatedKey:
    return await store.create_key(acme.tenant_id, KeySpec(name="ci"))


async def test_a_tenant_key_names_its_key_and_tenant(
    auth: Authenticator, acme: Tenant, acme_key: CreatedKey
) -> None:
    key, tenant = await auth.tenant(bearer(acme_key.secret))
    assert key == acme_key.key
    assert tenant == acme
    # The scheme is case-insensitive and surrounding spaces do not matter.
    key, tenant = await auth.tenant(request_with(f"bearer   {acme_key.secret}  "))
    assert (key.key_id, tenant.tenant_id) == (acme_key.key.key_id, acme.tenant_id)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer    ", "Basic dXNlcjpwYXNz", "fg-no-scheme-at-all"],
)
async def test_no_bearer_token_is_a_401(
    auth: Authenticator, acme_key: CreatedKey, authorization: str | None
) -> None:
    with pytest.raises(InvalidApiKey, match="missing API key") as raised:
        await auth.tenant(request_with(authorization))
    assert raised.value.status == 401


async def test_an_unknown_key_is_a_401(auth: Authenticator, acme_key: CreatedKey) -> None:
    for secret in ("fg-not-a-key-at-all", acme_key.secret + "x", acme_key.secret[:-1]):
        with pytest.raises(InvalidApiKey, match="invalid API key") as raised:
            await auth.tenant(bearer(secret))
        assert raised.value.status == 401
    with pytest.raises(InvalidApiKey):
        await auth.tenant(bearer(ADMIN_TOKEN))  # the admin token is no tenant key


async def test_a_failed_lookup_is_not_cached(
    auth: Authenticator, store: SQLiteStore, acme: Tenant
) -> None:
    with pytest.raises(InvalidApiKey):
        await auth.tenant(bearer("fg-not-yet"))
    created = await store.create_key(acme.tenant_id, KeySpec())
    key, _ = await auth.tenant(bearer(created.secret))
    assert key.key_id == created.key.key_id


async def test_a_key_revoked_before_its_first_use_is_a_403(
    auth: Authenticator, store: SQLiteStore, acme_key: CreatedKey
) -> None:
    await store.revoke_key(acme_key.key.key_id)
    with pytest.raises(KeyRevoked, match=acme_key.key.prefix) as raised:
        await auth.tenant(bearer(acme_key.secret))
    assert raised.value.status == 403
    assert acme_key.secret not in str(raised.value)  # only the display prefix, never the secret


async def test_a_cached_revoked_key_works_until_forget_key(
    auth: Authenticator, store: SQLiteStore, acme_key: CreatedKey
) -> None:
    """The cache is why the admin API calls ``forget_key`` after revoking: without it, a key in
    the cache keeps working."""
    await auth.tenant(bearer(acme_key.secret))  # now cached
    await store.revoke_key(acme_key.key.key_id)

    key, _ = await auth.tenant(bearer(acme_key.secret))
    assert key.revoked_at is None  # served from the cache, as it was

    auth.forget_key("key_some_other_key")  # forgetting another key changes nothing
    await auth.tenant(bearer(acme_key.secret))

    auth.forget_key(acme_key.key.key_id)
    with pytest.raises(KeyRevoked):
        await auth.tenant(bearer(acme_key.secret))


async def test_forget_tenant_drops_every_key_of_that_tenant_only(
    auth: Authenticator, store: SQLiteStore, acme: Tenant, acme_key: CreatedKey
) -> None:
    second = await store.create_key(acme.tenant_id, KeySpec(name="second"))
    other = await store.create_tenant(TenantSpec(name="other"))
    other_key = await store.create_key(other.tenant_id, KeySpec())
    for secret in (acme_key.secret, second.secret, other_key.secret):
        await auth.tenant(bearer(secret))  # all cached
    await store.revoke_key(acme_key.key.key_id)
    await store.revoke_key(other_key.key.key_id)
    await store.update_tenant(acme.tenant_id, TenantPatch(weight=5.0))

    _, tenant = await auth.tenant(bearer(second.secret))
    assert tenant.weight == 2.0  # the cached tenant, before the change
    await auth.tenant(bearer(acme_key.secret))  # the cached key, before its revocation

    auth.forget_tenant(acme.tenant_id)
    with pytest.raises(KeyRevoked):
        await auth.tenant(bearer(acme_key.secret))
    _, tenant = await auth.tenant(bearer(second.secret))
    assert tenant.weight == 5.0
    await auth.tenant(bearer(other_key.secret))  # another tenant's entry stays cached


async def test_a_deleted_tenants_keys_stop_working_after_forget_tenant(
    auth: Authenticator, store: SQLiteStore, acme: Tenant, acme_key: CreatedKey
) -> None:
    await auth.tenant(bearer(acme_key.secret))
    await store.delete_tenant(acme.tenant_id)
    await auth.tenant(bearer(acme_key.secret))  # still cached
    auth.forget_tenant(acme.tenant_id)
    with pytest.raises(InvalidApiKey):
        await auth.tenant(bearer(acme_key.secret))


async def test_require_admin_accepts_only_the_admin_token(
    auth: Authenticator, store: SQLiteStore, acme_key: CreatedKey
) -> None:
    assert await auth.require_admin(bearer(ADMIN_TOKEN)) is None

    with pytest.raises(PermissionDenied, match="admin token") as denied:
        await auth.require_admin(bearer(acme_key.secret))
    assert denied.value.status == 403
    assert not isinstance(denied.value, KeyRevoked)
    await store.revoke_key(acme_key.key.key_id)
    auth.forget_key(acme_key.key.key_id)
    with pytest.raises(PermissionDenied):
        await auth.require_admin(bearer(acme_key.secret))  # a revoked key is still a tenant's

    for request in (
        bearer(ADMIN_TOKEN + "x"),
        bearer(ADMIN_TOKEN[:-1]),
        bearer("fg-unknown"),
        request_with(None),
        request_with(f"Basic {ADMIN_TOKEN}"),
    ):
        with pytest.raises(InvalidApiKey) as raised:
            await auth.require_admin(request)
        assert raised.value.status == 401


async def test_an_admin_token_shorter_than_16_characters_is_refused(store: SQLiteStore) -> None:
    for token in ("", "short", "x" * 15):
        with pytest.raises(ValueError, match="at least 16"):
            Authenticator(store, token)
    Authenticator(store, "x" * 16)  # exactly 16 is enough
