"""Small HTTP helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx

PASSWORD = "correct horse battery"


async def register(
    client: httpx.AsyncClient, email: str = "alice@example.com", password: str = PASSWORD
) -> dict[str, Any]:
    response = await client.post("/auth/register", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()["user"]
    return user


async def login(
    client: httpx.AsyncClient, email: str = "alice@example.com", password: str = PASSWORD, transport: str = "body"
) -> dict[str, Any]:
    body: dict[str, Any] = {"email": email, "password": password}
    if transport != "cookie":
        body["token_transport"] = transport
    response = await client.post("/auth/login", json=body)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def refresh_body(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/auth/refresh", json={"refresh_token": token})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.get("/auth/me", headers=bearer(token))


async def refused_soon(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """GET /auth/me's answer once it is no longer 200: a revoked session's token is refused by every replica
    once it has read the revocation's event (LISTEN), a moment after the revoking answer. Bounded: a hang
    fails the test; it is not a speed target."""
    async with asyncio.timeout(10):
        while (response := await me(client, token)).status_code == 200:  # noqa: ASYNC110 (another task's state)
            await asyncio.sleep(0.02)
    return response


async def delete_account(client: httpx.AsyncClient, access_token: str, password: str) -> httpx.Response:
    return await client.request("DELETE", "/auth/account", json={"password": password}, headers=bearer(access_token))


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert isinstance(body["error_description"], str)
    assert body["error_description"]


# RFC 6750 section 3: the challenge names the error and describes it; error_description is a quoted string of
# %x20-21 / %x23-5B / %x5D-7E (printable ASCII without '"' and '\\'), and nothing else follows.
INVALID_TOKEN_CHALLENGE = re.compile(r'Bearer error="invalid_token", error_description="[\x20\x21\x23-\x5b\x5d-\x7e]+"')


def assert_invalid_token(response: httpx.Response) -> None:
    """401 invalid_token in the contract's body (exactly ``error`` and ``error_description``), with exactly one
    RFC 6750 challenge that names the error and describes it (not the bare ``Bearer`` of "no credentials")."""
    assert_error(response, 401, "invalid_token")
    assert set(response.json()) == {"error", "error_description"}, response.json()
    challenges = response.headers.get_list("www-authenticate")
    assert len(challenges) == 1, challenges
    assert challenges[0].startswith('Bearer error="invalid_token"'), challenges[0]
    assert INVALID_TOKEN_CHALLENGE.fullmatch(challenges[0]), challenges[0]


def assert_no_credentials(response: httpx.Response) -> None:
    """401 with the bare challenge of RFC 6750 section 3.1: no credentials (or another scheme), so no error code."""
    assert response.status_code == 401, response.text
    assert response.headers.get_list("www-authenticate") == ["Bearer"], response.headers


def assert_throttled(response: httpx.Response) -> int:
    """429 too_many_requests in the contract's body, not cached, no token in it; returns its Retry-After."""
    assert_error(response, 429, "too_many_requests")
    assert set(response.json()) == {"error", "error_description"}
    assert response.headers["cache-control"] == "no-store"
    assert "refresh_token" not in response.text
    assert "access_token" not in response.text
    return retry_after(response)


def retry_after(response: httpx.Response) -> int:
    """The Retry-After header as delta-seconds; fails on anything else (an HTTP date, a fraction)."""
    raw = response.headers.get("retry-after")
    assert raw is not None, f"no Retry-After on {response.status_code}: {response.headers}"
    assert raw.isdigit(), f"Retry-After is not integer seconds: {raw!r}"
    seconds = int(raw)
    assert seconds >= 1, raw
    return seconds
