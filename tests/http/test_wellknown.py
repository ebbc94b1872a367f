"""The JWKS and the server metadata: GET and HEAD, caching headers, ETag and 304 on the JWKS, 405 with
``Allow``, the latency label, the key set following rotation and time, and no database needed to serve them."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from issuer.http.wellknown import METADATA_CACHE_CONTROL
from issuer.settings import Settings
from issuer.storage.database import DatabaseUnavailable
from tests.http._http import (
    DOCUMENTS,
    DURATION,
    JWKS,
    OAUTH,
    OIDC,
    SECURITY,
    allowed_methods,
    assert_each_header_once,
    assert_security_headers,
    current_etag,
)
from tests.support.clock import FakeClock
from tests.support.http import assert_error, login, register
from tests.support.issuer import ISSUER_URL, IssuerHarness
from tests.support.jwt import token_kid
from tests.support.operations import scrape, value

Headers = list[tuple[str, str]]
PUBLIC_MEMBERS = {"kty", "kid", "use", "alg", "n", "e"}


def conditional_cases(etag: str) -> list[tuple[str, Headers]]:
    """(name, request headers): no condition, matching, weak, listed, wildcard and non-matching ones."""
    return [
        ("no If-None-Match", []),
        ("matching", [("If-None-Match", etag)]),
        ("weak matching", [("If-None-Match", f"W/{etag}")]),
        ("list with match", [("If-None-Match", f'"other", {etag}')]),
        ("weak list with match", [("If-None-Match", f' W/"other" ,W/{etag} ')]),
        ("wildcard", [("If-None-Match", "*")]),
        ("not matching", [("If-None-Match", '"not-the-etag"')]),
        ("weak not matching", [("If-None-Match", 'W/"not-the-etag", "x"')]),
        ("prefix of the etag", [("If-None-Match", etag[:-3] + '"')]),
        ("unquoted etag", [("If-None-Match", etag.strip('"'))]),
        ("empty", [("If-None-Match", "")]),
    ]


MATCHING = {"matching", "weak matching", "list with match", "weak list with match", "wildcard"}


def header_lines(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted((name.lower(), value) for name, value in response.headers.multi_items())


async def test_get_and_head_of_each_document(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    settings = issuer.services.settings
    for _ in range(3):  # header lists are made per response: the middleware's additions never pile up
        for path in DOCUMENTS:
            for query in ("", "?v=1"):
                document = await client.get(path + query)
                what = (path, query)
                assert document.status_code == 200, what
                assert document.headers["content-type"] == "application/json", what
                assert int(document.headers["content-length"]) == len(document.content), what
                assert_security_headers(document, what)
                assert_each_header_once(document, what)
                head = await client.head(path + query)
                assert (head.status_code, head.content) == (200, b""), what
                assert header_lines(head) == header_lines(document), what
    jwks = await client.get(JWKS)
    assert jwks.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    assert jwks.headers["etag"] == current_etag(issuer)
    keys = jwks.json()["keys"]
    assert keys
    for key in keys:
        assert set(key) == PUBLIC_MEMBERS, key
        assert (key["kty"], key["use"], key["alg"]) == ("RSA", "sig", "RS256")
    for path in (OAUTH, OIDC):
        metadata = await client.get(path)
        assert metadata.headers["cache-control"] == METADATA_CACHE_CONTROL
        assert "etag" not in metadata.headers
        assert metadata.json()["issuer"] == ISSUER_URL
        assert metadata.json()["jwks_uri"] == f"{ISSUER_URL}{JWKS}"


async def test_304_for_a_matching_if_none_match_on_the_jwks_only(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    etag = current_etag(issuer)
    max_age = issuer.services.settings.jwks_max_age
    full = await client.get(JWKS)
    for name, headers in conditional_cases(etag):
        for method in ("GET", "HEAD"):
            what = (method, name)
            response = await client.request(method, JWKS, headers=headers)
            assert_security_headers(response, what)
            assert_each_header_once(response, what)
            if name in MATCHING:
                assert (response.status_code, response.content) == (304, b""), what
                # Only what a cache needs to refresh its copy: no body headers.
                assert {n for n, _ in header_lines(response)} == {"cache-control", "etag", *SECURITY}, what
                assert response.headers["etag"] == etag, what
                assert response.headers["cache-control"] == f"public, max-age={max_age}", what
            else:
                assert response.status_code == 200, what
                assert header_lines(response) == header_lines(full), what
                assert response.content == (full.content if method == "GET" else b""), what
            for path in (OAUTH, OIDC):
                assert (await client.request(method, path, headers=headers)).status_code == 200, (path, *what)


async def test_every_if_none_match_line_counts(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """RFC 9110 section 5.3: several If-None-Match lines are one list."""
    etag = current_etag(issuer)
    split = await client.get(JWKS, headers=[("If-None-Match", '"other"'), ("If-None-Match", etag)])
    assert split.status_code == 304
    assert split.headers["etag"] == etag
    neither = await client.get(JWKS, headers=[("If-None-Match", '"a"'), ("If-None-Match", 'W/"b"')])
    assert neither.status_code == 200


async def test_other_methods_get_the_contracts_405(client: httpx.AsyncClient) -> None:
    for path in DOCUMENTS:
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            response = await client.request(method, path, json={"x": 1})
            what = (method, path)
            assert_error(response, 405, "method_not_allowed")
            assert set(response.json()) == {"error", "error_description"}, what
            assert response.headers["content-type"] == "application/json", what
            assert allowed_methods(response) == {"GET", "HEAD"}, what
            assert_security_headers(response, what)


async def test_the_jwks_follows_rotation_and_time(
    issuer: IssuerHarness, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    services = issuer.services
    first = (await client.get(JWKS)).headers["etag"]
    assert (await client.get(JWKS, headers={"If-None-Match": first})).status_code == 304

    await services.keys.rotate(immediate=True)  # a reload: a second key is published
    rotated = await client.get(JWKS)
    second = rotated.headers["etag"]
    assert second != first
    assert second == current_etag(issuer)
    assert len(rotated.json()["keys"]) == 2
    assert (await client.get(JWKS, headers={"If-None-Match": first})).status_code == 200
    assert (await client.get(JWKS, headers={"If-None-Match": second})).status_code == 304

    # No reload: only time passes, and the retired key leaves the JWKS.
    clock.advance(services.keys.retire_grace(services.settings).total_seconds())
    later = await client.get(JWKS)
    third = later.headers["etag"]
    assert third not in (first, second)
    assert len(later.json()["keys"]) == 1
    assert (await client.get(JWKS, headers={"If-None-Match": second})).status_code == 200
    assert (await client.get(JWKS, headers={"If-None-Match": third})).status_code == 304
    assert (await client.head(JWKS, headers={"If-None-Match": third})).status_code == 304


async def test_documents_are_timed_under_their_route(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    etag = current_etag(issuer)
    for _ in range(3):
        assert (await client.get(JWKS)).status_code == 200
    assert (await client.get(JWKS, headers={"If-None-Match": etag})).status_code == 304
    assert (await client.head(JWKS)).status_code == 200
    assert (await client.get(OAUTH)).status_code == 200
    assert (await client.head(OIDC)).status_code == 200
    assert (await client.post(JWKS)).status_code == 405
    samples = await scrape(client)
    assert value(samples, DURATION, route=JWKS, method="GET") == 4
    assert value(samples, DURATION, route=JWKS, method="HEAD") == 1
    assert value(samples, DURATION, route=JWKS, method="POST") == 1
    assert value(samples, DURATION, route=OAUTH, method="GET") == 1
    assert value(samples, DURATION, route=OIDC, method="HEAD") == 1
    assert value(samples, DURATION, route="unmatched", method="GET") == 0


async def test_documents_are_served_while_the_database_is_down(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gateways keep verifying tokens through a database outage: the documents come from memory."""
    before = {path: (await client.get(path)).content for path in DOCUMENTS}

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("ConnectionRefusedError")

    for name in ("fetch", "fetchrow", "execute", "ping", "transaction"):
        monkeypatch.setattr(issuer.services.db, name, down)
    assert (await client.get("/readyz")).status_code == 503  # the outage is real for the app
    for path in DOCUMENTS:
        response = await client.get(path)
        assert (response.status_code, response.content) == (200, before[path]), path
    assert (await client.get(JWKS, headers={"If-None-Match": current_etag(issuer)})).status_code == 304


async def test_jwks(client: httpx.AsyncClient, settings: Settings) -> None:
    await register(client)
    tokens = await login(client)
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    etag = response.headers["etag"]
    assert re.fullmatch(r'(W/)?"[^"]+"', etag), etag
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert set(key) == {"kty", "kid", "use", "alg", "n", "e"}, key
        assert key["kty"] == "RSA"
        assert key["use"] == "sig"
        assert key["alg"] == "RS256"
    assert token_kid(tokens["access_token"]) in {key["kid"] for key in keys}

    cached = await client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    assert cached.headers["etag"] == etag
    assert cached.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    listed = await client.get("/.well-known/jwks.json", headers={"If-None-Match": f'"other", {etag}'})
    assert listed.status_code == 304
    stale = await client.get("/.well-known/jwks.json", headers={"If-None-Match": '"not-the-etag"'})
    assert stale.status_code == 200
    assert stale.json() == response.json()


async def test_metadata_documents(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    route_paths = {getattr(route, "path", None) for route in issuer.starlette.routes}
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        document = response.json()
        assert document["issuer"] == ISSUER_URL
        assert document["jwks_uri"] == f"{ISSUER_URL}/.well-known/jwks.json"
        assert document["access_token_signing_alg_values_supported"] == ["RS256"]
        for name in ("login_endpoint", "refresh_endpoint", "logout_endpoint"):
            assert name in document
        for name, url in document.items():
            if name.endswith("_endpoint"):
                assert url.startswith(ISSUER_URL + "/"), (name, url)
                assert url.removeprefix(ISSUER_URL) in route_paths, (name, url)
    assert (await client.get(f"{ISSUER_URL}/.well-known/jwks.json")).status_code == 200
