"""RFC 7662 introspection and RFC 7009 revocation, attacked: an access token is active only while its
signature, exp, key, tokenVersion, session and user all hold; a refresh token while it could be redeemed,
and introspecting it never consumes it. Inactive is ``{"active": false}`` and nothing else."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import text

from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, delete_account, login, refresh_body, register
from tests.support.issuer import ISSUER_URL, IssuerHarness
from tests.support.jwt import jwt_claims, segments
from tests.support.oauth import Credentials, introspect, new_client, poll_all, revoke

INACTIVE = {"active": False}


async def answer(client: httpx.AsyncClient, who: Credentials, token: str, **form: str) -> dict[str, Any]:
    response = await introspect(client, who, token, **form)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
async def gateway(issuer: IssuerHarness) -> Credentials:
    return await new_client(issuer, "introspect", "revoke")


async def test_a_live_access_token_is_active_with_its_claims(client: httpx.AsyncClient, gateway: Credentials) -> None:
    user = await register(client)
    tokens = await login(client)
    claims = jwt_claims(tokens["access_token"])
    body = await answer(client, gateway, tokens["access_token"], token_type_hint="access_token")
    assert body == {
        "active": True,
        "token_type": "access_token",
        "iss": ISSUER_URL,
        "aud": "api",
        "sub": user["id"],
        "exp": claims["exp"],
        "iat": claims["iat"],
        "jti": claims["jti"],
        "sid": claims["sid"],
        "username": user["email"],
        "role": "user",
        "tokenVersion": 0,
    }


async def test_an_access_token_goes_inactive_with_its_session_its_version_its_user_its_key_and_time(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials, clock: FakeClock
) -> None:
    await register(client)
    cases: dict[str, str] = {}

    logged_out = await login(client)
    await client.post("/auth/logout", json={"refresh_token": logged_out["refresh_token"]})
    cases["session logged out"] = logged_out["access_token"]

    deleted_session = await login(client)
    sid = jwt_claims(deleted_session["access_token"])["sid"]
    await client.delete(f"/auth/sessions/{sid}", headers=bearer(deleted_session["access_token"]))
    cases["session deleted"] = deleted_session["access_token"]

    for name, token in cases.items():
        assert await answer(client, gateway, token) == INACTIVE, name

    everywhere = await login(client)
    survivor = await login(client)
    assert (await answer(client, gateway, survivor["access_token"]))["active"] is True
    await client.post("/auth/logout-all", headers=bearer(everywhere["access_token"]))
    assert await answer(client, gateway, survivor["access_token"]) == INACTIVE

    keyed = await login(client)
    await issuer.services.keys.revoke(segments(keyed["access_token"])[0]["kid"])
    assert await answer(client, gateway, keyed["access_token"]) == INACTIVE

    aging = await login(client)
    clock.advance(issuer.services.settings.access_token_ttl + issuer.services.settings.clock_leeway + 1)
    assert await answer(client, gateway, aging["access_token"]) == INACTIVE

    doomed = await login(client)
    assert (await delete_account(client, doomed["access_token"], PASSWORD)).status_code == 204
    assert await answer(client, gateway, doomed["access_token"]) == INACTIVE


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "eyJhbGciOiJub25lIiwidHlwIjoiYXQrand0In0.eyJzdWIiOiJ4In0.",
        "A" * 43,
        "x" * 20000,
    ],
)
async def test_anything_else_is_inactive_and_says_nothing_more(
    client: httpx.AsyncClient, gateway: Credentials, token: str
) -> None:
    response = await introspect(client, gateway, token)
    if token == "":
        assert_error(response, 400, "invalid_request")
    elif len(token) > 16 * 1024:
        assert response.status_code == 413
    else:
        assert response.json() == INACTIVE


async def test_a_refresh_token_is_active_while_redeemable_and_introspection_never_consumes_it(
    client: httpx.AsyncClient, gateway: Credentials
) -> None:
    user = await register(client)
    tokens = await login(client)
    for _ in range(2):
        body = await answer(client, gateway, tokens["refresh_token"], token_type_hint="refresh_token")
        assert body["active"] is True
        assert body["token_type"] == "refresh_token"
        assert body["sub"] == user["id"]
        assert body["sid"] == jwt_claims(tokens["access_token"])["sid"]
    # Still the live token: the owner's refresh works, and only then is it dead.
    rotated = await refresh_body(client, tokens["refresh_token"])
    assert rotated.status_code == 200
    assert await answer(client, gateway, tokens["refresh_token"]) == INACTIVE
    assert (await answer(client, gateway, rotated.json()["refresh_token"]))["active"] is True


async def test_introspection_needs_credentials_and_form_encoding(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials
) -> None:
    await register(client)
    tokens = await login(client)
    anonymous = await client.post("/oauth2/introspect", data={"token": tokens["access_token"]})
    assert_error(anonymous, 401, "invalid_client")
    as_json = await client.post("/oauth2/introspect", json={"token": tokens["access_token"]}, headers=gateway.headers)
    assert_error(as_json, 400, "invalid_request")
    repeated = await client.post(
        "/oauth2/introspect",
        content=b"token=a&token=b",
        headers={**gateway.headers, "content-type": "application/x-www-form-urlencoded"},
    )
    assert_error(repeated, 400, "invalid_request")
    revoker = await new_client(issuer, "revoke")
    assert_error(await introspect(client, revoker, tokens["access_token"]), 403, "insufficient_scope")


async def test_revoking_a_refresh_token_ends_its_session(client: httpx.AsyncClient, gateway: Credentials) -> None:
    await register(client)
    tokens, other = await login(client), await login(client)
    response = await revoke(client, gateway, tokens["refresh_token"], token_type_hint="refresh_token")
    assert response.status_code == 200
    assert response.content == b""
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 401
    assert await answer(client, gateway, tokens["access_token"]) == INACTIVE
    assert (await answer(client, gateway, other["access_token"]))["active"] is True


async def test_revoking_an_access_token_ends_its_session_even_once_expired(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials, clock: FakeClock
) -> None:
    await register(client)
    tokens = await login(client)
    clock.advance(issuer.services.settings.access_token_ttl + 60)
    assert (await revoke(client, gateway, tokens["access_token"])).status_code == 200
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 401


async def test_unknown_and_dead_tokens_are_revoked_quietly_and_a_set_is_not_revocable(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials
) -> None:
    await register(client)
    tokens = await login(client)
    for token in ("A" * 43, "garbage", "a.b.c", tokens["refresh_token"], tokens["refresh_token"]):
        assert (await revoke(client, gateway, token)).status_code == 200
    reader = await new_client(issuer, "events")
    sets, _ = await poll_all(client, reader)
    assert len(sets) == 1  # one revocation, however often repeated
    assert_error(await revoke(client, gateway, sets[0]), 400, "unsupported_token_type")


async def test_a_forged_access_token_revokes_nothing(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials
) -> None:
    """Anyone holding a revoke-scoped credential could otherwise end any session by naming its sid."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    from tests.support.jwt import kid_of, rsa_signed

    await register(client)
    victim = await login(client)
    claims = jwt_claims(victim["access_token"])
    attacker_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = {"alg": "RS256", "typ": "at+jwt", "kid": segments(victim["access_token"])[0]["kid"]}
    for key_header in (header, {**header, "kid": kid_of(attacker_key)}):
        forged = rsa_signed(key_header, claims, attacker_key)
        assert (await revoke(client, gateway, forged)).status_code == 200
    # Nor does a forged "SET" get a different answer than any unknown token (only our own is refused).
    forged_set = rsa_signed({**header, "typ": "secevent+jwt"}, claims, attacker_key)
    assert (await revoke(client, gateway, forged_set)).status_code == 200
    assert (await refresh_body(client, victim["refresh_token"])).status_code == 200


async def test_a_token_below_the_users_version_is_inactive_even_while_its_session_lives(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials
) -> None:
    """Logout-all raises the version and revokes the sessions together; the version rule stands on its own
    anyway (a version raised by any other path, an operator's SQL included, must not leave tokens active)."""
    await register(client)
    tokens = await login(client)
    async with issuer.engine.begin() as conn:
        await conn.execute(text("UPDATE users SET token_version = token_version + 1"))
    assert await answer(client, gateway, tokens["access_token"]) == INACTIVE


async def test_an_access_token_is_inactive_from_its_exp_on_whatever_the_leeway(
    issuer: IssuerHarness, client: httpx.AsyncClient, gateway: Credentials, clock: FakeClock
) -> None:
    """RFC 7662: active means unexpired; CLOCK_LEEWAY is for verifiers' clocks, and the asking client applies
    its own."""
    await register(client)
    token = (await login(client))["access_token"]
    clock.advance(jwt_claims(token)["exp"] - int(clock().timestamp()) - 1)
    assert (await answer(client, gateway, token))["active"] is True
    clock.advance(2)  # one second past exp, inside the leeway
    assert await answer(client, gateway, token) == INACTIVE
