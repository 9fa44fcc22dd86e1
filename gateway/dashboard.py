"""The live dashboard at ``/dashboard``: the operator's view of tenants, workers and fairness,
updating every second.

    GET  /dashboard                 the page (with a session), else the login form
    POST /dashboard/login           form field ``token``: the admin token → a session cookie
    POST /dashboard/logout          drops the cookie
    GET  /dashboard/snapshot.json   the figures now (session required)
    GET  /dashboard/events          server-sent events: a snapshot about every second
    GET  /dashboard/assets/NAME     the page's CSS and script (public: no figures in them)

**Session.** The admin token is typed into a form and POSTed, never put in a URL. A right token
gets a cookie that does not hold it: ``expiry.nonce.mac`` with ``mac`` = HMAC-SHA256 keyed by
the admin token over ``"dashboard-session|expiry|nonce"``. It needs no server-side state, so
every gateway replica (sharing the admin token) accepts the others' sessions; a changed admin
token ends every session. Logout clears the browser's cookie; a copy of it taken earlier stays
valid until its expiry (``SESSION_TTL_S``), the price of statelessness. The cookie is HttpOnly,
SameSite=Strict (no other site's page can make the browser send it: no CSRF on logout or
login), ``Path=/dashboard``, and Secure when the request came over https.

**Figures.** ``gateway.dashboard_snapshot`` reads them from the registry ``/metrics`` prints, so
the page and a scrape agree. The page is a server-rendered shell with the first snapshot in a
JSON block; ``dashboard_assets/dashboard.js`` draws tables and plain SVG charts from it and
from each event, writing text nodes only (tenant names and worker ids are not trusted). The
Content-Security-Policy allows this origin's script and style and nothing else. Torch-free.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import secrets
import string
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gateway.dashboard_snapshot import SeriesSource, SnapshotBuilder
from gateway.metrics import GatewayMetrics
from gateway.sse_response import DisconnectAwareStream

__all__ = [
    "EVENT_INTERVAL_S",
    "SESSION_COOKIE",
    "SESSION_TTL_S",
    "DashboardParts",
    "SessionSigner",
    "dashboard_routes",
]

SESSION_COOKIE = "fairgate_dashboard"
SESSION_TTL_S = 8 * 3600
EVENT_INTERVAL_S = 1.0
# An event stream ends after this long (the browser's EventSource reconnects at once, and the
# session is checked anew): no connection is held forever.
MAX_STREAM_S = 300.0
EVENT_RETRY_MS = 2000  # how soon a browser reconnects after the stream ends
MAX_LOGIN_BODY_BYTES = 4096
ASSETS_DIR = Path(__file__).with_name("dashboard_assets")
_ASSET_TYPES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
_SESSION_CONTEXT = b"dashboard-session"
_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}
_encoder = msgspec.json.Encoder()


class SessionSigner:
    """Issues and checks the stateless session values (module docstring). ``clock``: epoch
    seconds."""

    def __init__(
        self,
        admin_token: str,
        *,
        ttl_s: float = SESSION_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = admin_token.encode()
        self._admin_digest = hashlib.sha256(self._key).digest()
        self.ttl_s = ttl_s
        self._clock = clock

    def is_admin_token(self, candidate: str) -> bool:
        """Constant time, whatever the lengths (digests of equal size are compared)."""
        digest = hashlib.sha256(candidate.encode()).digest()
        return hmac.compare_digest(digest, self._admin_digest)

    def issue(self) -> str:
        expiry = str(int(self._clock() + self.ttl_s))
        nonce = secrets.token_hex(16)
        return f"{expiry}.{nonce}.{self._mac(expiry, nonce)}"

    def expiry(self, value: str | None) -> float | None:
        """When the session ``value`` ends; None for no, a forged or an expired one."""
        if not value:
            return None
        parts = value.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expiry, nonce, mac = parts
        if not hmac.compare_digest(mac.encode(), self._mac(expiry, nonce).encode()):
            return None
        ends = float(int(expiry))
        return ends if ends > self._clock() else None

    def is_valid(self, value: str | None) -> bool:
        return self.expiry(value) is not None

    def _mac(self, expiry: str, nonce: str) -> str:
        message = b"|".join((_SESSION_CONTEXT, expiry.encode(), nonce.encode()))
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class DashboardParts:
    """What the dashboard uses of the gateway. ``is_stopping``: the gateway drains (event
    streams end, so that they hold no shutdown up)."""

    signer: SessionSigner
    snapshots: SnapshotBuilder
    is_stopping: Callable[[], bool]

    @classmethod
    def of(
        cls,
        admin_token: str,
        metrics: GatewayMetrics,
        slo_classes: Sequence[str],
        *,
        history: SeriesSource | None,
        is_stopping: Callable[[], bool],
    ) -> DashboardParts:
        """``metrics``: the gateway's (its registry is what ``/metrics`` prints);
        ``history``: the fairness history's ``series`` (None: no charts)."""
        snapshots = SnapshotBuilder(
            metrics.registry, slo_classes, metrics.window_s, history=history
        )
        return cls(SessionSigner(admin_token), snapshots, is_stopping)


def dashboard_routes(parts: DashboardParts) -> list[Route]:
    """The routes (module docstring); the templates and assets are read from disk here, once
    (this runs while the gateway starts, not on a request)."""
    dashboard = _Dashboard(parts, _Files.load(ASSETS_DIR))
    return [
        Route("/dashboard", dashboard.page, methods=["GET"]),
        Route("/dashboard/login", dashboard.login, methods=["POST"]),
        Route("/dashboard/logout", _logout, methods=["POST"]),
        Route("/dashboard/snapshot.json", dashboard.snapshot, methods=["GET"]),
        Route("/dashboard/events", dashboard.events, methods=["GET"]),
        Route("/dashboard/assets/{name}", dashboard.asset, methods=["GET"]),
    ]


@dataclass(frozen=True, slots=True)
class _Files:
    login: string.Template
    page: string.Template
    assets: dict[str, bytes]  # by name, those of ``_ASSET_TYPES``

    @classmethod
    def load(cls, directory: Path) -> _Files:
        def template(name: str) -> string.Template:
            return string.Template((directory / name).read_text(encoding="utf-8"))

        assets = {name: (directory / name).read_bytes() for name in _ASSET_TYPES}
        return cls(template("login.html"), template("dashboard.html"), assets)


def _html(body: str, status: int = 200) -> Response:
    return Response(body, status, media_type="text/html; charset=utf-8", headers=_HEADERS)


def _embedded_json(value: object) -> str:
    """JSON to sit inside a ``<script type="application/json">`` block: ``<``, ``>`` and
    ``&`` (only ever inside strings) escaped, so that no label value can close the block."""
    text = _encoder.encode(value).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class _Dashboard:
    """The handlers that need the parts."""

    def __init__(self, parts: DashboardParts, files: _Files) -> None:
        self.parts = parts
        self.files = files

    def _session_ends(self, request: Request) -> float | None:
        return self.parts.signer.expiry(request.cookies.get(SESSION_COOKIE))

    def _login_page(self, message: str = "", status: int = 200) -> Response:
        notice = f'<p class="notice" role="alert">{html.escape(message)}</p>' if message else ""
        return _html(self.files.login.substitute(notice=notice), status)

    async def page(self, request: Request) -> Response:
        if self._session_ends(request) is None:
            return self._login_page()
        snapshot = _embedded_json(self.parts.snapshots.build())
        return _html(self.files.page.substitute(snapshot=snapshot))

    async def login(self, request: Request) -> Response:
        token = await _form_token(request)
        signer = self.parts.signer
        if token is None or not signer.is_admin_token(token):
            return self._login_page("That is not the admin token.", 401)
        response = RedirectResponse("/dashboard", status_code=303, headers=_HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            signer.issue(),
            max_age=int(signer.ttl_s),
            path="/dashboard",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    async def snapshot(self, request: Request) -> Response:
        if self._session_ends(request) is None:
            return _unauthorized()
        body = _encoder.encode(self.parts.snapshots.build())
        return Response(body, media_type="application/json", headers=_HEADERS)

    async def events(self, request: Request) -> Response:
        if self._session_ends(request) is None:
            return _unauthorized()
        # Ends when the client leaves, whatever the server's ASGI version (Starlette's own
        # stream notices only at its next write under ASGI 2.4).
        return DisconnectAwareStream(
            _event_stream(self.parts, request.cookies.get(SESSION_COOKIE)),
            media_type="text/event-stream",
            headers=_HEADERS | {"x-accel-buffering": "no"},
            on_close=_nothing,
            keepalive_s=EVENT_INTERVAL_S * 5,  # the snapshots keep it alive: never sent
        )

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.files.assets.get(name)
        if body is None:  # only the listed files: no path reaches outside the folder
            return Response("no such asset", 404, media_type="text/plain", headers=_HEADERS)
        headers = _HEADERS | {"cache-control": "no-cache"}
        return Response(body, media_type=f"{_ASSET_TYPES[name]}; charset=utf-8", headers=headers)


async def _form_token(request: Request) -> str | None:
    """The ``token`` field of a urlencoded form body of at most ``MAX_LOGIN_BODY_BYTES``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY_BYTES:
            return None
    try:
        fields = parse_qs(body.decode(), max_num_fields=4, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    values = fields.get("token", [])
    return values[0].strip() if len(values) == 1 else None


async def _logout(request: Request) -> Response:
    response = RedirectResponse("/dashboard", status_code=303, headers=_HEADERS)
    response.delete_cookie(
        SESSION_COOKIE,
        path="/dashboard",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


def _unauthorized() -> Response:
    return Response(
        _encoder.encode(
            {
                "error": {
                    "message": "no dashboard session: log in at /dashboard",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "no_session",
                }
            }
        ),
        401,
        media_type="application/json",
        headers=_HEADERS,
    )


async def _nothing() -> None:
    return None


async def _event_stream(parts: DashboardParts, cookie: str | None) -> AsyncGenerator[bytes]:
    """A snapshot about every ``EVENT_INTERVAL_S`` while the session lasts, for at most
    ``MAX_STREAM_S``, until the gateway drains (a client that leaves cancels it)."""
    yield f"retry: {EVENT_RETRY_MS}\n\n".encode()
    loop = asyncio.get_running_loop()
    ends = loop.time() + MAX_STREAM_S
    while loop.time() < ends and not parts.is_stopping() and parts.signer.is_valid(cookie):
        yield b"data: " + _encoder.encode(parts.snapshots.build()) + b"\n\n"
        await asyncio.sleep(EVENT_INTERVAL_S)
