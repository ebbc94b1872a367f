"""What the issuer holds and a token does not: the user's tokenVersion and the account itself. A correctly
signed, unexpired token stops working at the issuer's own endpoints the moment either changes."""

from __future__ import annotations

import httpx

from tests.access.conftest import BEARER_REQUIRED, Forge
from tests.support.http import PASSWORD, assert_invalid_token, bearer, delete_account, login, me


async def test_token_version_below_current_after_logout_all(forge: Forge, client: httpx.AsyncClient) -> None:
    second = await login(client)
    response = await client.post("/auth/logout-all", headers=bearer(forge.access_token))
    assert response.status_code == 204
    for old in (forge.access_token, second["access_token"]):
        assert_invalid_token(await me(client, old))
        assert_invalid_token(await client.get("/auth/sessions", headers=bearer(old)))
        # Still a well-formed, unexpired, correctly signed token: only the version makes it dead.
        assert forge.verify(old, required=BEARER_REQUIRED)["tokenVersion"] == 0
    assert forge.failures() == {"revoked": 4}
    # A token that claims the new version, signed by the real key, is accepted: the version is the only reason.
    current = forge.sign(payload=forge.payload(tokenVersion=1))
    assert (await me(client, current)).status_code == 200
    fresh = await login(client)
    response = await me(client, fresh["access_token"])
    assert response.status_code == 200
    assert response.json()["tokenVersion"] == 1


async def test_token_of_a_deleted_user(forge: Forge, client: httpx.AsyncClient) -> None:
    response = await delete_account(client, forge.access_token, PASSWORD)
    assert response.status_code == 204, response.text
    assert_invalid_token(await me(client, forge.access_token))
    assert_invalid_token(await client.get("/auth/sessions", headers=bearer(forge.access_token)))
    # Re-signing the same claims does not help either: the user is gone.
    assert_invalid_token(await me(client, forge.sign()))
    assert forge.failures() == {"unknown_user": 3}
