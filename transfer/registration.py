"""A worker's registration with a gateway (``fairgate *-worker --gateway URL``): the worker's side,
and the messages and URL rules both sides share.

    worker                                            gateway (``gateway.admin``)
    POST /v1/workers/register    {url, role, heartbeat_s}   ──▶ adds it, or renews its lease;
      at start, then every heartbeat_s                           answers 201 (new) / 200 with
                                                                  its status (JSON)
    POST /v1/workers/unregister  {url}                       ──▶ removes it; 204
      when it stops

Both carry ``Authorization: Bearer TOKEN``, the gateway's ``gateway.registration_token`` (given
to the worker by ``FAIRGATE_REGISTRATION_TOKEN`` or ``--registration-token``; never logged). The
heartbeat lets a restarted gateway learn its workers again, and a gateway forget a registered
worker that stopped renewing and does not answer (``gateway.workers``). A failed call is tried
again after a backoff: 0.5 s, doubling up to ``heartbeat_s``.

``Registration`` runs on a thread of its own with a blocking HTTP client: the worker's event loop
is made and ended inside ``engine.serving.run_worker``, and the last call (unregister) comes after
that loop has stopped. The bodies are JSON, as everything the gateway serves. Torch-free.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Annotated, Any

import httpx
import msgspec

from transfer.messages import WorkerRole

__all__ = [
    "MAX_URL_LENGTH",
    "REGISTER_PATH",
    "TOKEN_ENV",
    "UNREGISTER_PATH",
    "WORKER_URL_PATTERN",
    "Registration",
    "WorkerDeregistration",
    "WorkerRegistration",
    "is_worker_url",
]

logger = logging.getLogger(__name__)

REGISTER_PATH = "/v1/workers/register"
UNREGISTER_PATH = "/v1/workers/unregister"
TOKEN_ENV = "FAIRGATE_REGISTRATION_TOKEN"
DEFAULT_HEARTBEAT_S = 10.0
FIRST_BACKOFF_S = 0.5
CALL_TIMEOUT_S = 5.0  # one call to the gateway
URL_WAIT_S = 0.05  # how often to look whether the worker knows its URL yet (port 0)

# A worker's base URL: http(s), a host name or IPv4 address, an optional port (0-65535), an
# optional path; no user, query or fragment. IPv6 literals are refused (name such a host): the
# HTTP client refuses some that look valid. The admin API documents this very pattern; \Z, not $
# (Python's $ also matches before a final newline; the document spells it $).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
WORKER_URL_PATTERN = (
    rf"^https?://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?(?:/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?\Z"
)
MAX_URL_LENGTH = 2048
_WORKER_URL = re.compile(WORKER_URL_PATTERN)

WorkerUrl = Annotated[str, msgspec.Meta(max_length=MAX_URL_LENGTH)]


def is_worker_url(url: str) -> bool:
    return len(url) <= MAX_URL_LENGTH and _WORKER_URL.search(url) is not None


class WorkerRegistration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Worker → gateway (``POST /v1/workers/register``): add me at ``url`` as a ``role`` worker,
    or renew my registration; I send this again every ``heartbeat_s``."""

    url: WorkerUrl
    role: WorkerRole
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)] = DEFAULT_HEARTBEAT_S


class WorkerDeregistration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Worker → gateway (``POST /v1/workers/unregister``): I am stopping; forget me."""

    url: WorkerUrl


class Registration:
    """Keeps one worker registered with one gateway (module docstring): ``start`` once the
    worker is being served, ``stop`` when it has stopped. ``advertise_url()`` is where the
    gateway reaches the worker; "" while it is not known yet (a port still to be picked)."""

    def __init__(
        self,
        gateway_url: str,
        token: str,
        role: WorkerRole,
        advertise_url: Callable[[], str],
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        timeout_s: float = CALL_TIMEOUT_S,
    ) -> None:
        if not token:
            raise ValueError(
                f"registering with a gateway needs its registration token ({TOKEN_ENV} or "
                "--registration-token)"
            )
        if not heartbeat_s > 0:
            raise ValueError(f"the heartbeat interval must be positive, got {heartbeat_s}")
        self.gateway_url = gateway_url.rstrip("/")
        self.role = role
        self.heartbeat_s = heartbeat_s
        self._advertise_url = advertise_url
        self._headers = {"authorization": f"Bearer {token}"}
        self._timeout_s = timeout_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_registered = 0  # successful registrations (the first, then heartbeats)
        self.last_error: str | None = None  # why the last call failed; None after a success

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)
        self._thread.start()

    def stop(self, *, unregister: bool = True) -> None:
        """Stop renewing, and (``unregister``) ask the gateway to forget this worker."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self._timeout_s + 1.0)  # at most the call in flight
        url = self._advertise_url()
        if unregister and url and self.num_registered:
            self._unregister(url)

    def _run(self) -> None:
        delay_s, backoff_s = 0.0, FIRST_BACKOFF_S
        with httpx.Client(base_url=self.gateway_url, timeout=self._timeout_s) as client:
            while not self._stopping.wait(delay_s):
                url = self._advertise_url()
                if not url:
                    delay_s = URL_WAIT_S
                    continue
                if self._register(client, url):
                    delay_s, backoff_s = self.heartbeat_s, FIRST_BACKOFF_S
                else:
                    delay_s, backoff_s = backoff_s, min(2 * backoff_s, self.heartbeat_s)

    def _register(self, client: httpx.Client, url: str) -> bool:
        body = WorkerRegistration(url, self.role, self.heartbeat_s)
        error = self._call(client, REGISTER_PATH, body)
        if error is not None:
            if error != self.last_error:  # once per kind of failure, not once per try
                logger.warning(
                    "could not register with the gateway at %s: %s", self.gateway_url, error
                )
            self.last_error = error
            return False
        if self.num_registered == 0 or self.last_error is not None:
            logger.info(
                "registered with the gateway at %s as %s (%s)", self.gateway_url, url, self.role
            )
        self.last_error = None
        self.num_registered += 1
        return True

    def _unregister(self, url: str) -> None:
        with httpx.Client(base_url=self.gateway_url, timeout=self._timeout_s) as client:
            error = self._call(client, UNREGISTER_PATH, WorkerDeregistration(url))
        if error is None:
            logger.info("unregistered from the gateway at %s", self.gateway_url)
        else:
            logger.warning(
                "could not unregister from the gateway at %s: %s", self.gateway_url, error
            )

    def _call(self, client: httpx.Client, path: str, body: msgspec.Struct) -> str | None:
        """None when the gateway took it, else why not (its error message; never the token)."""
        try:
            response = client.post(
                path,
                content=msgspec.json.encode(body),
                headers={**self._headers, "content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}: {_error_message(response)}"


def _error_message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
