"""The issuer's side of the browser client: ``GET /sdk/auth-client.js`` and the account page's files, in
process (no browser). What they do in Chromium is tests/clients/test_browser.py."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from issuer.http.sdk import ACCOUNT_CSP, web_directory
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.issuer import running_issuer, with_settings

REPO = Path(__file__).resolve().parents[2]
PAGE_FILES = {"/account": "account.html", "/account/account.js": "account.js", "/account/account.css": "account.css"}


@pytest.fixture
async def page_on(settings: Settings, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    async with running_issuer(with_settings(settings, account_page=True), clock) as harness, harness.client() as http:
        yield http


async def test_the_client_is_served_as_a_module_with_a_strong_etag(client: httpx.AsyncClient) -> None:
    response = await client.get("/sdk/auth-client.js")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.content == (REPO / "clients" / "js" / "auth-client.js").read_bytes()
    etag = response.headers["etag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["access-control-allow-origin"] == "*"
    assert b"export function createAuthClient" in response.content

    again = await client.get("/sdk/auth-client.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    listed = await client.get("/sdk/auth-client.js", headers={"If-None-Match": f'"other", W/{etag}'})
    assert listed.status_code == 304
    stale = await client.get("/sdk/auth-client.js", headers={"If-None-Match": '"something-else"'})
    assert stale.status_code == 200
    head = await client.head("/sdk/auth-client.js")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == etag


async def test_the_etag_follows_the_content(client: httpx.AsyncClient) -> None:
    response = await client.get("/sdk/auth-client.js")
    digest = base64.urlsafe_b64encode(hashlib.sha256(response.content).digest()[:18]).decode()
    assert response.headers["etag"] == f'"{digest}"'


@pytest.mark.parametrize("path", list(PAGE_FILES))
async def test_the_account_page_is_off_by_default(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "error_description": "No such resource."}
    assert "content-security-policy" not in response.headers


@pytest.mark.parametrize(("path", "name"), list(PAGE_FILES.items()))
async def test_the_account_page_is_served_under_a_strict_csp(page_on: httpx.AsyncClient, path: str, name: str) -> None:
    response = await page_on.get(path)
    assert response.status_code == 200
    assert response.content == (REPO / "clients" / "js" / name).read_bytes()
    csp = {part.split()[0]: part.split()[1:] for part in response.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["form-action"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert response.headers["content-security-policy"] == ACCOUNT_CSP
    assert (await page_on.get(path, headers={"If-None-Match": response.headers["etag"]})).status_code == 304


class _Inline(HTMLParser):
    """Collects what the CSP would block: inline scripts, inline styles, event-handler attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            self._in_script = True
            if "src" not in names:
                self.found.append("<script> without src")
        if tag == "style":
            self.found.append("<style>")
        self.found += [f"{tag} {name}" for name in names if name == "style" or name.startswith("on")]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("inline script text")


def test_the_page_has_nothing_inline() -> None:
    parser = _Inline()
    parser.feed((web_directory() / "account.html").read_text())
    assert parser.found == []
    broken = _Inline()
    broken.feed('<p style="color: red" onclick="x()"><script>alert(1)</script>')
    assert sorted(broken.found) == ["<script> without src", "inline script text", "p onclick", "p style"]


async def test_cors_answers_expose_retry_after_and_www_authenticate(settings: Settings, clock: FakeClock) -> None:
    origin = "https://app.example.com"
    allowed = with_settings(settings, allowed_origins=(origin,))
    async with running_issuer(allowed, clock) as harness, harness.client() as http:
        response = await http.get("/auth/me", headers={"Origin": origin})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == origin
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"retry-after", "www-authenticate"}


def test_account_page_setting(tmp_path: Path) -> None:
    kek = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    base = {"DATABASE_URL": "postgresql://issuer@db.example:5432/issuer", "ISSUER_KEK": kek}
    assert Settings.from_environ(base).account_page is False
    assert Settings.from_environ({**base, "ACCOUNT_PAGE": "true"}).account_page is True
