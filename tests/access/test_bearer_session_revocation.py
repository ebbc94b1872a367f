"""A revoked session's access token is refused at the issuer's own endpoints too, on every replica, within
moments of the revocation (learned from the revocation events: no extra round trip per request)."""

from __future__ import annotations

from datetime import timedelta

import httpx

from issuer.events.feed import event_retention
from issuer.settings import Settings
from issuer.storage.cleanup import cleanup
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


async def test_a_replica_starting_after_events_were_pruned_starts_and_still_refuses(
    issuer: IssuerHarness, client: httpx.AsyncClient, settings: Settings, clock: FakeClock
) -> None:
    """The kept window starts after the pruned events: a new process reads it from there (it once looped
    forever on "my position is below the pruned ones", and never finished starting)."""
    await register(client)
    old = await login(client)
    await client.post("/auth/logout", json={"refresh_token": old["refresh_token"]})
    clock.advance(3600)
    recent, kept = await login(client), await login(client)
    await client.post("/auth/logout", json={"refresh_token": recent["refresh_token"]})
    report = await cleanup(
        issuer.services.db,
        now=clock(),
        retention=timedelta(days=7),
        failure_window=timedelta(hours=1),
        event_retention=event_retention(settings),
    )
    assert report.events == 1
    # Refused from the first request: the start-up read the kept window (it does not wait for LISTEN).
    async with running_issuer(settings, clock) as fresh, fresh.client() as fresh_client:
        assert_invalid_token(await me(fresh_client, recent["access_token"]))
        assert (await me(fresh_client, kept["access_token"])).status_code == 200
