"""``GET /auth/me``: the caller's account behind a Bearer access token, and the RFC 6750 challenges when
there is none, or one that is forged, malformed or expired."""

from __future__ import annotations

import httpx

from tests.support.http import assert_invalid_token, bearer, login, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import b64url_json, jwt_claims


async def test_bearer_challenges(client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    bare = await client.get("/auth/me")
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == "Bearer"
    body = bare.json()
    assert set(body) == {"error", "error_description"}
    assert "invalid_token" not in bare.headers["www-authenticate"]

    for header in ("Bearer", "Bearer ", "Bearer not.a.jwt", f"Bearer {tokens['access_token']}x"):
        assert_invalid_token(await client.get("/auth/me", headers={"Authorization": header}))
    # Another scheme is no Bearer credential at all (RFC 6750 section 3.1): the bare challenge, and no access.
    basic = await client.get("/auth/me", headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert basic.status_code == 401
    assert basic.headers["www-authenticate"] == "Bearer"
    # A tampered payload (role escalated) is refused.
    head, _payload, signature = tokens["access_token"].split(".")
    forged = jwt_claims(tokens["access_token"]) | {"role": "admin"}
    assert_invalid_token(await client.get("/auth/me", headers=bearer(f"{head}.{b64url_json(forged)}.{signature}")))


async def test_access_token_expires_at_the_issuer(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    settings = issuer.services.settings
    issuer.clock.advance(settings.access_token_ttl + settings.clock_leeway + 1)
    assert_invalid_token(await client.get("/auth/me", headers=bearer(tokens["access_token"])))
