"""Key changes reach every replica through LISTEN/NOTIFY, not only at the next periodic reload: with the
reload interval an hour long, only the notification can have delivered them."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import bearer, login, me, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings, without_listen
from tests.support.jwt import token_kid
from tests.support.keys import Cli, jwks_kids, replicas
from tests.support.waiting import eventually

HOUR = 3600


async def listening(*instances: IssuerHarness) -> None:
    async with asyncio.timeout(10):
        for instance in instances:
            await instance.services.listener.wait_connected()


def slow_reload(settings: Settings) -> Settings:
    return with_settings(settings, key_reload_interval=HOUR, key_publish_lead=2 * HOUR, jwks_max_age=60)


async def test_a_revoke_on_one_replica_reaches_the_others_jwks_and_bearer_checks(
    settings: Settings, clock: FakeClock
) -> None:
    async with replicas(slow_reload(settings), clock, 3) as (a, b, c):
        await listening(a, b, c)
        async with a.client() as client_a, b.client() as client_b, c.client() as client_c:
            await register(client_a)
            tokens = await login(client_a)
            kid = token_kid(tokens["access_token"])
            assert (await me(client_b, tokens["access_token"])).status_code == 200

            await a.services.keys.revoke(kid)

            for client in (client_b, client_c):
                await eventually(lambda client=client: _lacks(client, kid))
                assert (await me(client, tokens["access_token"])).status_code == 401
            # And they sign with the new key at once: no replica keeps signing with the revoked one.
            fresh = await login(client_c)
            assert token_kid(fresh["access_token"]) != kid
            assert (await client_b.get("/auth/me", headers=bearer(fresh["access_token"]))).status_code == 200


async def _lacks(client: object, kid: str) -> bool:
    return kid not in await jwks_kids(client)  # type: ignore[arg-type]


async def test_a_cli_rotation_is_announced_to_running_replicas(settings: Settings, clock: FakeClock, cli: Cli) -> None:
    async with replicas(slow_reload(settings), clock, 2) as (a, b):
        await listening(a, b)
        async with b.client() as client_b:
            before = await jwks_kids(client_b)
            assert (await cli("keys", "rotate")).code == 0

            async def published() -> bool:
                return len(await jwks_kids(client_b)) == len(before) + 1

            await eventually(published)


async def test_the_listener_comes_back_after_its_connection_is_killed(settings: Settings, clock: FakeClock) -> None:
    async with replicas(slow_reload(settings), clock, 2) as (a, b):
        await listening(a, b)
        async with b.engine.connect() as conn:
            killed = await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            )
            assert len(killed.all()) == 2
        await eventually(lambda: _reconnected(a, b))
        async with b.client() as client_b:
            kid = next(iter(await jwks_kids(client_b)))
            await a.services.keys.revoke(kid)
            await eventually(lambda: _lacks(client_b, kid))


async def _reconnected(*instances: IssuerHarness) -> bool:
    await asyncio.sleep(0.05)
    return all(instance.services.listener.connected for instance in instances)


async def test_while_listen_is_down_a_replica_rereads_the_keys_every_second(
    settings: Settings, clock: FakeClock
) -> None:
    """The contract's 1 s holds without notifications too: with an hour-long reload interval, only the
    once-a-second re-read of a replica that cannot LISTEN can have delivered the revoke."""
    async with (
        running_issuer(slow_reload(settings), clock) as a,
        running_issuer(without_listen(slow_reload(settings)), clock) as b,
        b.client() as client_b,
    ):
        assert not b.services.listener.connected
        kid = next(iter(await jwks_kids(client_b)))
        await a.services.keys.revoke(kid)
        await eventually(lambda: _lacks(client_b, kid))
