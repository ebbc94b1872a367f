"""The issuer end to end through a real PgBouncer in transaction pooling mode (issue 18, item 1).

Every issuer here reaches PostgreSQL only through PgBouncer (tests/pooler/conftest.py): its pool of 8 client
connections shares PgBouncer's 3 server connections, so consecutive statements of one client connection
regularly run on different server connections, and prepared statements named per client connection would
collide. The pool detects the pooler and turns asyncpg's statement cache off (issuer.storage.database); these
tests prove every path works so, and tests/pooler/test_pool.py shows what happens with the cache left on.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import asyncpg
import httpx

from issuer.settings import Settings
from issuer.storage.migrations import upgrade
from tests.conftest import run_blocking
from tests.pooler.pgbouncer import PgBouncer
from tests.support.clock import FakeClock
from tests.support.database import admin_dsn
from tests.support.families import assert_single_chain, rotate_ok, start_session
from tests.support.http import (
    PASSWORD,
    assert_error,
    assert_invalid_token,
    assert_throttled,
    bearer,
    login,
    me,
    refresh_body,
    register,
)
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import jwt_claims
from tests.support.keys import Cli

RACERS = 30


async def test_the_issuer_runs_behind_the_pooler_with_its_statement_cache_off(issuer: IssuerHarness) -> None:
    assert issuer.services.db.behind_pooler is True


async def test_register_login_me_and_a_refresh_chain(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    assert_error(
        await client.post("/auth/register", json={"email": "alice@example.com", "password": PASSWORD}),
        409,
        "email_taken",
    )
    assert_error(
        await client.post("/auth/login", json={"email": "alice@example.com", "password": "wrong password"}),
        401,
        "invalid_credentials",
    )
    tokens = await login(client)
    profile = await me(client, tokens["access_token"])
    assert profile.status_code == 200, profile.text
    assert profile.json()["id"] == user["id"]
    refresh = tokens["refresh_token"]
    for _ in range(10):
        rotated = await rotate_ok(client, refresh)
        assert rotated["refresh_token"] != refresh
        refresh = rotated["refresh_token"]
        assert (await me(client, rotated["access_token"])).status_code == 200
    listed = await client.get("/auth/sessions", headers=bearer(rotated["access_token"]))
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["sessions"]) == 1
    assert (await client.post("/auth/logout", json={"refresh_token": refresh})).status_code == 204
    assert_error(await refresh_body(client, refresh), 401, "invalid_grant")
    await assert_single_chain(issuer.engine, issuer.clock())


async def test_concurrent_refreshes_inside_the_grace_window_get_one_successor(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    token = (await start_session(client))["refresh_token"]
    responses = await asyncio.gather(*(refresh_body(client, token) for _ in range(RACERS)))
    assert [r.status_code for r in responses] == [200] * RACERS, [r.text for r in responses if r.status_code != 200]
    assert len({r.json()["refresh_token"] for r in responses}) == 1
    await assert_single_chain(issuer.engine, issuer.clock())


async def test_concurrent_refreshes_without_grace_have_one_winner_and_revoke_the_family(
    settings: Settings, clock: FakeClock
) -> None:
    async with running_issuer(with_settings(settings, refresh_reuse_grace=0), clock) as strict:
        async with strict.client() as client:
            token = (await start_session(client))["refresh_token"]
            responses = await asyncio.gather(*(refresh_body(client, token) for _ in range(RACERS)))
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] + [401] * (RACERS - 1), statuses
            winner = next(r for r in responses if r.status_code == 200).json()
            # The repeats were theft: the winner's successor died with its family.
            assert_error(await refresh_body(client, winner["refresh_token"]), 401, "invalid_grant")
        await assert_single_chain(strict.engine, clock())


async def test_two_replicas_racing_one_token_mint_one_successor(settings: Settings, clock: FakeClock) -> None:
    async with (
        running_issuer(settings, clock) as first,
        running_issuer(settings, clock) as second,
        first.client() as a,
        second.client() as b,
    ):
        token = (await start_session(a))["refresh_token"]
        responses = await asyncio.gather(*(refresh_body(a if i % 2 else b, token) for i in range(RACERS)))
        assert {r.status_code for r in responses} == {200}
        assert len({r.json()["refresh_token"] for r in responses}) == 1
        await assert_single_chain(first.engine, clock())


async def test_logout_all_revokes_every_session_and_the_access_tokens(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    sessions = [await start_session(client) for _ in range(3)]
    access = sessions[0]["access_token"]
    assert (await client.post("/auth/logout-all", headers=bearer(access))).status_code == 204
    assert_invalid_token(await me(client, access))
    for started in sessions:
        assert_error(await refresh_body(client, started["refresh_token"]), 401, "invalid_grant")
    fresh = await login(client)
    assert jwt_claims(fresh["access_token"])["tokenVersion"] == 1
    assert (await me(client, fresh["access_token"])).status_code == 200


async def test_the_login_limit_is_shared_through_the_pooler(settings: Settings, clock: FakeClock) -> None:
    """The per-IP bucket of login and register is a row updated by one statement; 12 at once take exactly 4."""
    async with (
        running_issuer(with_settings(settings, rate_limit_per_ip=4), clock, monotonic=clock.monotonic) as limited,
        limited.client(ip="192.0.2.50") as client,
    ):
        wrong = {"email": "alice@example.com", "password": "not the password"}
        responses = await asyncio.gather(*(client.post("/auth/login", json=wrong) for _ in range(12)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [401] * 4 + [429] * 8, statuses
        assert_throttled(next(r for r in responses if r.status_code == 429))


async def test_readiness_runs_its_statements_through_the_pooler(client: httpx.AsyncClient) -> None:
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_key_commands_and_cleanup_through_the_pooler(
    issuer: IssuerHarness, client: httpx.AsyncClient, cli: Cli
) -> None:
    rotated = await cli("keys", "rotate", "--now")
    assert rotated.code == 0, rotated
    listed = await cli("keys", "list")
    assert listed.code == 0, listed
    assert len(listed.out.splitlines()) == 3  # the header, the first key and the new one
    await issuer.services.keys.reload()
    tokens = await start_session(client)
    assert (await me(client, tokens["access_token"])).status_code == 200
    cleaned = await cli("cleanup")
    assert cleaned.code == 0, cleaned
    assert cleaned.out.startswith("deleted "), cleaned


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """An empty database on the test server, dropped after the block; yields its direct URL."""
    name = f"issuer_pooler_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn(), timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{admin_dsn().rsplit('/', 1)[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_migrations_run_through_the_pooler(pgbouncer: PgBouncer, cli: Cli) -> None:
    """The whole upgrade is one transaction, which a transaction pooler keeps on one server connection; and
    Alembic's connection has its statement caches off whatever the URL (migrations/env.py)."""
    migrated = await cli("migrate")  # the test database, already at head, through PgBouncer
    assert (migrated.code, migrated.out.strip()) == (0, "issuer: schema is up to date"), migrated
    async with fresh_database() as direct:
        pooled = pgbouncer.url(direct)
        await asyncio.to_thread(run_blocking, lambda: upgrade(pooled))
        await asyncio.to_thread(run_blocking, lambda: upgrade(pooled))  # idempotent
        conn = await asyncpg.connect(direct, timeout=5)
        try:
            assert await conn.fetchval("SELECT to_regclass('refresh_tokens') IS NOT NULL")
            assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
        finally:
            await conn.close()
