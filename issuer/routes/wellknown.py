"""JWKS and server metadata: served from memory, so they keep working while the database is down."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from issuer.keys import JwksDocument
from issuer.services import Services
from issuer.settings import Settings

JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
METADATA_CACHE_CONTROL = "public, max-age=3600"


def _services(request: Request) -> Services:
    return request.app.state.services


async def jwks(request: Request) -> Response:
    svc = _services(request)
    document = svc.keys.ring.jwks(svc.clock())
    headers = {"Cache-Control": f"public, max-age={svc.keys.jwks_max_age(svc.settings)}", "ETag": document.etag}
    # Every If-None-Match line counts (RFC 9110 section 5.3), as in the fast path below.
    tags = request.headers.getlist("if-none-match")
    if _etag_matches(", ".join(tags) if tags else None, document.etag):
        return Response(status_code=304, headers=headers)
    return Response(document.body, media_type="application/json", headers=headers)


def _etag_matches(header: str | None, etag: str) -> bool:
    if header is None:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in candidates or etag in candidates


def metadata_document(settings: Settings) -> bytes:
    base = settings.issuer_url
    document = {
        "issuer": base,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "access_token_signing_alg_values_supported": ["RS256"],
        "registration_endpoint": f"{base}/auth/register",
        "login_endpoint": f"{base}/auth/login",
        "refresh_endpoint": f"{base}/auth/refresh",
        "logout_endpoint": f"{base}/auth/logout",
        "logout_all_endpoint": f"{base}/auth/logout-all",
        "userinfo_endpoint": f"{base}/auth/me",
        "sessions_endpoint": f"{base}/auth/sessions",
        "account_endpoint": f"{base}/auth/account",
        "refresh_token_transports_supported": ["cookie", "body"],
    }
    return json.dumps(document, separators=(",", ":")).encode()


async def metadata(request: Request) -> Response:
    body: bytes = request.app.state.metadata
    return Response(body, media_type="application/json", headers={"Cache-Control": METADATA_CACHE_CONTROL})


routes = [
    Route(JWKS_PATH, jwks, methods=["GET"]),
    *(Route(path, metadata, methods=["GET"]) for path in METADATA_PATHS),
]
_ROUTES = {route.path: route for route in routes}

Headers = list[tuple[bytes, bytes]]


class WellKnownDocuments:
    """GET and HEAD of the JWKS and the metadata, answered from pre-rendered bytes ahead of the router.

    The JWKS is the issuer's most requested document: every gateway and resource service fetches it, and
    a 304 costs as much as a 200 here. This layer answers exactly what the routes above answer (status,
    headers, body, ETag and 304), but with the body and headers built once per key set instead of a
    request object, a router pass and a response object per call. The routes stay the definition and
    still answer everything else (other methods get their 405 there). It runs inside the middleware that
    adds the security headers and records latency, and inside CORS, so those apply as for every route.
    """

    def __init__(self, app: ASGIApp, services: Services, metadata: bytes) -> None:
        self.app = app
        self.services = services
        max_age = services.keys.jwks_max_age(services.settings)
        self._jwks_cache_control = f"public, max-age={max_age}".encode()
        self._jwks: tuple[JwksDocument, Headers, Headers] | None = None
        self._metadata = (metadata, _headers(metadata, METADATA_CACHE_CONTROL.encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            if path == JWKS_PATH:
                scope["route"] = _ROUTES[path]  # the latency label, as if the router had matched it
                await self._send_jwks(scope, send)
                return
            if path in METADATA_PATHS:
                scope["route"] = _ROUTES[path]
                await _respond(send, scope, 200, *self._metadata)
                return
        await self.app(scope, receive, send)

    async def _send_jwks(self, scope: Scope, send: Send) -> None:
        svc = self.services
        document = svc.keys.ring.jwks(svc.clock())
        if self._jwks is None or self._jwks[0] is not document:
            etag = document.etag.encode()
            full = _headers(document.body, self._jwks_cache_control, etag)
            not_modified = [(b"cache-control", self._jwks_cache_control), (b"etag", etag)]
            self._jwks = (document, full, not_modified)
        _, full, not_modified = self._jwks
        if _etag_matches(_if_none_match(scope), document.etag):
            await _respond(send, scope, 304, b"", not_modified)
        else:
            await _respond(send, scope, 200, document.body, full)


def _headers(body: bytes, cache_control: bytes, etag: bytes | None = None) -> Headers:
    headers = [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
        (b"cache-control", cache_control),
    ]
    return headers if etag is None else [*headers, (b"etag", etag)]


def _if_none_match(scope: Scope) -> str | None:
    """Every If-None-Match line, joined as one list (RFC 9110 section 5.3)."""
    values = [value.decode("latin-1") for name, value in scope["headers"] if name == b"if-none-match"]
    return ", ".join(values) if values else None


async def _respond(send: Send, scope: Scope, status: int, body: bytes, headers: Headers) -> None:
    # A fresh list per response: the middleware outside appends its own headers to it.
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
