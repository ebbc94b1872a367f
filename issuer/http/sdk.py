"""The browser client (``GET /sdk/auth-client.js``) and the account page built on it (``GET /account``).

The files are static and live in the repository's ``clients/js/``; the wheel carries them as ``issuer/web/``
(pyproject.toml maps the directory, as it maps ``migrations/``). They are read once, at import, so a request
never touches the disk, and each gets a strong ETag from its content.

The account page is the only HTML the issuer serves. It runs under a Content-Security-Policy that allows
nothing but this origin's own scripts, styles and fetches: no inline script or style, no framing, no form
posts, no ``<base>``. An XSS in it would be an XSS on the origin that holds the refresh cookie, so the page
also builds its DOM with ``textContent`` only. It is off unless ``ACCOUNT_PAGE`` is true (``issuer dev``
turns it on): a production issuer that fronts another product's own UI serves no page of its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from issuer.errors import NotFound
from issuer.http.caching import etag_matches, if_none_match, strong_etag
from issuer.services import Services

SDK_PATH = "/sdk/auth-client.js"
ACCOUNT_PATH = "/account"

# Revalidated on every use (cheap: a 304 through the ETag), so a fix to the client reaches every browser at
# once and a page never runs a client older than the issuer it talks to.
CACHE_CONTROL = "no-cache"
ACCOUNT_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
JS = "text/javascript; charset=utf-8"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def web_directory() -> Path:
    """The directory holding the client and the page: inside the installed package, else the checkout's."""
    package = Path(str(files("issuer")))
    installed = package / "web"  # a wheel install
    if (installed / "auth-client.js").is_file():
        return installed
    checkout = package.parent / "clients" / "js"  # the repository: a plain or an editable install
    if (checkout / "auth-client.js").is_file():
        return checkout
    raise RuntimeError(f"no browser client in {installed} or {checkout}: a broken installation")


def _load(name: str, content_type: str) -> Asset:
    body = (web_directory() / name).read_bytes()
    return Asset(body, content_type, strong_etag(body))


SDK = _load("auth-client.js", JS)
ACCOUNT_ASSETS = {
    ACCOUNT_PATH: _load("account.html", "text/html; charset=utf-8"),
    f"{ACCOUNT_PATH}/account.js": _load("account.js", JS),
    f"{ACCOUNT_PATH}/account.css": _load("account.css", "text/css; charset=utf-8"),
}


def _answer(request: Request, asset: Asset, headers: dict[str, str]) -> Response:
    headers = {**headers, "ETag": asset.etag, "Cache-Control": CACHE_CONTROL}
    if etag_matches(if_none_match(request.scope), asset.etag):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


async def auth_client(request: Request) -> Response:
    """The ES module. Public and credential-free, so any origin may import it (``Access-Control-Allow-Origin:
    *``: a module script is fetched in CORS mode); using it still needs the page's origin in ALLOWED_ORIGINS,
    which the CORS middleware answers with that origin instead."""
    return _answer(request, SDK, {"Access-Control-Allow-Origin": "*"})


def _account_file(asset: Asset) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        services: Services = request.state.services
        if not services.settings.account_page:
            raise NotFound()
        return _answer(request, asset, {"Content-Security-Policy": ACCOUNT_CSP, "X-Frame-Options": "DENY"})

    return endpoint


routes = [
    Route(SDK_PATH, auth_client, methods=["GET"]),
    *(Route(path, _account_file(asset), methods=["GET"]) for path, asset in ACCOUNT_ASSETS.items()),
]
