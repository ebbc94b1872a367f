"""Account deletion (``DELETE /auth/account`` with the password): the user and all their sessions are gone,
their unexpired access tokens get 401 at the issuer, and the email is free again; a wrong password deletes
nothing."""

from __future__ import annotations

import httpx

from issuer.storage.schema import families, refresh_tokens, users
from tests.support.families import ALICE, login_response, row_count
from tests.support.http import PASSWORD, assert_error, assert_invalid_token, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness

BOB = "bob@example.com"


async def table_counts(issuer: IssuerHarness) -> list[int]:
    return [await row_count(issuer.engine, table) for table in (users, families, refresh_tokens)]


async def test_delete_account_with_wrong_password_deletes_nothing(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    tokens = await login(client)
    before = await table_counts(issuer)
    response = await client.request(
        "DELETE", "/auth/account", json={"password": "wrong password"}, headers=bearer(tokens["access_token"])
    )
    assert_error(response, 403, "invalid_credentials")
    assert await table_counts(issuer) == before
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200


async def test_delete_account_removes_everything(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    await register(client, BOB)
    first = await login(client)
    second = await login(client)
    rotated = (await refresh_body(client, second["refresh_token"])).json()
    bob = await login(client, BOB)

    unauthenticated = await client.request("DELETE", "/auth/account", json={"password": PASSWORD})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["www-authenticate"] == "Bearer"

    response = await client.request(
        "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(first["access_token"])
    )
    assert response.status_code == 204
    assert response.content == b""

    for access in (first["access_token"], rotated["access_token"]):
        assert_invalid_token(await client.get("/auth/me", headers=bearer(access)))
    # second was rotated moments ago (inside the reuse grace); it must not come back either.
    for refresh in (first["refresh_token"], rotated["refresh_token"], second["refresh_token"]):
        assert_error(await refresh_body(client, refresh), 401, "invalid_grant")
    assert_error(await login_response(client), 401, "invalid_credentials")
    assert await row_count(issuer.engine, users, users.c.id == user["id"]) == 0
    assert await row_count(issuer.engine, families, families.c.user_id == user["id"]) == 0
    # Only Bob's rows are left: his account, his session, its one token.
    assert await table_counts(issuer) == [1, 1, 1]

    # Bob is untouched.
    assert (await client.get("/auth/me", headers=bearer(bob["access_token"]))).status_code == 200
    assert (await refresh_body(client, bob["refresh_token"])).status_code == 200

    # The email is free again, and the old token does not open the new account.
    again = await register(client)
    assert again["id"] != user["id"]
    assert again["email"] == ALICE
    assert_invalid_token(await client.get("/auth/me", headers=bearer(first["access_token"])))
    assert_error(await refresh_body(client, rotated["refresh_token"]), 401, "invalid_grant")
    fresh = await login(client)
    assert (await client.get("/auth/me", headers=bearer(fresh["access_token"]))).json()["id"] == again["id"]
