"""issuer.storage.database.Database on PostgreSQL: the lazily opened pool, transactions (commit, rollback,
a constraint violation or a cancellation inside one), how errors reported by the server are translated,
and a closed pool. (A killed backend or a broken network: tests/storage/test_faults.py.)

"The same connection" is checked by the server process behind it (``pg_backend_pid()``) on a pool of one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.settings import ConfigError, Settings
from issuer.storage import users
from issuer.storage.database import (
    ConstraintViolation,
    Database,
    DatabaseUnavailable,
    Statement,
    connect_arguments,
    rows_affected,
)
from issuer.storage.schema import users as users_table
from issuer.storage.users import DuplicateEmail
from tests.storage.conftest import NOW, a_user, backend_pid, new_user, pool, wait_for_backends
from tests.support.families import row_count
from tests.support.faults import postgres_proxy

DIVIDE_BY_ZERO = Statement("SELECT 1 / 0 AS never", retry_safe=True)


class Boom(Exception):
    pass


# ---------------------------------------------------------------- the pool


async def test_nothing_is_opened_until_a_statement_needs_it(pg_url: str) -> None:
    async with pool(pg_url, 2) as db:
        assert db.open_connections() == 0
        await db.ping()
        assert db.open_connections() == 1
        assert await db.has_table("users")
        assert await db.has_table("signing_keys")
        assert not await db.has_table("no_such_table")
    assert db.open_connections() == 0


WHOLE = {"host": "db.internal", "port": 5432, "user": "issuer", "password": "pw", "database": "issuer"}


@pytest.mark.parametrize(
    ("url", "arguments"),
    [
        ("postgresql://issuer:pw@db.internal:5432/issuer", WHOLE),
        ("postgres://issuer:pw@db.internal:5432/issuer", WHOLE),
        ("postgresql+asyncpg://issuer:pw@db.internal:5432/issuer", WHOLE),
        # asyncpg's own DSN parser read these passwords as part of the port or the query, and failed quoting
        # them; the URL is parsed as SQLAlchemy and Alembic parse it.
        ("postgresql://issuer:s3cr/et@db.internal:5432/issuer", {**WHOLE, "password": "s3cr/et"}),
        ("postgresql://issuer:s3cr#et@db.internal:5432/issuer", {**WHOLE, "password": "s3cr#et"}),
        ("postgresql://issuer:s3cr?et@db.internal:5432/issuer", {**WHOLE, "password": "s3cr?et"}),
        ("postgresql://issuer:p%40ss%2Fw@db.internal:5432/issuer", {**WHOLE, "password": "p@ss/w"}),
        # asyncpg passed ?ssl=require to the server as a setting, and every connection failed.
        ("postgresql://issuer:pw@db.internal:5432/issuer?ssl=require", {**WHOLE, "ssl": "require"}),
        ("postgresql:///issuer?host=/run/postgresql", {"database": "issuer", "host": "/run/postgresql"}),
    ],
)
def test_connect_arguments_parse_the_url_as_alembic_does(url: str, arguments: dict[str, object]) -> None:
    assert connect_arguments(url) == arguments


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+asyncpg"])
async def test_a_database_url_in_each_scheme_reaches_the_server(pg_url: str, scheme: str) -> None:
    assert pg_url.startswith("postgresql://")
    async with pool(f"{scheme}://{pg_url.partition('://')[2]}", 1) as db:
        await db.ping()
        assert await db.has_table("users")


@pytest.mark.parametrize(("tag", "rows"), [("UPDATE 2", 2), ("INSERT 0 1", 1), ("DELETE 0", 0), ("SELECT 12", 12)])
def test_rows_affected_reads_the_command_tag(tag: str, rows: int) -> None:
    assert rows_affected(tag) == rows


async def test_execute_returns_the_command_tag(db: Database) -> None:
    first, second = await new_user(db), await new_user(db)
    tag = await db.execute(
        Statement("UPDATE users SET role = 'admin' WHERE id = ANY($1::text[])"), [first.id, second.id]
    )
    assert tag == "UPDATE 2"
    assert rows_affected(await db.execute(users.DELETE, "no-such-id")) == 0


# ---------------------------------------------------------------- transactions


async def test_a_transaction_commits_when_its_block_ends(db: Database) -> None:
    """Its statements share one connection and see each other's writes; other connections see nothing until
    the commit."""
    first, second = a_user(), a_user()
    async with db.transaction() as transaction:
        await users.insert(transaction, first, NOW)
        await users.insert(transaction, second, NOW)
        assert await users.by_ids(transaction, [first.id, second.id]) == {first.id: first, second.id: second}
        assert await users.by_ids(db, [first.id, second.id]) == {}  # the pool's other connection
    assert await users.by_ids(db, [first.id, second.id]) == {first.id: first, second.id: second}


async def test_a_transaction_rolls_back_when_its_block_raises(solo: Database, engine: AsyncEngine) -> None:
    pid = await backend_pid(solo)

    async def insert_then_fail() -> None:
        async with solo.transaction() as transaction:
            await users.insert(transaction, a_user(), NOW)
            raise Boom

    with pytest.raises(Boom):
        await insert_then_fail()
    assert await row_count(engine, users_table) == 0
    assert await backend_pid(solo) == pid
    await new_user(solo)
    assert await row_count(engine, users_table) == 1


async def test_a_constraint_violation_rolls_the_transaction_back_and_keeps_the_connection(
    solo: Database, engine: AsyncEngine
) -> None:
    taken = await new_user(solo)
    pid = await backend_pid(solo)
    written = a_user()

    async def insert_both() -> None:
        async with solo.transaction() as transaction:
            await users.insert(transaction, written, NOW)
            await users.insert(transaction, a_user(taken.email), NOW)

    with pytest.raises(DuplicateEmail):
        await insert_both()
    assert await users.by_ids(solo, [written.id]) == {}
    assert await row_count(engine, users_table) == 1
    # Back in the pool, healthy and out of the failed transaction.
    assert solo.open_connections() == 1
    assert await backend_pid(solo) == pid
    async with solo.transaction() as transaction:
        await users.insert(transaction, written, NOW)
    assert await users.by_ids(solo, [written.id]) == {written.id: written}


async def test_a_constraint_violation_names_the_constraint(solo: Database) -> None:
    taken = await new_user(solo)
    pid = await backend_pid(solo)
    twin = a_user(taken.email)
    with pytest.raises(ConstraintViolation) as violation:
        await solo.execute(users.INSERT, twin.id, twin.email, twin.password_hash, twin.role, 0, NOW)
    assert violation.value.constraint == "uq_users_email"
    assert await backend_pid(solo) == pid


async def test_a_cancelled_transaction_rolls_back_and_frees_its_connection(solo: Database, engine: AsyncEngine) -> None:
    """The client went away mid-transaction (the task is cancelled): nothing is written, and the pool's only
    connection is free for the next caller."""
    entered = asyncio.Event()

    async def abandoned() -> None:
        async with solo.transaction() as transaction:
            await users.insert(transaction, a_user(), NOW)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(abandoned())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await row_count(engine, users_table) == 0
    async with asyncio.timeout(3):  # well under the pool's acquire timeout: the connection was released
        await new_user(solo)
    assert solo.open_connections() == 1


# ---------------------------------------------------------------- errors from the server


async def test_a_failing_statement_is_database_unavailable_and_keeps_the_connection(solo: Database) -> None:
    pid = await backend_pid(solo)
    with pytest.raises(DatabaseUnavailable) as failed:
        await solo.fetchrow(DIVIDE_BY_ZERO)
    assert isinstance(failed.value.__cause__, asyncpg.DivisionByZeroError)
    assert solo.open_connections() == 1
    assert await backend_pid(solo) == pid


async def test_a_failing_statement_in_a_transaction_rolls_it_back(solo: Database, engine: AsyncEngine) -> None:
    pid = await backend_pid(solo)

    async def insert_then_divide_by_zero() -> None:
        async with solo.transaction() as transaction:
            await users.insert(transaction, a_user(), NOW)
            await transaction.fetch(DIVIDE_BY_ZERO)

    with pytest.raises(DatabaseUnavailable):
        await insert_then_divide_by_zero()
    assert await row_count(engine, users_table) == 0
    assert await backend_pid(solo) == pid
    await new_user(solo)


@pytest.fixture
async def attempts(engine: AsyncEngine) -> AsyncIterator[str]:
    """A sequence that counts how often the server ran a statement (nextval is never rolled back)."""
    name = "test_storage_attempts"
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE SEQUENCE {name}"))
    try:
        yield name
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP SEQUENCE {name}"))


async def test_a_statement_the_server_refused_is_not_sent_again(
    db: Database, engine: AsyncEngine, attempts: str
) -> None:
    """Only a lost connection makes a read worth retrying: a statement the server ran and failed would fail
    the same way again."""
    with pytest.raises(DatabaseUnavailable):
        await db.fetchrow(Statement(f"SELECT nextval('{attempts}') / 0 AS never", retry_safe=True))
    async with engine.connect() as conn:
        assert (await conn.execute(text(f"SELECT last_value, is_called FROM {attempts}"))).one() == (1, True)


# ---------------------------------------------------------------- a closed pool


async def test_a_closed_database_refuses_every_statement(pg_url: str) -> None:
    for opened in (True, False):
        db = Database(pg_url, size=2)
        if opened:
            await db.ping()
        await db.close()
        assert db.open_connections() == 0
        with pytest.raises(DatabaseUnavailable):
            await db.ping()
        with pytest.raises(DatabaseUnavailable):
            await db.fetch(DIVIDE_BY_ZERO)
        with pytest.raises(DatabaseUnavailable):
            await db.execute(users.DELETE, "no-such-id")
        with pytest.raises(DatabaseUnavailable):
            async with db.transaction():
                pytest.fail("a transaction began on a closed pool")
        assert db.open_connections() == 0
        await db.close()  # closing twice is harmless


async def test_closing_while_a_statement_runs_ends_promptly(pg_url: str, engine: AsyncEngine) -> None:
    """Shutting down with a request in flight: ``close()`` returns once that statement is over (finished, or
    cut off with DatabaseUnavailable); it must not wait forever for a connection that is never handed back."""
    db = Database(pg_url, size=2)
    running = asyncio.create_task(db.fetch(Statement("SELECT pg_sleep(0.3) AS slept")))
    await wait_for_backends(engine, "state = 'active' AND query LIKE 'SELECT pg_sleep(0.3)%'")
    async with asyncio.timeout(10):
        await db.close()
        with contextlib.suppress(DatabaseUnavailable):
            await running
    assert db.open_connections() == 0


async def test_a_transaction_cancelled_during_its_begin_gives_its_connection_back(pg_url: str) -> None:
    """A request cancelled (client gone, shutdown) while BEGIN is on the wire: its connection must return to
    the pool, or asyncpg's close waits for it forever and the process cannot shut down."""
    async with postgres_proxy() as proxy:
        db = Database(proxy.url(pg_url), size=1)
        try:
            await db.ping()  # the pool's one connection, opened while the link flows

            async def work() -> None:
                async with db.transaction() as tx:
                    await tx.fetch(DIVIDE_BY_ZERO)

            proxy.stall()  # BEGIN goes out, and its answer is held
            task = asyncio.create_task(work())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            proxy.restore()
            await db.ping()  # a leaked connection: the pool of one stays empty, DatabaseUnavailable
        finally:
            with contextlib.suppress(TimeoutError):  # a leak would hold close() forever: fail, don't hang
                await asyncio.wait_for(db.close(), timeout=10)
        assert db.open_connections() == 0


# ---------------------------------------------------------------- DATABASE_URL query parameters


@pytest.mark.parametrize(
    ("query", "options"),
    [
        # The crash: asyncpg got the text "0" and compared it with an int on the first connection.
        ("statement_cache_size=0", {"statement_cache_size": 0}),
        ("command_timeout=2.5&timeout=3", {"command_timeout": 2.5, "timeout": 3.0}),
        (
            "max_cached_statement_lifetime=60&max_cacheable_statement_size=4096",
            {"max_cached_statement_lifetime": 60, "max_cacheable_statement_size": 4096},
        ),
        ("sslmode=verify-full", {"ssl": "verify-full"}),
        ("direct_tls=true&target_session_attrs=read-write", {"direct_tls": True, "target_session_attrs": "read-write"}),
        ("application_name=issuer-a", {"server_settings": {"application_name": "issuer-a"}}),
        ("port=6432&host=pgbouncer.internal", {"port": 6432, "host": "pgbouncer.internal"}),
    ],
)
def test_query_parameters_become_typed_driver_arguments(query: str, options: dict[str, object]) -> None:
    assert connect_arguments(f"postgresql://issuer@db.internal/issuer?{query}") == {
        "host": "db.internal",
        "user": "issuer",
        "database": "issuer",
        **options,
    }


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("statement_cache_size=-1", "'statement_cache_size': must be a whole number"),
        ("statement_cache_size=hunter2-secret", "'statement_cache_size': must be a whole number"),
        ("command_timeout=0", "'command_timeout': must be a number of seconds greater than 0"),
        ("command_timeout=nan", "'command_timeout': must be a number of seconds greater than 0"),
        ("port=99999", "'port': must be a port number"),
        ("ssl=hunter2-secret", "'ssl': must be one of disable"),
        ("direct_tls=maybe", "'direct_tls': must be true or false"),
        ("pool_mode=transaction", "unknown query parameter 'pool_mode'"),
        ("sslrootcert=/etc/ca.pem", "unknown query parameter 'sslrootcert'"),
    ],
)
def test_query_parameters_the_driver_cannot_use_stop_start_up_in_one_line(query: str, needle: str) -> None:
    """Refused by the settings with one line naming DATABASE_URL and the parameter, never echoing a value."""
    url = f"postgresql://admin:hunter2-secret@db.internal.example/orders_prod?{query}"
    with pytest.raises(ConfigError) as raised:
        Settings.from_environ({"DATABASE_URL": url, "ISSUER_KEK": "A" * 43})
    message = str(raised.value)
    assert message.startswith("DATABASE_URL: "), message
    assert needle in message, message
    assert "\n" not in message
    for secret in ("hunter2-secret", "db.internal.example", "orders_prod", "/etc/ca.pem"):
        assert secret not in message, message


async def test_a_url_with_driver_parameters_reaches_the_server(pg_url: str) -> None:
    url = f"{pg_url}?statement_cache_size=0&command_timeout=5&application_name=issuer-test"
    async with pool(url, 1) as db:
        row = await db.fetchrow(Statement("SELECT current_setting('application_name') AS name"))
        assert row is not None
        assert row["name"] == "issuer-test"
        assert db.behind_pooler is None  # the URL decided: no detection


async def test_a_direct_connection_keeps_its_statement_cache(solo: Database) -> None:
    """Directly (and through a TCP proxy: tests/pooler/test_pool.py) nothing is given up: the pool finds no
    pooler, and a statement run twice is prepared once."""
    await solo.ping()
    assert solo.behind_pooler is False
    prepared = Statement("SELECT pg_prepared_statements.name FROM pg_prepared_statements", retry_safe=True)
    await solo.fetch(prepared)
    names = [row["name"] for row in await solo.fetch(prepared)]
    assert any(name.startswith("__asyncpg_stmt_") for name in names), names
