"""The refresh token's transports (contract section 3): the cookie (the default, for browsers) and the body
(native apps); a refresh answers in the transport the token came in; and only the issuer's own origin and
the configured ALLOWED_ORIGINS may use the cookie endpoints."""

from __future__ import annotations

import httpx

from tests.sessions.conftest import MakeIssuer
from tests.support.families import (
    assert_cookie_cleared,
    assert_token_response,
    login_response,
    refresh_cookie,
    refresh_cookie_request,
)
from tests.support.http import assert_error, bearer, refresh_body, register
from tests.support.issuer import ISSUER_URL, IssuerHarness


async def test_cookie_flow_like_a_browser(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """The client's cookie jar plays the browser: the cookie's Path/Secure must make it come back."""
    user = await register(client)
    response = await login_response(client, transport=None)
    access, first = assert_token_response(response, user, transport="cookie")
    assert "refresh_token" not in response.json()

    who = await client.get("/auth/me", headers=bearer(access))
    assert who.status_code == 200
    assert who.headers["cache-control"] == "no-store"
    assert who.json() == {**user, "tokenVersion": 0}

    issuer.clock.advance(120)
    # No body at all: the jar sends the cookie because Path=/auth covers /auth/refresh.
    rotated = await client.post("/auth/refresh")
    access2, second = assert_token_response(rotated, user, transport="cookie")
    assert second != first
    assert access2 != access
    assert (await client.get("/auth/me", headers=bearer(access2))).status_code == 200

    issuer.clock.advance(60)
    out = await client.post("/auth/logout")
    assert out.status_code == 204
    assert out.content == b""
    assert_cookie_cleared(out)
    assert "refresh_token" not in client.cookies
    assert_error(await refresh_cookie(client, second), 401, "invalid_grant")


async def test_login_with_explicit_cookie_transport(client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login_response(client, transport="cookie")
    assert_token_response(response, user, transport="cookie")


async def test_refresh_answers_in_the_transport_the_token_came_in(client: httpx.AsyncClient) -> None:
    user = await register(client)
    # A cookie-issued token presented in the body is answered in the body.
    _, from_cookie = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
    client.cookies.clear()
    answered = await refresh_body(client, from_cookie)
    assert_token_response(answered, user, transport="body")

    # A body-issued token presented as a cookie is answered with a cookie.
    _, from_body = assert_token_response(await login_response(client, transport="body"), user, transport="body")
    answered = await refresh_cookie(client, from_body)
    _, next_token = assert_token_response(answered, user, transport="cookie")
    assert next_token not in answered.text

    # The body wins when both are present; the cookie's token is left untouched.
    _, other = assert_token_response(await login_response(client, transport="body"), user, transport="body")
    both = await client.post(
        "/auth/refresh", json={"refresh_token": other}, headers=refresh_cookie_request(client, next_token)
    )
    assert_token_response(both, user, transport="body")
    assert_token_response(await refresh_cookie(client, next_token), user, transport="cookie")


# ---------------------------------------------------------------- who may use the cookie


async def test_cookie_refresh_from_a_foreign_origin_is_forbidden(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
    for origin in (
        "https://evil.example",
        "null",
        "http://issuer.test",
        "https://issuer.test.evil.example",
        "https://issuer.test:8443",
        "https://evil.example/https://issuer.test",
        "https://issuer",
        "https://issuer.tes",
        "HTTPS://EVIL.EXAMPLE",
    ):
        response = await refresh_cookie(client, token, headers={"Origin": origin})
        assert_error(response, 403, "forbidden")
        assert "set-cookie" not in response.headers
    # The refused requests did not consume the token.
    _, token = assert_token_response(
        await refresh_cookie(client, token, headers={"Origin": ISSUER_URL}), user, transport="cookie"
    )
    assert_token_response(await refresh_cookie(client, token), user, transport="cookie")


async def test_cookie_logout_from_a_foreign_origin_is_forbidden(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
    response = await client.post(
        "/auth/logout", headers={**refresh_cookie_request(client, token), "Origin": "https://evil.example"}
    )
    assert_error(response, 403, "forbidden")
    assert_token_response(await refresh_cookie(client, token), user, transport="cookie")


async def test_allowed_origins_may_use_the_cookie(make_issuer: MakeIssuer) -> None:
    configured = make_issuer(allowed_origins=("https://app.example", "http://localhost:3000"))
    async with configured as harness, harness.client() as client:
        user = await register(client)
        _, token = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
        for origin in ("https://app.example", "http://localhost:3000", ISSUER_URL):
            _, token = assert_token_response(
                await refresh_cookie(client, token, headers={"Origin": origin}), user, transport="cookie"
            )
        for origin in ("https://evil.example", "https://app.example.evil", "http://app.example", "null"):
            refused = await refresh_cookie(client, token, headers={"Origin": origin})
            assert_error(refused, 403, "forbidden")
            # Without a matching Allow-Origin the browser shows the page nothing (Allow-Credentials alone is inert).
            assert "access-control-allow-origin" not in refused.headers
        response = await refresh_cookie(client, token, headers={"Origin": "https://app.example"})
        _, token = assert_token_response(response, user, transport="cookie")
        # CORS with credentials, for exactly the configured origin (never a wildcard).
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert response.headers["access-control-allow-credentials"] == "true"
        preflight = await client.options(
            "/auth/refresh",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        evil_preflight = await client.options(
            "/auth/refresh",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert evil_preflight.headers.get("access-control-allow-origin") in (None, "")
        assert_token_response(await refresh_cookie(client, token), user, transport="cookie")


async def test_no_cors_headers_without_allowed_origins(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
    refused = await refresh_cookie(client, token, headers={"Origin": "https://evil.example"})
    assert_error(refused, 403, "forbidden")
    assert "access-control-allow-origin" not in refused.headers
    own = await refresh_cookie(client, token, headers={"Origin": ISSUER_URL})
    assert own.status_code == 200
    assert own.headers.get("access-control-allow-origin") in (None, ISSUER_URL)
