"""Logout (one family, by its refresh token: body or cookie; idempotent) and logout-all (every family of the
user, and their token version goes up), contract section 3."""

from __future__ import annotations

import httpx

from issuer.storage import sessions, users
from tests.sessions.conftest import reuse_count
from tests.support.families import (
    assert_cookie_cleared,
    assert_token_response,
    family_of,
    family_row,
    login_response,
    refresh_cookie,
    refresh_cookie_request,
    rotate_ok,
    start_session,
)
from tests.support.http import assert_error, assert_invalid_token, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims

BOB = "bob@example.com"


async def test_logout_revokes_only_that_family_and_is_idempotent(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    engine = issuer.engine
    mine = (await start_session(client))["refresh_token"]
    other = (await login(client))["refresh_token"]

    out = await client.post("/auth/logout", json={"refresh_token": mine})
    assert out.status_code == 204
    assert out.content == b""
    assert_cookie_cleared(out)
    assert (await family_row(engine, await family_of(engine, mine))).revoked_reason == "logout"
    assert_error(await refresh_body(client, mine), 401, "invalid_grant")

    # Idempotent, and not a theft signal: the same (now dead) token, no token at all, an unknown token, junk.
    again = await client.post("/auth/logout", json={"refresh_token": mine})
    assert again.status_code == 204
    assert_cookie_cleared(again)
    client.cookies.clear()
    assert (await client.post("/auth/logout")).status_code == 204
    assert (await client.post("/auth/logout", json={})).status_code == 204
    assert (await client.post("/auth/logout", json={"refresh_token": "B" * 43})).status_code == 204
    assert (await client.post("/auth/logout", json={"refresh_token": "junk"})).status_code == 204
    assert (await client.post("/auth/logout", headers=refresh_cookie_request(client, "C" * 43))).status_code == 204
    assert reuse_count(issuer) == 0

    # The other session of the same user is untouched.
    assert (await family_row(engine, await family_of(engine, other))).revoked_at is None
    await rotate_ok(client, other)


async def test_logout_by_cookie(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
    out = await client.post("/auth/logout", headers=refresh_cookie_request(client, token))
    assert out.status_code == 204
    assert_cookie_cleared(out)
    assert (await family_row(issuer.engine, await family_of(issuer.engine, token))).revoked_reason == "logout"
    assert_error(await refresh_cookie(client, token), 401, "invalid_grant")


async def test_logout_all_revokes_every_family_and_bumps_token_version(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    engine, clock = issuer.engine, issuer.clock
    started = [await start_session(client) for _ in range(3)]
    bystander = (await start_session(client, BOB))["refresh_token"]
    rotated = await rotate_ok(client, started[0]["refresh_token"])
    old_access = rotated["access_token"]
    assert jwt_claims(old_access)["tokenVersion"] == 0

    response = await client.post("/auth/logout-all", headers=bearer(old_access))
    assert response.status_code == 204, response.text

    user_id = jwt_claims(old_access)["sub"]
    assert await sessions.active(issuer.services.db, user_id, clock()) == []
    assert (await users.by_ids(issuer.services.db, [user_id]))[user_id].token_version == 1
    for token in [rotated["refresh_token"], *(s["refresh_token"] for s in started[1:])]:
        family = await family_row(engine, await family_of(engine, token))
        assert family.revoked_reason == "logout_all"
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
    # Access tokens issued before are refused at the issuer at once.
    assert_invalid_token(await client.get("/auth/me", headers=bearer(old_access)))
    # A fresh login works and carries the new version.
    fresh = await login(client)
    assert jwt_claims(fresh["access_token"])["tokenVersion"] == 1
    me = await client.get("/auth/me", headers=bearer(fresh["access_token"]))
    assert me.status_code == 200
    assert me.json()["tokenVersion"] == 1
    # Another user is untouched.
    assert (await family_row(engine, await family_of(engine, bystander))).revoked_at is None
    await rotate_ok(client, bystander)


async def test_logout_all_kills_every_access_and_refresh_token(client: httpx.AsyncClient) -> None:
    await register(client)
    await register(client, BOB)
    a = await login(client)
    b = await login(client)
    b2 = await rotate_ok(client, b["refresh_token"])
    bob = await login(client, BOB)

    response = await client.post("/auth/logout-all", headers=bearer(a["access_token"]))
    assert response.status_code == 204
    assert response.content == b""

    for access in (a["access_token"], b["access_token"], b2["access_token"]):
        assert_invalid_token(await client.get("/auth/me", headers=bearer(access)))
        assert_invalid_token(await client.get("/auth/sessions", headers=bearer(access)))
        assert_invalid_token(await client.post("/auth/logout-all", headers=bearer(access)))
    # b was rotated moments ago, inside the reuse grace: even the benign-replay path must see the revocation.
    for refresh in (a["refresh_token"], b2["refresh_token"], b["refresh_token"]):
        assert_error(await refresh_body(client, refresh), 401, "invalid_grant")

    # Bob is untouched; Alice can log in again, now at tokenVersion 1.
    assert (await client.get("/auth/me", headers=bearer(bob["access_token"]))).json()["tokenVersion"] == 0
    assert (await refresh_body(client, bob["refresh_token"])).status_code == 200
    fresh = await login(client)
    assert jwt_claims(fresh["access_token"])["tokenVersion"] == 1
    assert (await client.get("/auth/me", headers=bearer(fresh["access_token"]))).json()["tokenVersion"] == 1
    listed = (await client.get("/auth/sessions", headers=bearer(fresh["access_token"]))).json()["sessions"]
    assert [s["id"] for s in listed] == [jwt_claims(fresh["access_token"])["sid"]]


async def test_logout_all_needs_a_bearer(client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    response = await client.post("/auth/logout-all")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    # A refresh token is not an access token.
    assert_invalid_token(await client.post("/auth/logout-all", headers=bearer(tokens["refresh_token"])))
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200
