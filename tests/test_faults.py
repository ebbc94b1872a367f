"""The database dies under load: 503 with Retry-After (never a 500, never a hang), then recovery by itself.

Two real faults against PostgreSQL:
- the issuer's backends are terminated (``pg_terminate_backend``) while traffic runs, as in a crash or
  failover of the server;
- the database becomes unreachable for a while: the app talks to PostgreSQL through a TCP proxy run by
  the test, which is cut (every connection dropped, new ones refused) and later restored.

Afterwards every family must still be a single chain (at most one live token). Each request is wrapped in
``asyncio.timeout`` as a hang detector only; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from issuer.settings import Settings
from issuer.storage.database import HotPool
from tests.support.clock import FakeClock
from tests.support.families import assert_single_chain
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.operations import retry_after, sample

HANG_LIMIT = 15.0  # seconds; far above the issuer's own bounds (connect 5 s, pool 5 s, command 10 s)
USERS = 6
ROUNDS = 24


async def bounded(request: Awaitable[httpx.Response], limit: float = HANG_LIMIT) -> httpx.Response:
    try:
        async with asyncio.timeout(limit):
            return await request
    except TimeoutError:
        pytest.fail(f"a request hung for more than {limit} s while the database was failing")


def assert_unavailable(response: httpx.Response) -> None:
    assert_error(response, 503, "temporarily_unavailable")
    retry_after(response)
    assert response.headers["cache-control"] == "no-store"
    assert "set-cookie" not in response.headers
    assert "access_token" not in response.text


def assert_ok_or_unavailable(response: httpx.Response, ok: int = 200) -> bool:
    """True when it succeeded; a 503 must be well-formed; anything else (a 500, a 401) fails."""
    if response.status_code == ok:
        return True
    assert response.status_code == 503, f"{response.status_code} {response.text}"
    assert_unavailable(response)
    return False


@dataclass
class Session:
    email: str
    ip: str
    refresh_token: str
    access_token: str
    outcomes: list[tuple[str, int]] = field(default_factory=list)


async def _sign_up(harness: IssuerHarness) -> list[Session]:
    sessions = []
    for i in range(USERS):
        email, ip = f"user{i}@example.com", f"192.0.2.{10 + i}"
        async with harness.client(ip=ip) as client:
            await register(client, email=email)
            tokens = await login(client, email=email)
        sessions.append(Session(email, ip, tokens["refresh_token"], tokens["access_token"]))
    return sessions


async def _traffic(harness: IssuerHarness, session: Session, rounds: int, progress: list[int]) -> None:
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
                response = await bounded(
                    client.post(
                        "/auth/login",
                        json={"email": session.email, "password": PASSWORD, "token_transport": "body"},
                    )
                )
                assert_ok_or_unavailable(response)
            session.outcomes.append((kind, response.status_code))
            progress.append(1)


async def _wait_for(progress: list[int], count: int) -> None:
    for _ in range(3000):  # bounded: 30 s at most
        if len(progress) >= count:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"the load stalled at {len(progress)} requests")


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
            fresh = await bounded(
                client.post(
                    "/auth/login", json={"email": session.email, "password": PASSWORD, "token_transport": "body"}
                )
            )
            assert fresh.status_code == 200, fresh.text
    async with harness.client() as client:
        ready = await bounded(client.get("/readyz"))
        assert ready.status_code == 200, ready.text


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


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
    admin = await asyncpg.connect(_plain_dsn(pg_url), timeout=5)
    try:
        for _ in range(500 if wait_until_busy else 0):
            if await admin.fetchval(BUSY):
                break
            await asyncio.sleep(0.002)
        rows = await admin.fetch(KILL)
    finally:
        await admin.close()
    return sum(1 for row in rows if row["killed"])


# ---------------------------------------------------------------- backends terminated under load


async def test_backends_terminated_under_load(settings: Settings, clock: FakeClock, pg_url: str) -> None:
    # Lock-out on with a threshold no one reaches: its table is written on every login too.
    configured = with_settings(settings, login_lockout_threshold=1000)
    async with running_issuer(configured, clock) as harness:
        sessions = await _sign_up(harness)
        progress: list[int] = []
        workers = [asyncio.create_task(_traffic(harness, s, ROUNDS, progress)) for s in sessions]
        killed: list[int] = []
        try:
            total = USERS * ROUNDS
            for fraction in (0.2, 0.45, 0.7):
                await _wait_for(progress, int(total * fraction))
                killed.append(await _terminate_issuer_backends(pg_url, wait_until_busy=True))
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

        outcomes = [outcome for s in sessions for outcome in s.outcomes]
        assert len(outcomes) == USERS * ROUNDS
        assert sum(killed) > 0, "the kills hit no backend: the fault was never injected"
        failures = [o for o in outcomes if o[1] == 503]
        # The kills landed on busy backends: some requests did meet a dead connection (and answered 503).
        assert failures, "no request met a terminated backend"
        assert sample(harness.services, "issuer_database_errors_total") == len(failures)

        await _recovered(harness, sessions)
        await assert_single_chain(harness.engine, clock())


async def test_idle_pool_connections_killed_then_used(settings: Settings, clock: FakeClock, pg_url: str) -> None:
    """Every pooled connection dies while idle: once the server's close has reached the issuer, the next
    requests succeed at once (the checkout's liveness check discards the dead connections).

    A request that takes a connection in the instant between the kill and the close's arrival meets a dead
    backend and answers 503 (as with ``pool_pre_ping``, which has the same window); that race is what
    ``test_backends_terminated_under_load`` covers. Here the test waits for the closes to arrive first,
    so it asserts the property and not the scheduler's timing."""
    async with running_issuer(settings, clock) as harness:
        pooled = _pooled_connections(harness)
        sessions = await _sign_up(harness)
        # Fill the pool with several connections, then kill them all.
        await asyncio.gather(*(_one_me(harness, s) for s in sessions))
        hot = harness.services.hot
        assert hot is not None
        assert hot.open_connections() > 0, "the hot-path pool holds no connection: nothing was killed there"
        assert await _terminate_issuer_backends(pg_url) > 0
        await _closes_arrived(hot, pooled)
        await _recovered(harness, sessions)
        assert sample(harness.services, "issuer_database_errors_total") == 0
        await assert_single_chain(harness.engine, clock())


async def _one_me(harness: IssuerHarness, session: Session) -> None:
    async with harness.client(ip=session.ip) as client:
        assert (await client.get("/auth/me", headers=bearer(session.access_token))).status_code == 200


def _pooled_connections(harness: IssuerHarness) -> list[asyncpg.Connection]:
    """Every asyncpg connection the issuer's pool takes back from now on (SQLAlchemy's ``checkin`` event)."""
    seen: list[asyncpg.Connection] = []

    def on_checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is not None and dbapi_connection.driver_connection not in seen:
            seen.append(dbapi_connection.driver_connection)

    event.listen(harness.engine.sync_engine.pool, "checkin", on_checkin)
    return seen


async def _closes_arrived(hot: HotPool, pooled: list[asyncpg.Connection]) -> None:
    """Wait (bounded) until the issuer has seen the server close every connection of both its pools: the
    hot-path pool and the engine's (``pooled``).

    ``pg_terminate_backend`` only signals a backend; it exits, and its close crosses the socket, when the
    scheduler lets it. On a loaded 2-core box that can be after the test's next request."""
    assert pooled, "the engine's pool handed out no connection: nothing was killed there"

    def still_open() -> int:
        return sum(1 for connection in pooled if not connection.is_closed()) + hot.open_connections()

    for _ in range(1000):  # bounded: 10 s at most
        if not still_open():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{still_open()} killed connections never saw the server's close")


# ---------------------------------------------------------------- unreachable database (a TCP proxy cut)


class CuttableProxy:
    """A loopback TCP forwarder to PostgreSQL with two failure switches.

    ``cut``: every connection is dropped and new ones are refused (the server is down, a reset network).
    ``stall``: a partition; nothing moves on open connections and new ones are accepted but never answered.
    ``restore`` ends either.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._up = True
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.refused = 0
        self.held = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def cut(self) -> None:
        self._up = False
        for transport in list(self._transports):
            transport.abort()

    def stall(self) -> None:
        self._flowing.clear()
        for transport in list(self._transports):
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()

    def restore(self) -> None:
        self._up = True
        self._flowing.set()
        for transport in list(self._transports):
            assert isinstance(transport, asyncio.ReadTransport)
            transport.resume_reading()

    async def close(self) -> None:
        self.cut()
        self._flowing.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if not self._up:
                self.refused += 1
                writer.transport.abort()
                return
            if not self._flowing.is_set():
                # Accepted, never answered; when the partition ends the client has long given up on it.
                self.held += 1
                await self._flowing.wait()
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                writer.transport.abort()
                return
            self._transports.update({writer.transport, up_writer.transport})
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                self._transports.difference_update({writer.transport, up_writer.transport})
                up_writer.transport.abort()
                writer.transport.abort()
        finally:
            self._handlers.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@pytest.fixture
async def proxy() -> AsyncIterator[CuttableProxy]:
    forwarder = CuttableProxy("127.0.0.1", 5432)
    await forwarder.start()
    try:
        yield forwarder
    finally:
        await forwarder.close()


def _through(pg_url: str, port: int) -> str:
    url = make_url(pg_url)
    assert url.host in ("127.0.0.1", "localhost"), "the proxy forwards to the local test server only"
    return url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


async def test_unreachable_database_gives_503_then_recovers(
    settings: Settings, clock: FakeClock, pg_url: str, proxy: CuttableProxy
) -> None:
    assert proxy._server is not None
    port = proxy._server.sockets[0].getsockname()[1]
    configured = with_settings(settings, database_url=_through(pg_url, port), login_lockout_threshold=1000)
    async with running_issuer(configured, clock) as harness:
        sessions = await _sign_up(harness)

        # Mid-load: cut while traffic runs.
        progress: list[int] = []
        workers = [asyncio.create_task(_traffic(harness, s, ROUNDS, progress)) for s in sessions]
        try:
            await _wait_for(progress, USERS * ROUNDS // 3)
            proxy.cut()
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        outcomes = [o for s in sessions for o in s.outcomes]
        assert len(outcomes) == USERS * ROUNDS
        assert any(status == 503 for _, status in outcomes), "the cut never reached a request"
        assert proxy.refused > 0, "no reconnection was attempted through the cut proxy"

        # While down: every database-backed endpoint is a prompt, well-formed 503.
        session = sessions[0]
        async with harness.client(ip=session.ip) as client:
            for _ in range(2):
                assert_unavailable(
                    await bounded(
                        client.post(
                            "/auth/login",
                            json={"email": session.email, "password": PASSWORD, "token_transport": "body"},
                        )
                    )
                )
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

                ready = await bounded(client.get("/readyz"))
                assert ready.status_code == 503, ready.text
                assert retry_after(ready) >= 1
                # Served from memory.
                assert (await bounded(client.get("/healthz"))).status_code == 200
                jwks = await bounded(client.get("/.well-known/jwks.json"))
                assert jwks.status_code == 200
                assert jwks.json()["keys"]
                for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
                    document = await bounded(client.get(path))
                    assert document.status_code == 200
                    assert document.json()["jwks_uri"].endswith("/.well-known/jwks.json")
                metrics = await bounded(client.get("/metrics"))
                assert metrics.status_code == 200
        assert sample(harness.services, "issuer_database_errors_total") > 0

        # Back: everything recovers without a restart.
        proxy.restore()
        await _recovered(harness, sessions)

        await assert_single_chain(harness.engine, clock())


async def test_key_reload_while_unreachable_keeps_serving_keys(
    settings: Settings, clock: FakeClock, pg_url: str, proxy: CuttableProxy
) -> None:
    assert proxy._server is not None
    port = proxy._server.sockets[0].getsockname()[1]
    configured = with_settings(settings, database_url=_through(pg_url, port))
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        before = (await client.get("/.well-known/jwks.json")).json()
        proxy.cut()
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the driver raises, the ring is kept
            await asyncio.wait_for(harness.services.keys.reload(), HANG_LIMIT)
        after = await bounded(client.get("/.well-known/jwks.json"))
        assert after.status_code == 200
        assert after.json() == before
        assert harness.services.keys.signing_key(clock()) is not None
        proxy.restore()
        await harness.services.keys.reload()
        assert (await client.get("/readyz")).status_code == 200


STALL_HANG_LIMIT = 30.0  # a partition costs the driver's own timeouts (ping/command 10 s, connect 5 s)


async def test_partitioned_database_gives_503_within_bounded_time(
    settings: Settings, clock: FakeClock, pg_url: str, proxy: CuttableProxy
) -> None:
    """The worst kind of outage: packets vanish, nothing is refused. Every request still ends, in 503."""
    assert proxy._server is not None
    port = proxy._server.sockets[0].getsockname()[1]
    configured = with_settings(settings, database_url=_through(pg_url, port))
    async with running_issuer(configured, clock) as harness:
        sessions = await _sign_up(harness)
        session = sessions[0]
        proxy.stall()
        async with harness.client(ip=session.ip) as client:

            async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                return await bounded(client.request(method, path, **kwargs), STALL_HANG_LIMIT)

            login_body = {"email": session.email, "password": PASSWORD, "token_transport": "body"}
            me, refreshed, logged_in, ready, jwks, metadata = await asyncio.gather(
                call("GET", "/auth/me", headers=bearer(session.access_token)),
                call("POST", "/auth/refresh", json={"refresh_token": session.refresh_token}),
                call("POST", "/auth/login", json=login_body),
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
        await assert_single_chain(harness.engine, clock())
