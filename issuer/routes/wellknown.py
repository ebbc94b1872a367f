"""JWKS and server metadata: served from memory, so they keep working while the database is down."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from issuer.services import Services
from issuer.settings import Settings


def _services(request: Request) -> Services:
    return request.app.state.services


async def jwks(request: Request) -> Response:
    svc = _services(request)
    document = svc.keys.ring.jwks(svc.clock())
    headers = {"Cache-Control": f"public, max-age={svc.keys.jwks_max_age(svc.settings)}", "ETag": document.etag}
    if _etag_matches(request.headers.get("if-none-match"), document.etag):
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
    return Response(body, media_type="application/json", headers={"Cache-Control": "public, max-age=3600"})


routes = [
    Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
    Route("/.well-known/openid-configuration", metadata, methods=["GET"]),
]
