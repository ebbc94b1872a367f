"""The pool behind a transaction pooler: detection, what a statement costs there, and a misconfiguration
reported as one (issue 18, item 1).

``solo_url`` reaches the test database through PgBouncer over one server connection that every client
connection shares, so two client connections with asyncpg's statement cache on are certain to meet on it:
the second one's ``__asyncpg_stmt_1__`` already exists there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from issuer.settings import Settings
from issuer.storage import users
from issuer.storage.database import PING, Database, PoolerMisconfigured, Statement
from issuer.storage.migrations import upgrade
from tests.conftest import run_blocking
from tests.pooler.pgbouncer import PgBouncer
from tests.storage.conftest import pool
from tests.support.clock import FakeClock
from tests.support.faults import PostgresProxy, postgres_proxy
from tests.support.http import bearer, login, refresh_body, register
from tests.support.issuer import running_issuer, with_settings
from tests.support.keys import Cli, assert_refused

CACHE_ON = "statement_cache_size=100"
# Statements with different texts, so a mix-up of names would pair a name with the wrong statement.
STATEMENTS = (
    PING,
    Statement("SELECT 2 AS two", retry_safe=True),
    Statement("SELECT count(*) AS n FROM users", retry_safe=True),
    Statement("SELECT $1::text AS echo", retry_safe=True),
)


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


async def run_all(db: Database, rounds: int) -> None:
    for index in range(rounds):
        statement = STATEMENTS[index % len(STATEMENTS)]
        args = ("x",) if "$1" in statement.sql else ()
        await db.fetch(statement, *args)


async def test_the_pool_finds_a_pooler_and_nothing_else(pg_url: str, pooled_url: str) -> None:
    """Through PgBouncer the server process differs from the one the connection was told at start-up; directly,
    or through a TCP proxy (which forwards the server's own start-up answer), it is the same."""
    async with postgres_proxy() as proxy:
        for url, expected in ((pooled_url, True), (pg_url, False), (proxy.url(pg_url), False)):
            async with pool(url, 2) as db:
                assert db.behind_pooler is None  # nothing is opened before a statement needs it
                await db.ping()
                assert db.behind_pooler is expected, url


async def test_many_client_connections_share_one_server_connection(solo_url: str) -> None:
    """Two pools of 4 over PgBouncer's single server connection, statements of four texts interleaved."""
    async with pool(solo_url, 4) as first, pool(solo_url, 4) as second:
        await asyncio.gather(*(run_all(db, 12) for db in (first, second) for _ in range(4)))
        assert first.behind_pooler
        assert second.behind_pooler
        async with first.transaction() as transaction:  # a transaction holds its server connection throughout
            for statement in STATEMENTS[:3]:
                await transaction.fetch(statement)


async def test_statement_cache_size_in_the_url_is_a_number_and_decides(solo_url: str) -> None:
    """``?statement_cache_size=0`` crashed start-up with a TypeError (issue 18); now it is converted, and it
    overrides the detection, which then does not run."""
    async with pool(with_query(solo_url, "statement_cache_size=0"), 2) as first, pool(solo_url, 2) as second:
        await asyncio.gather(run_all(first, 8), run_all(second, 8))
        assert first.behind_pooler is None


def as_a_new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg numbers prepared statements per process (``__asyncpg_stmt_1__``, ...), so names collide between
    replicas, not between the pools of one process: restart the numbering as another replica's would start."""
    monkeypatch.setattr(asyncpg.connection, "_uid", 0)


@contextlib.asynccontextmanager
async def primed(solo_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Database]:
    """Another replica, its statement cache on, that has prepared ``__asyncpg_stmt_1__`` on the shared server
    connection; the numbering is then restarted for this one."""
    conn = await asyncpg.connect(solo_url, statement_cache_size=0)
    try:
        await conn.execute("DEALLOCATE ALL")  # what earlier tests left on the shared server connection
    finally:
        await conn.close()
    as_a_new_process(monkeypatch)
    async with pool(with_query(solo_url, CACHE_ON), 1) as db:
        await db.ping()
        as_a_new_process(monkeypatch)
        yield db


async def test_a_statement_cache_behind_a_transaction_pooler_is_named_as_the_cause(
    solo_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with primed(solo_url, monkeypatch), pool(with_query(solo_url, CACHE_ON), 1) as second:
        with pytest.raises(PoolerMisconfigured) as raised:
            await second.ping()
        message = str(raised.value)
        assert message.startswith("DATABASE_URL: a connection pooler"), message
        assert "statement_cache_size" in message
        assert 'DuplicatePreparedStatementError: prepared statement "__asyncpg_stmt_1__" already exists' in message
        assert "\n" not in message
        assert second.open_connections() == 0  # its cache no longer matches the server: the connection is gone


async def test_a_command_reports_the_misconfiguration_in_one_line(
    settings: Settings,
    clock: FakeClock,
    solo_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not "cannot reach the database": the line names the pooler, the setting and the driver's error."""
    misconfigured = with_settings(settings, database_url=with_query(solo_url, CACHE_ON))
    cli = Cli(misconfigured, clock, monkeypatch, capsys)
    async with primed(solo_url, monkeypatch):
        result = await cli("keys", "list")
    line = assert_refused(result, "DATABASE_URL", "pooler", "statement_cache_size", "already exists")
    assert "cannot reach" not in line


async def test_query_parameters_the_driver_does_not_take_stop_the_command_in_one_line(
    settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for query, needles in (
        ("statement_cache_size=lots", ("DATABASE_URL", "statement_cache_size", "whole number")),
        ("pool_mode=transaction", ("DATABASE_URL", "unknown query parameter 'pool_mode'")),
    ):
        broken = with_settings(settings, database_url=with_query(settings.database_url, query))
        result = await Cli(broken, clock, monkeypatch, capsys)("keys", "list")
        assert_refused(result, *needles)


# ---------------------------------------------------------------- the cost


@contextlib.asynccontextmanager
async def counted_through(pgbouncer: PgBouncer) -> AsyncIterator[PostgresProxy]:
    """A counting proxy in front of PgBouncer (not of PostgreSQL)."""
    proxy = PostgresProxy(pgbouncer.host, pgbouncer.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def waits(proxy: PostgresProxy, before: Counter[str]) -> dict[str, int]:
    """Exchanges the client waited for since ``before``: a Sync ends a batch, and so does a Flush (asyncpg sends
    one after Parse and Describe and waits for the statement's description before it binds)."""
    return {kind: proxy.sent[kind] - before[kind] for kind in ("S", "H", "Q")}


async def test_each_statement_costs_two_round_trips_through_a_pooler(
    settings: Settings, clock: FakeClock, pgbouncer: PgBouncer, pooled_url: str, pg_url: str
) -> None:
    """Directly a warm refresh and a Bearer call are one round trip each (tests/storage/test_round_trips.py).
    Through a pooler asyncpg describes each statement (Parse, Describe, Flush) and then parses it again with its
    Bind (Parse, Bind, Execute, Sync): two round trips, and never a BEGIN."""
    async with counted_through(pgbouncer) as proxy:
        # LISTEN straight to PostgreSQL, as the README says to: not through the pooler, nor counted here.
        proxied = with_settings(
            settings, database_url=proxy.url(pooled_url), database_listen_url=pg_url, db_pool_size=1
        )
        async with running_issuer(proxied, clock) as harness, harness.client() as client:
            await harness.services.keys.stop()  # the periodic key reload has statements of its own
            await harness.services.revoked_sessions.stop()  # and so would the reading of revocation events
            await register(client)
            tokens = await login(client)
            refresh = tokens["refresh_token"]

            before = Counter(proxy.sent)
            response = await refresh_body(client, refresh)
            assert response.status_code == 200, response.text
            assert waits(proxy, before) == {"S": 1, "H": 1, "Q": 0}

            before = Counter(proxy.sent)
            assert (await client.get("/auth/me", headers=bearer(response.json()["access_token"]))).status_code == 200
            assert waits(proxy, before) == {"S": 1, "H": 1, "Q": 0}

            before = Counter(proxy.sent)
            mark = proxy.mark()
            await users.by_ids(harness.services.db, ["nobody"])
            assert waits(proxy, before) == {"S": 1, "H": 1, "Q": 0}, [str(t) for t in proxy.since(mark)]


async def test_migrations_prepare_no_named_statement(solo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``issuer migrate`` is another process whose statement names would start at 1 too: Alembic's connection
    has both statement caches off (migrations/env.py), and its URL options are typed as the pool's are."""
    async with primed(solo_url, monkeypatch):
        url = with_query(solo_url, "statement_cache_size=0&application_name=issuer-migrate")
        await asyncio.to_thread(run_blocking, lambda: upgrade(url))
        await asyncio.to_thread(run_blocking, lambda: upgrade(solo_url))
