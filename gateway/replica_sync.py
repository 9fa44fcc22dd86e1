"""What gateway replicas share through Redis, besides quota reservations (``gateway.quotas``):
the fair policies' service, and admin changes. Each replica queues and places its own requests;
these keep fairness and configuration the same across them.

**Service.** Every ``sync_interval_s`` a replica appends to the stream ``fairgate:service`` what
its policy charged since the last time (``SchedulingPolicy.take_service_deltas``: normalized
service by class, gate and tenant) with the least counter among the tenants backlogged there
during the interval, by class (``backlog_floors``), and reads what the others appended since it
last read: their charges go into its own counters, deficits and service books
(``apply_remote_service``), and the least of their floors is the lift rule's global backlog
minimum and what a tenant ahead is held back against (``set_remote_floors``;
``gateway.policies.service_book``; a replica's floors count while they are fresher than
``FLOOR_TTL_INTERVALS`` intervals, so a dead replica's stop counting).

The bound this gives (``scheduling.md`` §2): a replica sees every other replica's charges at
most one interval plus a Redis round trip late, so a counter it compares lags the global one by
at most what the other replicas served that tenant meanwhile: with R replicas each serving at
most S normalized tokens per second, the difference between two backlogged tenants' global
service stays within the single-gateway bound plus 2·(R − 1)·S·(sync_interval_s + RTT), plus
``max_borrow_tokens`` for tenants on different replicas (the hold-back's limit). At 50 ms and
the tiny model's few thousand tokens per second the first is a few hundred tokens, less than one
quantum of DLPM.

**Admin changes** (a tenant's weight or quotas, a tenant deleted, a key revoked) are applied on
the replica that made them and appended to ``fairgate:admin``, which every replica reads with a
blocking read: they take effect everywhere within milliseconds. Should a change be missed (Redis
briefly away), the authenticator's cache entries live at most ``admin_sync_s``
(``gateway.auth``), so a revoked key stops working within that bound regardless.

Messages are msgpack. The streams are capped (``MAXLEN ~``) and a replica that starts reads only
what comes after. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError

__all__ = ["AdminChange", "ReplicaSync", "ServiceSharing"]

logger = logging.getLogger(__name__)

SERVICE_STREAM = "fairgate:service"
ADMIN_STREAM = "fairgate:admin"
STREAM_MAXLEN = 10_000
FLOOR_TTL_INTERVALS = 20
READ_BATCH = 1000
RETRY_S = 1.0  # after Redis failed
ROUND_TIMEOUT_S = 2.0  # one service round (write and read)
SOCKET_TIMEOUT_MARGIN_S = 2.0


class ServiceSharing(Protocol):
    """What a fair policy shares with the other replicas (``gateway.policies.base``)."""

    def take_service_deltas(self) -> dict[tuple[str, str, str], float]: ...

    def apply_remote_service(self, deltas: dict[tuple[str, str, str], float]) -> None: ...

    def backlog_floors(self) -> dict[str, float]: ...

    def idle_floors(self) -> dict[str, float]: ...

    def set_remote_floors(self, floors: dict[str, float], idle: dict[str, float]) -> None: ...


class AdminChange(msgspec.Struct, frozen=True):
    """An admin change every replica applies: ``tenant`` (its weight, and its quotas, which the
    next request reads), ``tenant_deleted``, ``key`` (revoked, or its limits or expiry changed:
    caches forget it), ``models`` (an alias or a cost factor: read them again from the store)."""

    kind: Literal["tenant", "tenant_deleted", "key", "models"]
    tenant_id: str = ""
    key_id: str = ""
    weight: float = 1.0


class _ServiceMessage(msgspec.Struct, frozen=True, array_like=True):
    replica: str
    deltas: list[tuple[str, str, str, float]]
    floors: dict[str, float]
    idle_floors: dict[str, float] = {}


class _AdminMessage(msgspec.Struct, frozen=True, array_like=True):
    replica: str
    change: AdminChange


class ReplicaSync:
    """One replica's side (module docstring). ``policy`` None: a policy with nothing to share
    (FCFS); only admin changes go through."""

    def __init__(
        self,
        redis_url: str,
        policy: ServiceSharing | None,
        *,
        on_admin_change: Callable[[AdminChange], None],
        sync_interval_s: float = 0.05,
        admin_sync_s: float = 1.0,
    ) -> None:
        self.replica_id = secrets.token_hex(6)
        self.policy = policy
        self.on_admin_change = on_admin_change
        self.sync_interval_s = sync_interval_s
        self.admin_sync_s = admin_sync_s
        # Every call has a deadline (a blocking read's own block time included): a Redis that
        # stops answering, or a half-open connection, is found and retried, never waited on.
        self._redis = redis.Redis.from_url(
            redis_url,
            protocol=2,
            socket_timeout=admin_sync_s + SOCKET_TIMEOUT_MARGIN_S,
            socket_connect_timeout=SOCKET_TIMEOUT_MARGIN_S,
            socket_keepalive=True,
        )
        self._tasks: list[asyncio.Task[None]] = []
        # replica -> (when last heard, its backlog floors, its idle floors)
        self._floors: dict[str, tuple[float, dict[str, float], dict[str, float]]] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._service_decoder = msgspec.msgpack.Decoder(_ServiceMessage)
        self._admin_decoder = msgspec.msgpack.Decoder(_AdminMessage)
        self.num_synced = 0  # service rounds done (tests, metrics)
        self._unsent: dict[tuple[str, str, str], float] = {}
        self._is_stopping = False

    async def start(self) -> None:
        """Check Redis answers (raises if not: a replica without its shared state would drift
        silently), then sync in the background from the streams' current ends."""
        await self._redis.ping()
        service_from = await self._last_id(SERVICE_STREAM)
        admin_from = await self._last_id(ADMIN_STREAM)
        if self.policy is not None:
            self._tasks.append(asyncio.create_task(self._sync_service(self.policy, service_from)))
        self._tasks.append(asyncio.create_task(self._follow_admin(admin_from)))

    async def stop(self) -> None:
        # (redis-py turns a cancellation in the middle of a connect into a ConnectionError,
        # which the loops retry: they also look at this.)
        self._is_stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._redis.aclose()

    async def publish_admin(self, change: AdminChange) -> None:
        """Tell the other replicas (this one applied the change itself)."""
        message = self._encoder.encode(_AdminMessage(self.replica_id, change))
        await self._redis.xadd(ADMIN_STREAM, {"m": message}, maxlen=STREAM_MAXLEN, approximate=True)

    async def _last_id(self, stream: str) -> str:
        entries: Any = await self._redis.xrevrange(stream, count=1)
        return entries[0][0].decode() if entries else "0-0"

    # ---- service ---------------------------------------------------------------------------

    async def _sync_service(self, policy: ServiceSharing, last_id: str) -> None:
        while not self._is_stopping:
            started = time.monotonic()
            try:
                async with asyncio.timeout(ROUND_TIMEOUT_S):
                    last_id = await self._service_round(policy, last_id)
            except (RedisError, TimeoutError) as exc:
                if self._is_stopping:
                    return
                # Out of touch: the others' backlogs no longer count here (their charges come
                # when Redis answers again; this replica's own wait in ``_unsent``).
                logger.warning("replica sync: Redis failed: %r", exc)
                self._floors.clear()
                policy.set_remote_floors({}, {})
                await asyncio.sleep(RETRY_S)
                continue
            self.num_synced += 1
            await asyncio.sleep(max(0.0, self.sync_interval_s - (time.monotonic() - started)))

    async def _service_round(self, policy: ServiceSharing, last_id: str) -> str:
        pending = self._unsent
        for key, delta in policy.take_service_deltas().items():
            pending[key] = pending.get(key, 0.0) + delta
        message = _ServiceMessage(
            self.replica_id,
            [(c, g, t, d) for (c, g, t), d in pending.items() if d],
            policy.backlog_floors(),
            policy.idle_floors(),
        )
        await self._redis.xadd(
            SERVICE_STREAM,
            {"m": self._encoder.encode(message)},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        self._unsent = {}  # (not sent: kept for the next round, so the others miss nothing)
        now = time.monotonic()
        remote: dict[tuple[str, str, str], float] = {}
        while True:
            read: Any = await self._redis.xread({SERVICE_STREAM: last_id}, count=READ_BATCH)
            entries = _entries(read, SERVICE_STREAM)
            for entry_id, fields in entries:
                last_id = entry_id.decode()
                try:
                    other = self._service_decoder.decode(fields[b"m"])
                except (msgspec.DecodeError, KeyError):
                    logger.warning("replica sync: skipped a service entry it cannot read")
                    continue
                if other.replica == self.replica_id:
                    continue
                for class_name, gate, tenant_id, delta in other.deltas:
                    key = (class_name, gate, tenant_id)
                    remote[key] = remote.get(key, 0.0) + delta
                self._floors[other.replica] = (now, other.floors, other.idle_floors)
            if len(entries) < READ_BATCH:
                break
        if remote:
            policy.apply_remote_service(remote)
        policy.set_remote_floors(*self._remote_floors(now))
        return last_id

    def _remote_floors(self, now: float) -> tuple[dict[str, float], dict[str, float]]:
        """The least backlog floor and the highest idle floor of the replicas heard from
        lately, by class."""
        fresh_s = FLOOR_TTL_INTERVALS * self.sync_interval_s
        floors: dict[str, float] = {}
        idle: dict[str, float] = {}
        for replica, (seen, backlog, idle_of) in list(self._floors.items()):
            if now - seen > fresh_s:
                del self._floors[replica]  # gone, or out of touch: its backlog no longer counts
                continue
            for class_name, value in backlog.items():
                floors[class_name] = min(value, floors.get(class_name, value))
            for class_name, value in idle_of.items():
                idle[class_name] = max(value, idle.get(class_name, value))
        return floors, idle

    # ---- admin changes ---------------------------------------------------------------------

    async def _follow_admin(self, last_id: str) -> None:
        block_ms = max(1, int(self.admin_sync_s * 1000))
        while not self._is_stopping:
            try:
                read: Any = await self._redis.xread({ADMIN_STREAM: last_id}, block=block_ms)
            except RedisError as exc:
                if self._is_stopping:
                    return
                logger.warning("replica sync: Redis failed: %s", exc)
                await asyncio.sleep(RETRY_S)
                continue
            for entry_id, fields in _entries(read, ADMIN_STREAM):
                last_id = entry_id.decode()
                try:
                    message = self._admin_decoder.decode(fields[b"m"])
                except (msgspec.DecodeError, KeyError):
                    # (A newer replica's change, say, in a rolling upgrade: the key cache's
                    # max age still bounds what it would have dropped.)
                    logger.warning("replica sync: skipped an admin change it cannot read")
                    continue
                if message.replica == self.replica_id:
                    continue
                try:
                    self.on_admin_change(message.change)
                except Exception:  # one bad change must not stop the others
                    logger.exception("replica sync: applying an admin change failed")


def _entries(read: Any, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of ``stream`` in an XREAD answer (RESP2: a list of [name, entries])."""
    for name, entries in read or []:
        if name == stream.encode():
            return list(entries)
    return []
