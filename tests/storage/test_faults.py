"""The database fails under load: 503 with Retry-After (never a 500, never a hang), then recovery by itself.

Real faults against PostgreSQL, on the issuer's one connection pool (``services.db``):
- the issuer's backends are terminated (``pg_terminate_backend``) while traffic runs, as in a crash or
  failover of the server, or while every pooled connection sits idle;
- every pooled connection is busy (pool exhaustion);
- the database becomes unreachable for a while: the app talks to PostgreSQL through a TCP proxy run by the
  test (:class:`tests.support.faults.PostgresProxy`), which is cut (every connection dropped, new ones
  refused) or stalled (a silent partition), and later restored.

Afterwards every family must still be a single chain (at most one live token), checked through the tests'
own connection (``engine``), which bypasses the proxy. Each request is wrapped in ``asyncio.timeout`` as a
hang detector only; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.settings import Settings
from issuer.storage import database
from issuer.storage.database import Database, DatabaseUnavailable
from tests.support.clock import FakeClock
from tests.support.families import assert_single_chain, token_row
from tests.support.faults import PostgresProxy, assert_unavailable, postgres_proxy
from tests.support.http import PASSWORD, bearer, login, refresh_body, register, retry_after
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.operations import sample

HANG_LIMIT = 15.0  # seconds; far above the issuer's own bounds (connect 5 s, pool 5 s, command 10 s)
USERS = 6
ROUNDS = 24


async def bounded(request: Awaitable[httpx.Response], limit: float = HANG_LIMIT) -> httpx.Response:
    try:
        async with asyncio.timeout(limit):
            return await request
    except TimeoutError:
        pytest.fail(f"a request hung for more than {limit} s while the database was failing")


def assert_ok_or_unavailable(response: httpx.Response, ok: int = 200) -> bool:
    """True when it succeeded; a 503 must be well-formed; anything else (a 500, a 401) fails."""
    if response.status_code == ok:
        return True
    assert response.status_code == 503, f"{response.status_code} {response.text}"
    assert_unavailable(response)
    return False


def database_errors(harness: IssuerHarness) -> float:
    return sample(harness.services, "issuer_database_errors_total")


@dataclass
class Session:
    email: str
    ip: str
    refresh_token: str
    access_token: str
    outcomes: list[tuple[str, int]] = field(default_factory=list)

    def login_body(self) -> dict[str, str]:
        return {"email": self.email, "password": PASSWORD, "token_transport": "body"}


async def _sign_up(harness: IssuerHarness) -> list[Session]:
    sessions = []
    for i in range(USERS):
        email, ip = f"user{i}@example.com", f"192.0.2.{10 + i}"
        async with harness.client(ip=ip) as client:
            await register(client, email=email)
            tokens = await login(client, email=email)
        sessions.append(Session(email, ip, tokens["refresh_token"], tokens["access_token"]))
    return sessions


async def _traffic(harness: IssuerHarness, session: Session, rounds: int) -> None:
    """refresh / me / login in turn; a refresh that failed is retried with the same token (what clients do)."""
    async with harness.client(ip=session.ip) as client:
        for step in range(rounds):
            kind = ("refresh", "me", "login")[step % 3]
            if kind == "refresh":
                response = await bounded(refresh_body(client, session.refresh_token))
                if assert_ok_or_unavailable(response):
                    session.refresh_token = response.json()["refresh_token"]
                    session.access_token = response.json()["access_token"]
            elif kind == "me":
                response = await bounded(client.get("/auth/me", headers=bearer(session.access_token)))
                assert_ok_or_unavailable(response)
            else:
                response = await bounded(client.post("/auth/login", json=session.login_body()))
                assert_ok_or_unavailable(response)
            session.outcomes.append((kind, response.status_code))


async def _under_load(harness: IssuerHarness, sessions: list[Session], fault: Awaitable[object]) -> list[int]:
    """Run ROUNDS requests per session while ``fault`` runs; returns every request's status."""
    workers = [asyncio.create_task(_traffic(harness, s, ROUNDS)) for s in sessions]
    try:
        await fault
        await asyncio.gather(*workers)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    outcomes = [status for s in sessions for _, status in s.outcomes]
    assert len(outcomes) == len(sessions) * ROUNDS
    return outcomes


async def _wait_for(sessions: list[Session], count: int) -> None:
    """Until the sessions' traffic has made ``count`` requests in all (bounded)."""
    for _ in range(3000):  # bounded: 30 s at most
        if sum(len(s.outcomes) for s in sessions) >= count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"the load stalled at {sum(len(s.outcomes) for s in sessions)} requests")


async def _recovered(harness: IssuerHarness, sessions: list[Session]) -> None:
    """Every session refreshes, every user logs in and reads /auth/me: at once, no restart, no retry loop."""
    for session in sessions:
        async with harness.client(ip=session.ip) as client:
            refreshed = await bounded(refresh_body(client, session.refresh_token))
            assert refreshed.status_code == 200, refreshed.text
            session.refresh_token = refreshed.json()["refresh_token"]
            session.access_token = refreshed.json()["access_token"]
            me = await bounded(client.get("/auth/me", headers=bearer(session.access_token)))
            assert me.status_code == 200, me.text
            assert me.json()["email"] == session.email
            fresh = await bounded(client.post("/auth/login", json=session.login_body()))
            assert fresh.status_code == 200, fresh.text
    async with harness.client() as client:
        ready = await bounded(client.get("/readyz"))
        assert ready.status_code == 200, ready.text


async def _served_from_memory(client: httpx.AsyncClient) -> None:
    """What needs no database answers as usual while it is down."""
    assert (await bounded(client.get("/healthz"))).status_code == 200
    jwks = await bounded(client.get("/.well-known/jwks.json"))
    assert jwks.status_code == 200
    assert jwks.json()["keys"]
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        document = await bounded(client.get(path))
        assert document.status_code == 200
        assert document.json()["jwks_uri"].endswith("/.well-known/jwks.json")
    assert (await bounded(client.get("/metrics"))).status_code == 200


async def _not_ready(client: httpx.AsyncClient) -> None:
    ready = await bounded(client.get("/readyz"))
    assert ready.status_code == 503, ready.text
    retry_after(ready)


# ---------------------------------------------------------------- backends terminated

BUSY = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
    "AND state IN ('active', 'idle in transaction')"
)
KILL = (
    "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


async def _terminate_issuer_backends(pg_url: str, *, wait_until_busy: bool = False) -> int:
    """Terminate every other backend of the test database; optionally first wait (bounded) for one to be busy,
    so that the kill lands inside a request rather than only on idle pooled connections."""
    admin = await asyncpg.connect(pg_url, timeout=5)
    try:
        for _ in range(500 if wait_until_busy else 0):
            if await admin.fetchval(BUSY):
                break
            await asyncio.sleep(0.002)
        rows = await admin.fetch(KILL)
    finally:
        await admin.close()
    return sum(1 for row in rows if row["killed"])


async def test_backends_terminated_under_load(
    settings: Settings, clock: FakeClock, pg_url: str, engine: AsyncEngine
) -> None:
    # Lock-out on with a threshold no one reaches: its table is written on every login too.
    configured = with_settings(settings, login_lockout_threshold=1000)
    async with running_issuer(configured, clock) as harness:
        sessions = await _sign_up(harness)
        killed: list[int] = []

        async def kill_three_times() -> None:
            for fraction in (0.2, 0.45, 0.7):
                await _wait_for(sessions, int(USERS * ROUNDS * fraction))
                killed.append(await _terminate_issuer_backends(pg_url, wait_until_busy=True))

        outcomes = await _under_load(harness, sessions, kill_three_times())
        assert sum(killed) > 0, "the kills hit no backend: the fault was never injected"
        failures = [status for status in outcomes if status == 503]
        # The kills landed on busy backends: some requests did meet a dead connection (and answered 503).
        assert failures, "no request met a terminated backend"
        assert database_errors(harness) == len(failures)

        await _recovered(harness, sessions)
        await assert_single_chain(engine, clock())


async def test_idle_pool_connections_killed_then_used(
    settings: Settings, clock: FakeClock, pg_url: str, engine: AsyncEngine
) -> None:
    """Every pooled connection dies while idle: once the server's close has reached the issuer, the next
    requests succeed at once (the pool replaces a connection it knows is closed when it hands it out).

    A request that takes a connection in the instant between the kill and the close's arrival meets a dead
    backend and answers 503 (a read is retried once on a fresh connection, a write never is); that race is
    what ``test_backends_terminated_under_load`` covers. Here the test waits for the closes to arrive first,
    so it asserts the property and not the scheduler's timing."""
    async with running_issuer(settings, clock) as harness:
        db = harness.services.db
        sessions = await _sign_up(harness)
        # Fill the pool with several connections (concurrent writes each hold one), then kill them all.
        await asyncio.gather(*(_one_refresh(harness, s) for s in sessions))
        pooled = db.open_connections()
        assert pooled > 0, "the pool holds no connection: nothing was killed there"
        assert await _terminate_issuer_backends(pg_url) >= pooled
        await _closes_arrived(db)
        await _recovered(harness, sessions)
        assert database_errors(harness) == 0
        await assert_single_chain(engine, clock())


async def _one_refresh(harness: IssuerHarness, session: Session) -> None:
    async with harness.client(ip=session.ip) as client:
        response = await refresh_body(client, session.refresh_token)
        assert response.status_code == 200, response.text
        session.refresh_token = response.json()["refresh_token"]
        session.access_token = response.json()["access_token"]


async def _closes_arrived(db: Database) -> None:
    """Wait (bounded) until the issuer's pool has seen the server close every connection it held.

    ``pg_terminate_backend`` only signals a backend; it exits, and its close crosses the socket, when the
    scheduler lets it. On a loaded 2-core box that can be after the test's next request (which then takes a
    connection the pool still believes open: see the test's docstring)."""
    for _ in range(1000):  # bounded: 10 s at most
        if not db.open_connections():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{db.open_connections()} killed connections never saw the server's close")


# ---------------------------------------------------------------- every pooled connection busy


async def test_exhausted_pool_gives_503_then_recovers(
    settings: Settings, clock: FakeClock, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection of the pool is held (a slow transaction, a burst): a request that waits longer than the
    pool timeout gets a prompt 503 (nothing was written: the presented refresh token is still the live one),
    and everything works again once a connection is free."""
    monkeypatch.setattr(database, "POOL_TIMEOUT", 0.5)  # the production wait is 5 s; only its length changes
    async with running_issuer(with_settings(settings, db_pool_size=1), clock) as harness:
        sessions = await _sign_up(harness)
        session = sessions[0]
        async with harness.services.db.transaction() as held, harness.client(ip=session.ip) as client:
            await held.fetch(database.PING)
            assert harness.services.db.open_connections() == 1
            assert_unavailable(await bounded(refresh_body(client, session.refresh_token)))
            assert_unavailable(await bounded(client.get("/auth/me", headers=bearer(session.access_token))))
            assert_unavailable(await bounded(client.post("/auth/login", json=session.login_body())))
            await _not_ready(client)
            await _served_from_memory(client)
        assert database_errors(harness) == 3
        row = await token_row(engine, session.refresh_token)
        assert row is not None
        assert row.consumed_at is None, "the refused refresh consumed the token"
        await _recovered(harness, sessions)
        await assert_single_chain(engine, clock())


# ---------------------------------------------------------------- unreachable database (the proxy cut or stalled)


@pytest.fixture
async def proxy() -> AsyncIterator[PostgresProxy]:
    async with postgres_proxy() as forwarder:
        yield forwarder


async def test_unreachable_database_gives_503_then_recovers(
    settings: Settings, clock: FakeClock, engine: AsyncEngine, proxy: PostgresProxy
) -> None:
    configured = with_settings(
        settings,
        database_url=proxy.url(settings.database_url),
        database_listen_url=settings.database_url,
        login_lockout_threshold=1000,
    )
    async with running_issuer(configured, clock) as harness:
        sessions = await _sign_up(harness)

        async def cut_a_third_in() -> None:
            await _wait_for(sessions, USERS * ROUNDS // 3)
            proxy.cut()

        outcomes = await _under_load(harness, sessions, cut_a_third_in())
        assert 503 in outcomes, "the cut never reached a request"
        assert proxy.refused > 0, "no reconnection was attempted through the cut proxy"

        # While down: every database-backed endpoint is a prompt, well-formed 503.
        session = sessions[0]
        async with harness.client(ip=session.ip) as client:
            for _ in range(2):
                assert_unavailable(await bounded(client.post("/auth/login", json=session.login_body())))
                assert_unavailable(await bounded(refresh_body(client, session.refresh_token)))
                assert_unavailable(await bounded(client.get("/auth/me", headers=bearer(session.access_token))))
                assert_unavailable(await bounded(client.get("/auth/sessions", headers=bearer(session.access_token))))
                assert_unavailable(
                    await bounded(
                        client.post("/auth/register", json={"email": "new@example.com", "password": PASSWORD})
                    )
                )
                client.cookies.clear()
                cookie_refresh = await bounded(
                    client.post("/auth/refresh", headers={"Cookie": f"refresh_token={session.refresh_token}"})
                )
                assert_unavailable(cookie_refresh)
                logout = await bounded(client.post("/auth/logout", json={"refresh_token": session.refresh_token}))
                assert_unavailable(logout)  # not a false 204: the session was not ended
                await _not_ready(client)
                await _served_from_memory(client)
        assert database_errors(harness) > 0

        # Back: everything recovers without a restart.
        proxy.restore()
        await _recovered(harness, sessions)
        await assert_single_chain(engine, clock())


async def test_key_reload_while_unreachable_keeps_serving_keys(
    settings: Settings, clock: FakeClock, proxy: PostgresProxy
) -> None:
    configured = with_settings(
        settings, database_url=proxy.url(settings.database_url), database_listen_url=settings.database_url
    )
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        before = (await client.get("/.well-known/jwks.json")).json()
        proxy.cut()
        with pytest.raises(DatabaseUnavailable):
            await asyncio.wait_for(harness.services.keys.reload(), HANG_LIMIT)
        after = await bounded(client.get("/.well-known/jwks.json"))
        assert after.status_code == 200
        assert after.json() == before
        assert harness.services.keys.signing_key(clock()) is not None
        proxy.restore()
        await harness.services.keys.reload()
        assert (await client.get("/readyz")).status_code == 200


STALL_HANG_LIMIT = 30.0  # a partition costs the driver's own timeouts (command 10 s, connect 5 s)


async def test_partitioned_database_gives_503_within_bounded_time(
    settings: Settings, clock: FakeClock, engine: AsyncEngine, proxy: PostgresProxy
) -> None:
    """The worst kind of outage: packets vanish, nothing is refused. Every request still ends, in 503."""
    configured = with_settings(
        settings, database_url=proxy.url(settings.database_url), database_listen_url=settings.database_url
    )
    async with running_issuer(configured, clock) as harness:
        sessions = await _sign_up(harness)
        session = sessions[0]
        proxy.stall()
        async with harness.client(ip=session.ip) as client:

            async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                return await bounded(client.request(method, path, **kwargs), STALL_HANG_LIMIT)

            me, refreshed, logged_in, ready, jwks, metadata = await asyncio.gather(
                call("GET", "/auth/me", headers=bearer(session.access_token)),
                call("POST", "/auth/refresh", json={"refresh_token": session.refresh_token}),
                call("POST", "/auth/login", json=session.login_body()),
                call("GET", "/readyz"),
                call("GET", "/.well-known/jwks.json"),
                call("GET", "/.well-known/openid-configuration"),
            )
            for response in (me, refreshed, logged_in):
                assert_unavailable(response)
            assert ready.status_code == 503
            assert jwks.status_code == 200
            assert jwks.json()["keys"]
            assert metadata.status_code == 200
        assert proxy.held > 0, "no connection attempt met the partition"

        proxy.restore()
        await _recovered(harness, sessions)
        await assert_single_chain(engine, clock())
