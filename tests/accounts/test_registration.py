"""Registration (``POST /auth/register``): 201 with the user, the email normalized; an email already taken,
however it is spelled, is 409 and changes nothing."""

from __future__ import annotations

import httpx

from issuer.storage.schema import users
from tests.support.families import ALICE, login_response, row_count
from tests.support.http import PASSWORD, assert_error, login, register
from tests.support.issuer import IssuerHarness


async def test_register_returns_201_and_user(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/register", json={"email": "  Alice@Example.COM ", "password": PASSWORD})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"user"}
    user = body["user"]
    assert set(user) == {"id", "email", "role"}
    assert user["email"] == ALICE
    assert user["role"] == "user"
    assert isinstance(user["id"], str)
    assert user["id"]
    assert PASSWORD not in response.text


async def test_register_duplicate_email_case_insensitive_and_trimmed(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    for email in (ALICE, "ALICE@EXAMPLE.COM", "  Alice@Example.com  ", "alice@EXAMPLE.com\n"):
        response = await client.post("/auth/register", json={"email": email, "password": "another password"})
        assert_error(response, 409, "email_taken")
    assert await row_count(issuer.engine, users) == 1
    # The original password still works; the duplicate attempts changed nothing.
    await login(client)
    assert_error(await login_response(client, password="another password"), 401, "invalid_credentials")
