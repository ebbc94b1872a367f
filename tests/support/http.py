"""Small HTTP helpers shared by the test modules."""

from __future__ import annotations

from typing import Any

import httpx

PASSWORD = "correct horse battery"


async def register(
    client: httpx.AsyncClient, email: str = "alice@example.com", password: str = PASSWORD
) -> dict[str, Any]:
    response = await client.post("/auth/register", json={"email": email, "password": password})
    assert response.status_code == 201, response.text
    return response.json()["user"]


async def login(
    client: httpx.AsyncClient, email: str = "alice@example.com", password: str = PASSWORD, transport: str = "body"
) -> dict[str, Any]:
    body: dict[str, Any] = {"email": email, "password": password}
    if transport != "cookie":
        body["token_transport"] = transport
    response = await client.post("/auth/login", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def refresh_body(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/auth/refresh", json={"refresh_token": token})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert isinstance(body["error_description"], str)
    assert body["error_description"]
