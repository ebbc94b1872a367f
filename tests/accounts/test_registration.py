"""Registration (``POST /auth/register``): 201 with the user, the email normalized; an email already taken,
however it is spelled, is 409 and changes nothing."""

from __future__ import annotations

import httpx
import pytest

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


# ---------------------------------------------------------------- addresses the standards refuse or unify


@pytest.mark.parametrize(
    ("email", "problem"),
    [
        ("<alice@example.com>", "angle brackets"),
        ("Alice <alice@example.com>", None),  # a space: refused by the contract's own check first
        ("Alice<alice@example.com>", "display name"),
        ('"alice"@example.com', "Quoting"),
        ('"a@b"@example.com', None),  # two '@': the contract's own check
        ("alice@[192.0.2.1]", "bracketed IP address"),
        ("alice@localhost", "period"),
        ("alice@example.test", "special-use"),
        ("alice..smith@example.com", "two periods"),
        (".alice@example.com", "period"),
        ("alice@-example.com", "hyphen"),
        ("alice@example..com", "period"),
        ("alice@example.com.", "period"),
        ("alice,bob@example.com", "invalid character"),
        ("alice@exa_mple.com", "invalid character"),
        ("alice@" + "a" * 64 + ".com", "so many characters"),  # a DNS label is at most 63
        ("ü" * 122 + "@example.com", "too long"),  # 134 characters, 256 bytes: over RFC 5321's 254 octets
    ],
)
async def test_addresses_outside_the_standards_are_refused(
    issuer: IssuerHarness, client: httpx.AsyncClient, email: str, problem: str | None
) -> None:
    response = await client.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert_error(response, 400, "invalid_request")
    description = response.json()["error_description"]
    assert "'email'" in description
    if problem is not None:
        assert problem.lower() in description.lower(), description
    assert await row_count(issuer.engine, users) == 0


@pytest.mark.parametrize(
    ("first", "second", "stored"),
    [
        # IDNA: the U-label and the A-label of one domain, in any case, are one account, stored as U-labels.
        ("user@BÜCHER.de", "user@xn--bcher-kva.de", "user@bücher.de"),
        ("user@xn--bcher-kva.de", "USER@Bücher.DE", "user@bücher.de"),
        # UTS #46 maps full-width letters to their ASCII forms.
        ("user@\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com", "user@example.com", "user@example.com"),
        # The local part is NFC-normalised and lower-cased, internationalised or not.
        ("U\u0308SER@example.com", "\u00fcser@example.com", "\u00fcser@example.com"),
    ],
)
async def test_two_spellings_of_one_address_are_one_account(
    issuer: IssuerHarness, client: httpx.AsyncClient, first: str, second: str, stored: str
) -> None:
    created = await client.post("/auth/register", json={"email": first, "password": PASSWORD})
    assert created.status_code == 201, created.text
    assert created.json()["user"]["email"] == stored
    assert_error(await client.post("/auth/register", json={"email": second, "password": PASSWORD}), 409, "email_taken")
    assert await row_count(issuer.engine, users) == 1
    # Each spelling signs in to that account.
    for spelling in (first, second):
        tokens = await login(client, spelling)
        assert tokens["user"]["email"] == stored


async def test_an_account_stored_before_the_library_still_signs_in(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    """An address registered under the old hand-written check that the library refuses (here a display-name
    form) is still found at login, as it was stored; registering it anew is refused."""
    await register(client)
    legacy = "<legacy@example.com>"
    async with issuer.engine.begin() as conn:
        await conn.execute(users.update().where(users.c.email == ALICE).values(email=legacy))
    tokens = await login(client, "  <LEGACY@example.com> ")
    assert tokens["user"]["email"] == legacy
    refused = await client.post("/auth/register", json={"email": legacy, "password": PASSWORD})
    assert_error(refused, 400, "invalid_request")


async def test_login_with_an_address_the_library_refuses_is_invalid_credentials(client: httpx.AsyncClient) -> None:
    """No account can hold such an address now, so it is an unknown email (401), never a 500 or a lookup
    of some other spelling."""
    await register(client)
    response = await client.post("/auth/login", json={"email": "<alice@example.com>", "password": PASSWORD})
    assert_error(response, 401, "invalid_credentials")
