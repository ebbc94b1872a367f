"""JWKS and server metadata: served from memory, so they keep working while the database is down."""

from __future__ import annotations

import functools
import json

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from issuer.http import oauth
from issuer.http.caching import etag_matches, if_none_match, respond
from issuer.keys.ring import JwksDocument
from issuer.services import Services
from issuer.settings import Settings

JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")
METADATA_CACHE_CONTROL = "public, max-age=3600"

Headers = tuple[tuple[bytes, bytes], ...]


async def send_document(path: str, services: Services, metadata: bytes, scope: Scope, send: Send) -> None:
    """Answer GET or HEAD of one well-known document. The JWKS gets an ETag and a 304 on a matching
    If-None-Match."""
    if path != JWKS_PATH:
        await respond(send, scope, 200, metadata, _metadata_headers(metadata))
        return
    document = services.keys.ring.jwks(services.clock())
    full, not_modified = _jwks_headers(document, services.keys.jwks_max_age(services.settings))
    if etag_matches(if_none_match(scope), document.etag):
        await respond(send, scope, 304, b"", not_modified)
    else:
        await respond(send, scope, 200, document.body, full)


@functools.lru_cache(maxsize=16)
def _jwks_headers(document: JwksDocument, max_age: int) -> tuple[Headers, Headers]:
    """The 200 and 304 header lines of one key set, built once per key set."""
    cache_control, etag = f"public, max-age={max_age}".encode(), document.etag.encode()
    return _headers(document.body, cache_control, etag), ((b"cache-control", cache_control), (b"etag", etag))


@functools.lru_cache(maxsize=4)
def _metadata_headers(body: bytes) -> Headers:
    return _headers(body, METADATA_CACHE_CONTROL.encode())


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
        "introspection_endpoint": f"{base}{oauth.INTROSPECTION_PATH}",
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic"],
        "revocation_endpoint": f"{base}{oauth.REVOCATION_PATH}",
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic"],
        "security_event_poll_endpoint": f"{base}{oauth.POLL_PATH}",
    }
    return json.dumps(document, separators=(",", ":")).encode()


class _RoutedDocument:
    """The routes' endpoint (an ASGI app, so the router adds no Request or Response around it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["state"]
        await send_document(self.path, state["services"], state["metadata"], scope, send)


routes = [Route(path, _RoutedDocument(path), methods=["GET"]) for path in (JWKS_PATH, *METADATA_PATHS)]


def _headers(body: bytes, cache_control: bytes, etag: bytes | None = None) -> Headers:
    headers = (
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"application/json"),
        (b"cache-control", cache_control),
    )
    return headers if etag is None else (*headers, (b"etag", etag))
