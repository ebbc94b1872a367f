"""The hot paths cost one PostgreSQL round trip each (issue 6), counted on the wire.

A loopback proxy between the issuer and PostgreSQL parses the frontend protocol and counts the messages
that make the server answer and wait for the client: ``Sync`` (ends an extended-protocol exchange, which
is how asyncpg runs a prepared statement) and ``Query`` (a simple-protocol statement, e.g. a BEGIN or a
COMMIT). That is the number of round trips whatever library sends them, so a hidden BEGIN/COMMIT, a pool
pre-ping or a second statement all show up. TLS is disabled on this connection so the proxy can read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from issuer.http.app import create_app
from issuer.keys import ring as keys_module
from issuer.services import Services
from issuer.settings import Settings
from issuer.storage.schema import create_engine
from tests.support.clock import FakeClock
from tests.support.http import bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness, with_settings

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


class CountingProxy:
    """Forwards to PostgreSQL and counts the client's message types after the start-up packet."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def round_trips(self) -> int:
        return self.sent["S"] + self.sent["Q"]

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        tasks = {
            asyncio.create_task(self._client_to_server(reader, up_writer)),
            asyncio.create_task(_pipe(up_reader, writer)),
        }
        self._tasks |= tasks
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for writer_ in (writer, up_writer):
            writer_.transport.abort()

    async def _client_to_server(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            # Start-up packets have no type byte: length, then a code (SSL/GSS requests come first).
            while True:
                head = await reader.readexactly(8)
                length, code = struct.unpack("!II", head)
                up.write(head + await reader.readexactly(length - 8))
                await up.drain()
                if code not in (SSL_REQUEST, GSSENC_REQUEST):
                    break
            while True:
                head = await reader.readexactly(5)
                kind, length = head[:1].decode(), struct.unpack("!I", head[1:])[0]
                self.sent[kind] += 1
                up.write(head + await reader.readexactly(length - 4))
                await up.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@pytest.fixture
async def counted(
    settings: Settings, clock: FakeClock, pg_url: str
) -> AsyncIterator[tuple[IssuerHarness, CountingProxy]]:
    async with _counting_issuer(settings, clock) as counting:
        yield counting


@pytest.fixture
async def counted_with_lockout(
    settings: Settings, clock: FakeClock, pg_url: str
) -> AsyncIterator[tuple[IssuerHarness, CountingProxy]]:
    async with _counting_issuer(with_settings(settings, login_lockout_threshold=5), clock) as counting:
        yield counting


@contextlib.asynccontextmanager
async def _counting_issuer(settings: Settings, clock: FakeClock) -> AsyncIterator[tuple[IssuerHarness, CountingProxy]]:
    proxy = CountingProxy()
    port = await proxy.start()
    url = make_url(settings.database_url).set(host="127.0.0.1", port=port).update_query_dict({"ssl": "disable"})
    proxied = with_settings(settings, database_url=url.render_as_string(hide_password=False))
    # One pooled connection, so the statement cache warmed by the first requests serves all the others.
    engine = create_engine(proxied.database_url, pool_size=1, max_overflow=0)
    app = create_app(proxied, clock=clock, services=Services.build(proxied, clock, engine=engine))
    try:
        async with app.router.lifespan_context(app):
            harness = IssuerHarness(app, clock)
            await harness.services.keys.stop()  # the periodic key reload would add its own statements
            yield harness, proxy
    finally:
        await proxy.close()


async def test_refresh_is_one_round_trip_and_signs_without_parsing_keys(
    counted: tuple[IssuerHarness, CountingProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, proxy = counted
    async with harness.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        for _ in range(2):  # the first use of the statement on the connection prepares it
            response = await refresh_body(client, token)
            assert response.status_code == 200, response.text
            token = response.json()["refresh_token"]

        parsed: list[object] = []
        original_import = keys_module.RSAKey.import_key

        def counting_import(*args: object, **kwargs: object) -> object:
            parsed.append(args)
            return original_import(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(keys_module.RSAKey, "import_key", counting_import)
        monkeypatch.setattr(keys_module, "decrypt_private_key", lambda *a: parsed.append(a))

        before = proxy.round_trips
        for _ in range(10):
            response = await refresh_body(client, token)
            assert response.status_code == 200, response.text
            token = response.json()["refresh_token"]
        assert proxy.round_trips - before == 10
    assert parsed == [], "a private key was decrypted or parsed on the request path"


async def test_me_is_one_round_trip(counted: tuple[IssuerHarness, CountingProxy]) -> None:
    harness, proxy = counted
    async with harness.client() as client:
        await register(client)
        access = (await login(client))["access_token"]
        assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200
        before = proxy.round_trips
        for _ in range(10):
            assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200
        assert proxy.round_trips - before == 10


async def test_login_is_two_statements_without_a_transaction(
    counted_with_lockout: tuple[IssuerHarness, CountingProxy],
) -> None:
    """Count the attempt and read the account; then start the family and clear the count: a round trip each."""
    harness, proxy = counted_with_lockout
    async with harness.client() as client:
        await register(client)
        for _ in range(2):  # the first use of each statement on the connection prepares it
            await login(client)
        before, simple = proxy.round_trips, proxy.sent["Q"]
        for _ in range(5):
            await login(client)
        assert proxy.round_trips - before == 5 * 2
        wrong = await client.post("/auth/login", json={"email": "alice@example.com", "password": "not the password"})
        assert wrong.status_code == 401
        assert proxy.round_trips - before == 5 * 2 + 1  # the attempt with the account; nothing is cleared
        assert proxy.sent["Q"] == simple, "a BEGIN/COMMIT (simple-protocol query) on the login path"


async def test_login_without_the_lock_out_is_two_statements(
    counted: tuple[IssuerHarness, CountingProxy],
) -> None:
    """With the lock-out off nothing is counted or cleared: the account, then the family."""
    harness, proxy = counted
    assert not harness.services.lockout.policy.enabled
    async with harness.client() as client:
        await register(client)
        for _ in range(2):
            await login(client)
        before = proxy.round_trips
        for _ in range(5):
            await login(client)
        assert proxy.round_trips - before == 5 * 2
        unknown = await client.post("/auth/login", json={"email": "nobody@example.com", "password": "whatever1"})
        assert unknown.status_code == 401
        assert proxy.round_trips - before == 5 * 2 + 1


async def test_the_shared_ip_limit_adds_one_statement_to_a_login(
    settings: Settings, clock: FakeClock, pg_url: str
) -> None:
    """With RATE_LIMIT_PER_IP on, the login's bucket is one more statement, still without a transaction."""
    limited = with_settings(settings, login_lockout_threshold=5, rate_limit_per_ip=1000)
    async with _counting_issuer(limited, clock) as (harness, proxy), harness.client() as client:
        await register(client)
        for _ in range(2):
            await login(client)
        before, simple = proxy.round_trips, proxy.sent["Q"]
        for _ in range(5):
            await login(client)
        assert proxy.round_trips - before == 5 * 3
        assert proxy.sent["Q"] == simple, "a BEGIN/COMMIT (simple-protocol query) on the login path"


async def test_the_counter_sees_transactions(counted: tuple[IssuerHarness, CountingProxy]) -> None:
    """Control: a statement in an explicit transaction is counted as its three round trips."""
    harness, proxy = counted
    from sqlalchemy import text

    async with harness.engine.begin() as conn:
        await conn.execute(text("SELECT 1"))
    before = proxy.round_trips
    async with harness.engine.begin() as conn:
        await conn.execute(text("SELECT 1"))
    assert proxy.round_trips - before == 3  # BEGIN, the statement, COMMIT
