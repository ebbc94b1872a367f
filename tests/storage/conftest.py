"""What the storage tests share: a ``Database`` on the test database, an independent view of the tables,
and builders for users and sessions.

The storage functions run on ``db`` (the production pool). What a test checks in the tables it reads
through ``engine`` (SQLAlchemy Core on :mod:`issuer.storage.schema`), never through the statements under
test; states that no production statement can create (a token that outlives its family, extra tokens with
chosen expiries) are written through ``engine`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import ColumnElement, Table, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from issuer.storage import sessions, users
from issuer.storage.database import Database, Executor, Row, Statement, sqlalchemy_url
from issuer.storage.schema import families, metadata, refresh_tokens
from issuer.storage.sessions import Family
from issuer.storage.users import User
from tests.support.families import sha256

# Microseconds and a date far from the real clock: a value that is truncated or shifted shows.
NOW = datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
SESSION = 30 * 24 * HOUR

T = TypeVar("T")

# The server process behind a connection: the same pid before and after means the same pooled connection.
BACKEND_PID = Statement("SELECT pg_backend_pid() AS pid")


@contextlib.asynccontextmanager
async def pool(database_url: str, size: int) -> AsyncIterator[Database]:
    """A ``Database`` of up to ``size`` connections, closed after the block."""
    database = Database(database_url, size=size)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Database]:
    async with pool(pg_url, 2) as database:
        yield database


@pytest.fixture
async def solo(pg_url: str) -> AsyncIterator[Database]:
    """A pool of one connection: every statement runs on the same connection, unless one was discarded."""
    async with pool(pg_url, 1) as database:
        yield database


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """The tests' own connection to the tables (no pool: nothing stays open between checks)."""
    url = sqlalchemy_url(pg_url)
    oracle = create_async_engine(url, poolclass=NullPool)
    try:
        yield oracle
    finally:
        await oracle.dispose()


async def backend_pid(db: Executor) -> int:
    row = await db.fetchrow(BACKEND_PID)
    assert row is not None
    return int(row["pid"])


@dataclass
class Recorder:
    """An Executor that passes every statement on to ``db`` and records it: how many statements (round
    trips) a storage function sends."""

    db: Executor
    sent: list[Statement] = field(default_factory=list)

    async def fetch(self, statement: Statement, *args: object) -> list[Row]:
        self.sent.append(statement)
        return await self.db.fetch(statement, *args)

    async def fetchrow(self, statement: Statement, *args: object) -> Row | None:
        self.sent.append(statement)
        return await self.db.fetchrow(statement, *args)

    async def execute(self, statement: Statement, *args: object) -> str:
        self.sent.append(statement)
        return await self.db.execute(statement, *args)


def a_user(email: str | None = None) -> User:
    return User(
        id=str(uuid.uuid4()),
        email=email or f"{uuid.uuid4().hex}@example.com",
        password_hash="$argon2id$not-a-real-hash",
        role="user",
        token_version=0,
    )


async def new_user(db: Executor, email: str | None = None) -> User:
    user = a_user(email)
    await users.insert(db, user, NOW)
    return user


def a_family(user_id: str, *, created: datetime = NOW, ttl: timedelta = SESSION, idle: timedelta = HOUR) -> Family:
    """A session created at ``created``, ending ``ttl`` later, whose first token expires ``idle`` later."""
    return Family(
        id=str(uuid.uuid4()),
        user_id=user_id,
        created_at=created,
        last_used_at=created,
        expires_at=created + ttl,
        idle_expires_at=created + idle,
        user_agent="pytest",
        ip="203.0.113.7",
        revoked_at=None,
        revoked_reason=None,
    )


def a_token() -> str:
    """A refresh token; the database stores ``sha256(token)``."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Session:
    family: Family
    token: str  # the family's first token

    @property
    def token_hash(self) -> bytes:
        return sha256(self.token)


async def new_session(
    db: Executor, user_id: str, *, created: datetime = NOW, ttl: timedelta = SESSION, idle: timedelta = HOUR
) -> Session:
    """A family and its first token, stored by ``sessions.start``."""
    session = Session(a_family(user_id, created=created, ttl=ttl, idle=idle), a_token())
    await sessions.start(db, session.family, session.token_hash)
    return session


async def add_token(
    engine: AsyncEngine,
    family_id: str,
    *,
    expires: datetime = NOW + HOUR,
    issued: datetime = NOW,
    consumed: datetime | None = None,
) -> str:
    """Another token of the family, written straight into the table."""
    token = a_token()
    async with engine.begin() as conn:
        await conn.execute(
            insert(refresh_tokens).values(
                token_hash=sha256(token),
                family_id=family_id,
                user_id=select(families.c.user_id).where(families.c.id == family_id).scalar_subquery(),
                issued_at=issued,
                expires_at=expires,
                consumed_at=consumed,
            )
        )
    return token


async def snapshot(engine: AsyncEngine) -> dict[str, dict[object, tuple[object, ...]]]:
    """Every row of every table, by table name and primary key: compare two to see what a call wrote."""
    tables: dict[str, dict[object, tuple[object, ...]]] = {}
    async with engine.connect() as conn:
        for table in metadata.sorted_tables:
            rows = (await conn.execute(select(table))).all()
            keys = table.primary_key.columns.values()
            if keys:
                tables[table.name] = {row._mapping[keys[0].name]: tuple(row) for row in rows}
            else:  # the refresh trail: rows have no identity but their content
                tables[table.name] = {tuple(row): tuple(row) for row in rows}
    return tables


@contextlib.asynccontextmanager
async def row_locked(engine: AsyncEngine, table: Table, where: ColumnElement[bool]) -> AsyncIterator[None]:
    """Hold the row's lock (FOR UPDATE, changing nothing) for the block: statements started inside queue behind
    it and all run once it ends, so they overlap for certain."""
    async with engine.begin() as conn:
        assert (await conn.execute(select(table).where(where).with_for_update())).one_or_none() is not None
        yield


async def all_at_once(
    engine: AsyncEngine,
    table: Table,
    where: ColumnElement[bool],
    call: Callable[[], Coroutine[Any, Any, T]],
    times: int,
) -> list[T]:
    """``call()`` ``times`` times concurrently, on one row: all are started behind the row's lock and released
    together, so their statements overlap for certain. Every call has ended when this returns, however the
    test goes (none is left running against a pool that closes)."""
    async with asyncio.TaskGroup() as group, row_locked(engine, table, where):
        tasks = [group.create_task(call()) for _ in range(times)]
        await wait_until_blocked(engine, times)
    return [task.result() for task in tasks]


async def wait_for_backends(engine: AsyncEngine, condition: str, backends: int = 1) -> None:
    """Until ``backends`` server processes of this database match ``condition`` (SQL on pg_stat_activity)."""
    query = text(f"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND {condition}")
    for _ in range(500):
        async with engine.connect() as conn:
            if (await conn.execute(query)).scalar_one() >= backends:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {backends} backend(s) with {condition}")


async def wait_until_blocked(engine: AsyncEngine, backends: int = 1) -> None:
    """Until ``backends`` statements wait for a lock (queued behind a transaction the test holds open)."""
    await wait_for_backends(engine, "wait_event_type = 'Lock'", backends)
