"""Browser-facing protections: the Origin check on cookie endpoints, CORS for allowed origins, and the
security headers every response carries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from issuer.settings import Settings
from issuer.storage import users
from issuer.storage.database import DatabaseUnavailable
from issuer.storage.schema import families
from issuer.storage.schema import users as users_table
from tests.http._http import APP_ORIGIN as APP
from tests.http._http import DOCUMENTS, JWKS, assert_security_headers, current_etag
from tests.http._http import EVIL_ORIGIN as EVIL
from tests.support.clock import FakeClock
from tests.support.families import refresh_cookie_request, set_cookie_attributes
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import ISSUER_URL, IssuerHarness, running_issuer, with_settings


async def cookie_login(client: httpx.AsyncClient) -> str:
    response = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert response.status_code == 200, response.text
    return set_cookie_attributes(response)["refresh_token"]


async def cookie_refresh(client: httpx.AsyncClient, token: str, origin: str | None) -> httpx.Response:
    headers = refresh_cookie_request(client, token)
    if origin is not None:
        headers["Origin"] = origin
    return await client.post("/auth/refresh", headers=headers)


def assert_no_cors_grant(response: httpx.Response) -> None:
    assert "access-control-allow-origin" not in response.headers, response.headers


# ---------------------------------------------------------------- Origin check and CORS


async def test_cookie_refresh_from_foreign_origin_is_403_and_consumes_nothing(browser_app: IssuerHarness) -> None:
    async with browser_app.client() as client:
        await register(client)
        token = await cookie_login(client)
        for origin in (EVIL, "null", f"{APP}.evil.example", "http://app.example", f"{APP}:444", APP.upper()):
            refused = await cookie_refresh(client, token, origin)
            assert_error(refused, 403, "forbidden")
            assert_no_cors_grant(refused)
            assert "set-cookie" not in refused.headers
            assert refused.headers["x-content-type-options"] == "nosniff"
        # Refused requests did not consume the token: the allowed origin can still use it.
        allowed = await cookie_refresh(client, token, APP)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == APP
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert "origin" in allowed.headers.get("vary", "").lower()
        assert allowed.headers["cache-control"] == "no-store"
        renewed = set_cookie_attributes(allowed)["refresh_token"]
        assert renewed != token
        # The issuer's own origin and non-browser clients (no Origin) are allowed too.
        own = await cookie_refresh(client, renewed, ISSUER_URL)
        assert own.status_code == 200
        assert (await cookie_refresh(client, set_cookie_attributes(own)["refresh_token"], None)).status_code == 200


async def test_cookie_logout_origin_check(browser_app: IssuerHarness) -> None:
    async with browser_app.client() as client:
        await register(client)
        token = await cookie_login(client)
        headers = {**refresh_cookie_request(client, token), "Origin": EVIL}
        refused = await client.post("/auth/logout", headers=headers)
        assert_error(refused, 403, "forbidden")
        assert "set-cookie" not in refused.headers  # the cookie is not cleared by a refused request
        # Still alive after the refused logout.
        alive = await cookie_refresh(client, token, APP)
        assert alive.status_code == 200
        token = set_cookie_attributes(alive)["refresh_token"]
        headers = {**refresh_cookie_request(client, token), "Origin": APP}
        done = await client.post("/auth/logout", headers=headers)
        assert done.status_code == 204
        assert done.headers["access-control-allow-origin"] == APP
        assert set_cookie_attributes(done)["max-age"] == "0"
        assert_error(await cookie_refresh(client, token, APP), 401, "invalid_grant")


async def test_cookie_login_from_foreign_origin_is_403_and_writes_nothing(browser_app: IssuerHarness) -> None:
    """Login CSRF: a foreign page posting a login (a no-cors fetch sends no Content-Type and no preflight)
    would plant the attacker's session cookie in the victim's browser."""
    async with browser_app.client() as client:
        await register(client)
    engine = browser_app.engine
    async with engine.connect() as conn:
        user_id = (
            await conn.execute(select(users_table.c.id).where(users_table.c.email == "alice@example.com"))
        ).scalar_one()
    body = b'{"email": "alice@example.com", "password": "%s"}' % PASSWORD.encode()
    async with browser_app.client() as client:
        for origin in (EVIL, "null", f"{APP}.evil.example"):
            refused = await client.post("/auth/login", content=body, headers={"Origin": origin})
            assert_error(refused, 403, "forbidden")
            assert "set-cookie" not in refused.headers
            assert_no_cors_grant(refused)
        async with engine.connect() as conn:
            started = (await conn.execute(select(families.c.id).where(families.c.user_id == user_id))).all()
        assert started == [], "a refused login started a session"
        # Allowed origins, the issuer's own and non-browser clients log in as before.
        for origin in (APP, ISSUER_URL, None):
            headers = {} if origin is None else {"Origin": origin}
            allowed = await client.post("/auth/login", content=body, headers=headers)
            assert allowed.status_code == 200, allowed.text
            assert set_cookie_attributes(allowed)["refresh_token"]
        # Body transport sets no cookie: nothing to plant, so no Origin check (and no CORS grant either).
        as_body = await client.post(
            "/auth/login",
            json={"email": "alice@example.com", "password": PASSWORD, "token_transport": "body"},
            headers={"Origin": EVIL},
        )
        assert as_body.status_code == 200
        assert "set-cookie" not in as_body.headers
        assert_no_cors_grant(as_body)


async def test_body_transport_is_not_subject_to_the_cookie_origin_check(browser_app: IssuerHarness) -> None:
    """A token in the body is not an ambient credential: no CSRF, so any Origin may present it (no CORS grant)."""
    async with browser_app.client() as client:
        await register(client)
        tokens = await login(client)
        response = await client.post(
            "/auth/refresh", json={"refresh_token": tokens["refresh_token"]}, headers={"Origin": EVIL}
        )
        assert response.status_code == 200
        assert_no_cors_grant(response)
        # ... but an empty body with the cookie from a foreign origin is the cookie path, and is refused.
        token = await cookie_login(client)
        headers = {**refresh_cookie_request(client, token), "Origin": EVIL, "Content-Type": "application/json"}
        assert_error(await client.post("/auth/refresh", content=b"{}", headers=headers), 403, "forbidden")


@pytest.mark.parametrize("path", ["/auth/refresh", "/auth/logout", "/auth/login", "/auth/me"])
async def test_preflight(browser_app: IssuerHarness, path: str) -> None:
    async with browser_app.client() as client:
        allowed = await client.options(
            path,
            headers={
                "Origin": APP,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert allowed.status_code in (200, 204), allowed.text
        assert allowed.headers["access-control-allow-origin"] == APP
        assert allowed.headers["access-control-allow-credentials"] == "true"
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert allowed.headers["x-content-type-options"] == "nosniff"

        foreign = await client.options(path, headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert_no_cors_grant(foreign)
        assert_error(foreign, 403, "forbidden")  # in the contract's error shape, not Starlette's plain text
        assert foreign.headers["x-content-type-options"] == "nosniff"


async def test_no_wildcard_origin_ever(browser_app: IssuerHarness) -> None:
    async with browser_app.client() as client:
        await register(client)
        for path in ("/.well-known/jwks.json", "/healthz", "/.well-known/openid-configuration"):
            for origin in (APP, EVIL):
                response = await client.get(path, headers={"Origin": origin})
                assert response.headers.get("access-control-allow-origin") in (None, APP)
                if origin == EVIL:
                    assert_no_cors_grant(response)


async def test_allowed_origins_get_cors_on_the_documents_and_me(browser_app: IssuerHarness) -> None:
    """Browser apps read the JWKS, the metadata and /auth/me: with credentials for an allowed origin (200,
    304, HEAD, 401 alike), nothing for another, and the same answer otherwise."""
    async with browser_app.client() as client:
        await register(client)
        access = (await login(client))["access_token"]
        requests: list[tuple[str, str, dict[str, str]]] = [
            (method, path, headers)
            for path in DOCUMENTS
            for method in ("GET", "HEAD")
            for headers in ({}, {"If-None-Match": current_etag(browser_app)})
        ]
        requests += [(method, "/auth/me", auth) for method in ("GET", "HEAD") for auth in (bearer(access), {})]
        statuses = set()
        for method, path, headers in requests:
            what = (method, path, headers)
            allowed = await client.request(method, path, headers={**headers, "Origin": APP})
            statuses.add(allowed.status_code)
            assert allowed.headers["access-control-allow-origin"] == APP, what
            assert allowed.headers["access-control-allow-credentials"] == "true", what
            assert "origin" in allowed.headers.get("vary", "").lower(), what
            assert_security_headers(allowed, what)
            refused = await client.request(method, path, headers={**headers, "Origin": EVIL})
            assert_no_cors_grant(refused)
            assert (refused.status_code, refused.content) == (allowed.status_code, allowed.content), what
        assert statuses == {200, 304, 401}
        preflight = await client.options(JWKS, headers={"Origin": APP, "Access-Control-Request-Method": "GET"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == APP
        assert_security_headers(preflight)


async def test_without_allowed_origins_no_cors_at_all(client: httpx.AsyncClient) -> None:
    await register(client)
    token = await cookie_login(client)
    response = await cookie_refresh(client, token, ISSUER_URL)
    assert response.status_code == 200
    preflight = await client.options("/auth/refresh", headers={"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert_no_cors_grant(preflight)
    assert_error(await cookie_refresh(client, set_cookie_attributes(response)["refresh_token"], APP), 403, "forbidden")


# ---------------------------------------------------------------- headers on every response


async def test_every_response_has_the_security_headers(
    settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = with_settings(settings, allowed_origins=(APP,), rate_limit_per_ip=50)
    async with (
        running_issuer(configured, clock, monotonic=clock.monotonic) as harness,
        harness.client(raise_app_exceptions=False) as client,
    ):
        responses: dict[str, httpx.Response] = {}
        responses["register 201"] = await client.post(
            "/auth/register", json={"email": "alice@example.com", "password": PASSWORD}
        )
        tokens = await login(client)
        responses["login cookie"] = await client.post(
            "/auth/login", json={"email": "alice@example.com", "password": PASSWORD}
        )
        responses["refresh"] = await refresh_body(client, tokens["refresh_token"])
        access = responses["refresh"].json()["access_token"]
        responses["me"] = await client.get("/auth/me", headers=bearer(access))
        responses["sessions"] = await client.get("/auth/sessions", headers=bearer(access))
        responses["logout 204"] = await client.post("/auth/logout", json={"refresh_token": "x" * 43})
        jwks = await client.get("/.well-known/jwks.json")
        responses["jwks"] = jwks
        responses["jwks 304"] = await client.get(
            "/.well-known/jwks.json", headers={"If-None-Match": jwks.headers["etag"]}
        )
        responses["metadata"] = await client.get("/.well-known/oauth-authorization-server")
        responses["healthz"] = await client.get("/healthz")
        responses["readyz"] = await client.get("/readyz")
        responses["metrics"] = await client.get("/metrics")
        responses["400"] = await client.post(
            "/auth/login", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        responses["401"] = await client.get("/auth/me")
        responses["403"] = await client.post("/auth/refresh", headers={"Origin": EVIL})
        responses["404"] = await client.get("/nope")
        responses["405"] = await client.get("/auth/login")
        responses["409"] = await client.post(
            "/auth/register", json={"email": "alice@example.com", "password": PASSWORD}
        )
        responses["413"] = await client.post(
            "/auth/login", content=b"x" * 20000, headers={"Content-Type": "application/json"}
        )
        responses["preflight"] = await client.options(
            "/auth/refresh", headers={"Origin": APP, "Access-Control-Request-Method": "POST"}
        )
        responses["preflight foreign"] = await client.options(
            "/auth/refresh", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        )

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("an unexpected bug")

        async def database_down(*args: Any, **kwargs: Any) -> Any:
            raise DatabaseUnavailable("ConnectionRefusedError")

        with monkeypatch.context() as patch:
            patch.setattr(users, "by_ids", broken)
            responses["500"] = await client.get("/auth/me", headers=bearer(access))
            patch.setattr(users, "by_ids", database_down)
            responses["503"] = await client.get("/auth/me", headers=bearer(access))
        assert_error(responses["503"], 503, "temporarily_unavailable")
        assert_error(responses["500"], 500, "server_error")
        assert "unexpected bug" not in responses["500"].text

        for _ in range(60):
            last = await client.post("/auth/refresh", json={"refresh_token": "A" * 43})
            if last.status_code == 429:
                break
        responses["429"] = last

    assert responses["429"].status_code == 429
    for name, response in responses.items():
        assert_security_headers(response, name)


async def test_token_responses_are_not_cacheable(client: httpx.AsyncClient) -> None:
    await register(client)
    body = await client.post(
        "/auth/login", json={"email": "alice@example.com", "password": PASSWORD, "token_transport": "body"}
    )
    cookie = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
    refreshed_body = await refresh_body(client, body.json()["refresh_token"])
    refreshed_cookie = await cookie_refresh(client, set_cookie_attributes(cookie)["refresh_token"], None)
    replayed = await refresh_body(client, body.json()["refresh_token"])  # inside the grace window: same successor
    access = refreshed_body.json()["access_token"]
    me = await client.get("/auth/me", headers=bearer(access))
    sessions = await client.get("/auth/sessions", headers=bearer(access))
    logout = await client.post("/auth/logout", json={"refresh_token": refreshed_body.json()["refresh_token"]})
    for name, response in {
        "login body": body,
        "login cookie": cookie,
        "refresh body": refreshed_body,
        "refresh cookie": refreshed_cookie,
        "replayed": replayed,
        "me": me,
        "sessions": sessions,
        "logout (clears the cookie)": logout,
    }.items():
        assert response.status_code in (200, 204), (name, response.text)
        assert response.headers.get("cache-control") == "no-store", name
    # JWKS is meant to be cached; it is public material.
    jwks = await client.get("/.well-known/jwks.json")
    assert "public" in jwks.headers["cache-control"]
    assert "no-store" not in jwks.headers["cache-control"]
