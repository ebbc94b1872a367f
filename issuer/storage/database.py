"""The one connection pool of an issuer process, and how a statement reaches PostgreSQL through it.

Every statement the issuer runs is a :class:`Statement` constant in one module of this package, written
once as PostgreSQL text with ``$n`` parameters, and sent as a prepared statement that asyncpg caches per
connection. A statement run on :class:`Database` runs alone, in autocommit, in one round trip: each one is
atomic by itself, which is why the hottest operations (a refresh, a login's two steps) are single
statements. Operations that need several statements to agree use :meth:`Database.transaction`.

Failures are translated here, once, for every caller:

- a broken connection (the server closed it, a timeout, a network error) is discarded, and the request
  gets :class:`DatabaseUnavailable` (503 with Retry-After), after one retry on a fresh connection when the
  statement is safe to send twice (:attr:`Statement.retry_safe`) or the driver sent nothing;
- a constraint violation becomes :class:`ConstraintViolation`, which the storage module turns into its
  domain error; the connection is healthy and goes back to the pool;
- any other error reported by the server fails the request with :class:`DatabaseUnavailable` and keeps the
  connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url

# Bounded waits: a dead database must produce a 503 within seconds, never a hung request.
CONNECT_TIMEOUT = 5.0  # opening a connection
COMMAND_TIMEOUT = 10.0  # one statement (asyncpg then cancels it in the server)
POOL_TIMEOUT = 5.0  # waiting for a free pooled connection

Row: TypeAlias = asyncpg.Record
T = TypeVar("T")
if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.pool.PoolConnectionProxy[Row]


@dataclass(frozen=True)
class Statement:
    """One SQL statement. ``retry_safe``: it may be sent again after its connection died under it (a read;
    never a write, which may have committed before the connection broke)."""

    sql: str
    retry_safe: bool = False


PING = Statement("SELECT 1", retry_safe=True)
TABLE_EXISTS = Statement("SELECT to_regclass($1) IS NOT NULL AS present", retry_safe=True)


class DatabaseUnavailable(Exception):
    """The database could not run a statement; answered as a 503 the client may retry."""


class ConstraintViolation(Exception):
    """A statement broke a constraint (unique, foreign key, ...); ``constraint`` names it."""

    def __init__(self, constraint: str | None) -> None:
        super().__init__(constraint or "constraint violation")
        self.constraint = constraint


class Executor(Protocol):
    """What a storage function runs its statements on: the pool (autocommit) or one transaction."""

    async def fetch(self, statement: Statement, *args: object) -> list[Row]: ...

    async def fetchrow(self, statement: Statement, *args: object) -> Row | None: ...

    async def execute(self, statement: Statement, *args: object) -> str: ...


def sqlalchemy_url(database_url: str) -> URL:
    """``DATABASE_URL`` parsed as SQLAlchemy (and so Alembic) parses it, with the asyncpg driver."""
    return make_url(database_url).set(drivername="postgresql+asyncpg")


def connect_arguments(database_url: str) -> dict[str, Any]:
    """asyncpg's connect arguments for ``DATABASE_URL``, from the same parse Alembic uses.

    The URL is not handed to asyncpg as a string: its own DSN parser reads a password holding ``/``, ``#``
    or ``?`` as part of the port or the query (and failed quoting it), and passes ``?ssl=require`` to the
    server as a setting instead of turning TLS on.
    """
    url = sqlalchemy_url(database_url)
    arguments: dict[str, Any] = url.translate_connect_args(username="user", database="database")
    # Query options (host=/run/postgresql, ssl=require, ...) are asyncpg's own keyword arguments, as with
    # SQLAlchemy's asyncpg dialect; a repeated option keeps its last value.
    arguments.update({name: value if isinstance(value, str) else value[-1] for name, value in url.query.items()})
    return arguments


class Database:
    """A lazily opened asyncpg pool of up to ``size`` connections.

    No connection is opened at start-up, so a database that is down at boot is a 503 per request, not a
    crash. Released connections are not reset with a round trip: nothing here leaves session state behind
    (no SET, LISTEN or advisory locks), and a transaction left open by a failure is rolled back on release.
    """

    def __init__(self, database_url: str, size: int) -> None:
        self._connect = connect_arguments(database_url)
        self._size = size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    async def fetch(self, statement: Statement, *args: object) -> list[Row]:
        """Run one statement in autocommit, in one round trip, and return its rows."""
        _refuse_naive(args)
        return await self._run(statement, lambda conn: conn.fetch(statement.sql, *args))

    async def fetchrow(self, statement: Statement, *args: object) -> Row | None:
        _refuse_naive(args)
        return await self._run(statement, lambda conn: conn.fetchrow(statement.sql, *args))

    async def execute(self, statement: Statement, *args: object) -> str:
        """Run one statement; returns its command tag (``"DELETE 3"``)."""
        _refuse_naive(args)
        return await self._run(statement, lambda conn: conn.execute(statement.sql, *args))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """One connection in a transaction: committed when the block ends, rolled back if it raises."""
        conn, transaction = await self._begin()
        try:
            try:
                yield Transaction(conn)
            except BaseException:
                if not conn.is_closed():
                    with contextlib.suppress(*_DRIVER_ERRORS):
                        await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except _DRIVER_ERRORS as exc:
                raise _translated(conn, exc) from exc
        finally:
            await self._release(conn)

    async def ping(self) -> None:
        """One round trip to the server (readiness)."""
        await self.fetch(PING)

    async def has_table(self, name: str) -> bool:
        row = await self.fetchrow(TABLE_EXISTS, name)
        return row is not None and bool(row["present"])

    def open_connections(self) -> int:
        """Connections open now, idle or in use; one the server has closed no longer counts once its close
        has arrived (asyncpg's ``Pool.get_size``)."""
        return self._pool.get_size() if self._pool is not None else 0

    async def close(self) -> None:
        """Close the pool once the statements running now are done (asyncpg waits for their connections)."""
        self._closed = True
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _run(self, statement: Statement, call: Callable[[Connection], Awaitable[T]]) -> T:
        """``call`` on a pooled connection, retried once on a fresh one when that is safe.

        A connection the server dropped while it sat in the pool (a restart, a failover, a killed backend
        whose close had not arrived when it was taken) fails on first use. A write that may have reached the
        server is never replayed here: the client gets a 503 and retries itself (for a refresh,
        REFRESH_REUSE_GRACE makes that retry return the same successor if the first attempt did commit).
        """
        try:
            return await self._run_once(call)
        except DatabaseUnavailable as exc:
            cause = exc.__cause__
            unsent = isinstance(cause, asyncpg.InternalClientError)
            if not (unsent or (statement.retry_safe and isinstance(cause, _CONNECTION_LOST))):
                raise
        return await self._run_once(call)

    async def _run_once(self, call: Callable[[Connection], Awaitable[T]]) -> T:
        conn = await self._acquire()
        try:
            return await call(conn)
        except _DRIVER_ERRORS as exc:
            raise _translated(conn, exc) from exc
        # A cancelled task (client gone, server shutting down) needs nothing here: asyncpg sends the server
        # a cancel request for the running statement, which then rolls back unless it had already finished
        # (then the rotation happened and its response is lost, which REFRESH_REUSE_GRACE covers), and the
        # connection's next user waits until that cancel has completed.
        finally:
            await self._release(conn)

    async def _begin(self) -> tuple[Connection, asyncpg.transaction.Transaction]:
        """A connection with its transaction started. BEGIN changes nothing, so when the connection turns out
        to be dead it is sent once more on a fresh one."""
        for attempt in (1, 2):
            conn = await self._acquire()
            transaction = conn.transaction()
            try:
                await transaction.start()
            except _DRIVER_ERRORS as exc:
                error = _translated(conn, exc)
                await self._release(conn)
                if attempt == 2 or not isinstance(exc, (*_CONNECTION_LOST, asyncpg.InternalClientError)):
                    raise error from exc
                continue
            except BaseException:  # cancelled while BEGIN was in flight: the connection must go back
                await self._release(conn)
                raise
            return conn, transaction
        raise AssertionError("unreachable")

    async def _acquire(self) -> Connection:
        pool = self._pool or await self._open()
        try:
            async with asyncio.timeout(POOL_TIMEOUT):
                conn = await pool.acquire()
        except (*_DRIVER_ERRORS, ValueError, OverflowError) as exc:  # connecting failed, or every one stayed busy
            raise DatabaseUnavailable(type(exc).__name__) from exc
        return conn

    async def _release(self, conn: Connection) -> None:
        if self._pool is not None:  # else closed: asyncpg's close has already let the connection go
            await self._pool.release(conn)

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._closed:
                raise DatabaseUnavailable("the connection pool is closed")
            if self._pool is None:
                # min_size=0: the pool itself opens nothing until a statement needs a connection.
                self._pool = await asyncpg.create_pool(
                    min_size=0,
                    max_size=self._size,
                    reset=_rollback_if_open,
                    max_inactive_connection_lifetime=300,
                    **{"timeout": CONNECT_TIMEOUT, "command_timeout": COMMAND_TIMEOUT, **self._connect},
                )
            return self._pool


class Transaction:
    """The statements of one transaction, on its connection (see :meth:`Database.transaction`)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def fetch(self, statement: Statement, *args: object) -> list[Row]:
        _refuse_naive(args)
        return await self._run(self._conn.fetch(statement.sql, *args))

    async def fetchrow(self, statement: Statement, *args: object) -> Row | None:
        _refuse_naive(args)
        return await self._run(self._conn.fetchrow(statement.sql, *args))

    async def execute(self, statement: Statement, *args: object) -> str:
        _refuse_naive(args)
        return await self._run(self._conn.execute(statement.sql, *args))

    async def _run(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except _DRIVER_ERRORS as exc:
            raise _translated(self._conn, exc) from exc


async def _rollback_if_open(conn: asyncpg.Connection) -> None:
    """Pool reset hook: no round trip, unless a failure left a transaction open on this connection."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _translated(conn: Connection, exc: BaseException) -> Exception:
    """The storage error for a driver error; a broken connection is terminated so the pool replaces it.

    A statement that timed out is not reused either (asyncpg has already asked the server to cancel it):
    in a network partition it would only time out again.
    """
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return ConstraintViolation(exc.constraint_name)
    if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, _CONNECTION_LOST):
        with contextlib.suppress(asyncpg.InterfaceError):  # a closed one is already back in the pool
            conn.terminate()
    return DatabaseUnavailable(type(exc).__name__)


def _refuse_naive(args: tuple[object, ...]) -> None:
    """A naive datetime names no instant: asyncpg would read it in the process's local time zone."""
    for arg in args:
        if isinstance(arg, datetime) and arg.tzinfo is None:
            raise ValueError("naive datetime given to the database; every time here is timezone-aware UTC")


def rows_affected(tag: str) -> int:
    """The row count of a command tag such as ``"UPDATE 2"`` or ``"INSERT 0 1"``."""
    return int(tag.rsplit(" ", 1)[-1])


_DRIVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # e.g. the server's FATAL for a terminated backend arrived just before its close did
    asyncpg.InternalClientError,
)
# The connection died under the statement (as opposed to the statement failing).
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    ConnectionError,
)
