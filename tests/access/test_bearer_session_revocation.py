"""A revoked session's access token is refused at the issuer's own endpoints too, on every replica, within
moments of the revocation (learned from the revocation events: no extra round trip per request)."""

from __future__ import annotations

import httpx

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import assert_invalid_token, bearer, login, me, refused_soon, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import jwt_claims


async def test_logout_and_session_deletion_end_that_sessions_access_token_everywhere(
    settings: Settings, clock: FakeClock
) -> None:
    async with (
        running_issuer(settings, clock) as a,
        running_issuer(settings, clock) as b,
        a.client() as client_a,
        b.client() as client_b,
    ):
        await register(client_a)
        logged_out, deleted, kept = await login(client_a), await login(client_a), await login(client_a)
        await client_a.post("/auth/logout", json={"refresh_token": logged_out["refresh_token"]})
        sid = jwt_claims(deleted["access_token"])["sid"]
        response = await client_a.delete(f"/auth/sessions/{sid}", headers=bearer(kept["access_token"]))
        assert response.status_code == 204
        for client in (client_a, client_b):
            for tokens in (logged_out, deleted):
                assert_invalid_token(await refused_soon(client, tokens["access_token"]))
            assert (await me(client, kept["access_token"])).status_code == 200


async def test_without_listen_a_replica_learns_it_by_reading_the_events(settings: Settings, clock: FakeClock) -> None:
    deaf = with_settings(settings, database_listen_url="postgresql://postgres@127.0.0.1:1/nothing")
    async with running_issuer(settings, clock) as a, running_issuer(deaf, clock) as b:
        assert not b.services.listener.connected
        async with a.client() as client_a, b.client() as client_b:
            await register(client_a)
            tokens = await login(client_a)
            await client_a.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
            assert_invalid_token(await refused_soon(client_b, tokens["access_token"]))


async def test_a_restarted_replica_knows_the_sessions_revoked_before_it_started(
    issuer: IssuerHarness, client: httpx.AsyncClient, settings: Settings, clock: FakeClock
) -> None:
    await register(client)
    tokens = await login(client)
    await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    async with running_issuer(settings, clock) as fresh, fresh.client() as fresh_client:
        assert_invalid_token(await me(fresh_client, tokens["access_token"]))
