from __future__ import annotations

import httpx

from tests.support.http import bearer, login, refresh_body, register


async def test_register_login_me_refresh(client: httpx.AsyncClient) -> None:
    user = await register(client)
    tokens = await login(client)
    me = await client.get("/auth/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200
    assert me.json() == {**user, "tokenVersion": 0}
    rotated = await refresh_body(client, tokens["refresh_token"])
    assert rotated.status_code == 200
    assert rotated.json()["refresh_token"] != tokens["refresh_token"]
