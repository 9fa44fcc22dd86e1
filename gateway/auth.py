"""Who is calling: a tenant's API key, or the operator's admin token.

Keys arrive as ``Authorization: Bearer fg-…``. The store keeps only their SHA-256 and confirms a
match in constant time (``gateway.store``); here a small cache, keyed by that digest, saves a store
round trip per request. A key past its ``expires_at`` is refused (401 ``key_expired``) on every
request, cached or not: expiry is read against the wall clock (``wall_clock``), while the cache's
ages are on the monotonic one (``clock``). Admin changes to a tenant or key drop its cache entries
at once (``forget_tenant`` / ``forget_key``), so a revoked key stops working on its next request;
with several gateway replicas the others hear of the change through ``gateway.replica_sync``, and
an entry lives at most ``max_age_s`` (their ``admin_sync_s``) should they miss it. The admin token
is compared with ``hmac.compare_digest``. Secrets are never logged. Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from starlette.requests import Request

from gateway.errors import InvalidApiKey, KeyExpired, KeyRevoked, PermissionDenied
from gateway.tenants import ApiKey, Tenant, TenantStore, format_time

__all__ = ["Authenticator", "bearer_token"]

MAX_CACHED_KEYS = 10_000


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Authenticator:
    def __init__(
        self,
        store: TenantStore,
        admin_token: str,
        *,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``max_age_s``: how long a cached key lives (None: until an admin change drops it);
        ``clock`` measures it; ``wall_clock`` (Unix seconds) tells whether a key expired."""
        if len(admin_token) < 16:
            raise ValueError("the admin token must be at least 16 characters")
        self.store = store
        self._admin_token = admin_token.encode()
        self._max_age_s = max_age_s
        self._clock = clock
        self._wall_clock = wall_clock
        # digest -> (key, tenant, when it was read from the store)
        self._cache: dict[bytes, tuple[ApiKey, Tenant, float]] = {}

    async def tenant(self, request: Request) -> tuple[ApiKey, Tenant]:
        """The calling key and tenant; ``InvalidApiKey`` (401), ``KeyExpired`` (401) or
        ``KeyRevoked`` (403)."""
        secret = bearer_token(request)
        if secret is None:
            raise InvalidApiKey("missing API key: send it as 'Authorization: Bearer fg-…'")
        found = await self._lookup(secret)
        if found is None:
            raise InvalidApiKey("invalid API key")
        key, tenant = found
        if key.revoked_at is not None:
            raise KeyRevoked(f"API key {key.prefix}… was revoked")
        if key.expires_at is not None and key.is_expired(self._wall_clock()):
            raise KeyExpired(f"API key {key.prefix}… expired at {format_time(key.expires_at)}")
        return key, tenant

    async def require_admin(self, request: Request) -> None:
        """Returns for the admin token; 401 for no or an unknown token, 403 for a tenant key."""
        secret = bearer_token(request)
        if secret is None:
            raise InvalidApiKey("missing admin token: send it as 'Authorization: Bearer …'")
        if hmac.compare_digest(secret.encode(), self._admin_token):
            return
        if await self._lookup(secret) is not None:
            raise PermissionDenied("the admin API needs the admin token, not a tenant key")
        raise InvalidApiKey("invalid admin token")

    def forget_tenant(self, tenant_id: str) -> None:
        self._forget(lambda key, tenant: tenant.tenant_id == tenant_id)

    def forget_key(self, key_id: str) -> None:
        self._forget(lambda key, tenant: key.key_id == key_id)

    async def _lookup(self, secret: str) -> tuple[ApiKey, Tenant] | None:
        digest = hashlib.sha256(secret.encode()).digest()
        cached = self._cache.get(digest)
        now = self._clock()
        if cached is not None:
            key, tenant, read_at = cached
            if self._max_age_s is None or now - read_at < self._max_age_s:
                return key, tenant
        found = await self.store.find_key(secret)
        self._cache.pop(digest, None)
        if found is not None:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[digest] = (*found, now)
        return found

    def _forget(self, matches: Callable[[ApiKey, Tenant], bool]) -> None:
        self._cache = {d: e for d, e in self._cache.items() if not matches(e[0], e[1])}
