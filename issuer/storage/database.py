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
  connection;
- a prepared statement the server does not know, or already knows under the same name, means a pooler is
  moving this connection between server connections while its statement cache is on: that is
  :class:`PoolerMisconfigured`, a 503 for a request and one line naming ``DATABASE_URL`` at start-up.

Every :class:`DatabaseUnavailable` carries the driver's error class and the first line of its message
(:func:`describe`): what the 503 log line shows. Neither ever holds the URL or its password.

Transaction poolers (PgBouncer ``pool_mode = transaction``) hand each transaction, and each statement run
outside one, to whichever server connection is free. asyncpg's statement cache names its prepared statements
per client connection (``__asyncpg_stmt_1__``, ...), so behind such a pooler they land on server connections
that another client already used ("prepared statement ... already exists") or miss the one that has them
("... does not exist"), and a name can even stand for another client's statement there. The first connection
a :class:`Database` opens therefore asks the server for its process id and compares it with the one the
connection was given at start-up: a pooler answers the start-up itself (its own cancel key), so the two differ,
and from then on every connection of that pool is opened with ``statement_cache_size=0``. asyncpg then sends
each statement unnamed, parsed again in the same message batch as its Bind (one Sync), which a transaction
pooler keeps on one server connection. The cost is a second round trip per statement (docs/performance.md).
``statement_cache_size`` in ``DATABASE_URL`` overrides the detection either way (README, "Poolers").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url

from issuer.settings import ConfigError

# Bounded waits: a dead database must produce a 503 within seconds, never a hung request.
CONNECT_TIMEOUT = 5.0  # opening a connection
COMMAND_TIMEOUT = 10.0  # one statement (asyncpg then cancels it in the server)
POOL_TIMEOUT = 5.0  # waiting for a free pooled connection
DESCRIPTION_LIMIT = 300  # characters of a driver's message kept in an error (and so in a log line)

log = logging.getLogger("issuer")

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
    """The database could not run a statement; answered as a 503 the client may retry. The message is
    :func:`describe` of the driver's error (also its ``__cause__``)."""


class PoolerMisconfigured(DatabaseUnavailable, ConfigError):
    """A pooler between the issuer and PostgreSQL broke the driver's prepared statements (module docstring).

    A request gets the 503 of any :class:`DatabaseUnavailable`; ``issuer`` commands (``serve`` checks the
    database before it listens) print it as a configuration error: one line naming the cause and the setting.
    """


class InvalidDatabaseURL(ValueError):
    """A ``DATABASE_URL`` query parameter asyncpg does not take, or a value it cannot use. The message names
    the parameter, never its value (a value may be a password)."""


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
    server as a setting instead of turning TLS on. Raises :class:`InvalidDatabaseURL`.
    """
    url = sqlalchemy_url(database_url)
    arguments: dict[str, Any] = url.translate_connect_args(username="user", database="database")
    arguments.update(url_options(url.query))
    return arguments


def url_options(query: Mapping[str, str | tuple[str, ...]]) -> dict[str, Any]:
    """The query of ``DATABASE_URL`` as asyncpg's keyword arguments, each converted to the type asyncpg wants.

    Query options (``host=/run/postgresql``, ``ssl=require``, ``statement_cache_size=0``, ...) are asyncpg's
    own keyword arguments, as with SQLAlchemy's asyncpg dialect, but arrive as text: passed on as such, a
    number crashed the first connection with a TypeError deep in asyncpg. A repeated option keeps its last
    value; libpq's ``sslmode`` and ``application_name`` are accepted too. Anything else is refused here, at
    start-up, rather than by the driver on the first request.
    """
    options: dict[str, Any] = {}
    for name, raw in query.items():
        value = raw if isinstance(raw, str) else raw[-1]
        convert = _URL_OPTIONS.get(name)
        if convert is None:
            raise InvalidDatabaseURL(
                f"unknown query parameter {name!r}; the driver (asyncpg) takes {', '.join(sorted(_URL_OPTIONS))}"
            )
        converted = convert(value)
        if converted is None:
            raise InvalidDatabaseURL(f"query parameter {name!r}: {_URL_OPTION_RULES[convert]}")
        if name == "application_name":
            options["server_settings"] = {"application_name": converted}
        else:
            options["ssl" if name == "sslmode" else name] = converted
    return options


def _count(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


def _port(value: str) -> int | None:
    port = _count(value)
    return port if port is not None and 0 < port < 65536 else None


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _text(value: str) -> str | None:
    return value or None


def _ssl_mode(value: str) -> str | None:
    return value if value in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full") else None


def _flag(value: str) -> bool | None:
    return {"true": True, "1": True, "false": False, "0": False}.get(value.lower())


def _session_attrs(value: str) -> str | None:
    return value if value in ("any", "primary", "standby", "prefer-standby", "read-write", "read-only") else None


def _gsslib(value: str) -> str | None:
    return value if value in ("gssapi", "sspi") else None


_URL_OPTION_RULES: dict[Callable[[str], object], str] = {
    _count: "must be a whole number, 0 or more",
    _port: "must be a port number between 1 and 65535",
    _seconds: "must be a number of seconds greater than 0",
    _text: "must not be empty",
    _ssl_mode: "must be one of disable, allow, prefer, require, verify-ca, verify-full",
    _flag: "must be true or false",
    _session_attrs: "must be one of any, primary, standby, prefer-standby, read-write, read-only",
    _gsslib: "must be gssapi or sspi",
}
_URL_OPTIONS: dict[str, Callable[[str], object]] = {
    "host": _text,
    "port": _port,
    "user": _text,
    "password": _text,
    "database": _text,
    "passfile": _text,
    "ssl": _ssl_mode,
    "sslmode": _ssl_mode,
    "direct_tls": _flag,
    "timeout": _seconds,
    "command_timeout": _seconds,
    "statement_cache_size": _count,
    "max_cached_statement_lifetime": _count,
    "max_cacheable_statement_size": _count,
    "target_session_attrs": _session_attrs,
    "krbsrvname": _text,
    "gsslib": _gsslib,
    "application_name": _text,
}


def describe(exc: BaseException) -> str:
    """The driver's error class and the first line of its message, for a log line.

    asyncpg's and the server's messages name objects, never the URL or its password; the detail lines
    (which can quote a row's values) are left out.
    """
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 3] + "..."


async def behind_pooler(conn: asyncpg.Connection) -> bool:
    """Whether ``conn`` reaches PostgreSQL through a pooler: the server process running its statements is not
    the one whose id the connection got at start-up (a pooler answers the start-up with its own cancel key).

    One round trip, on an unnamed statement: a named one would itself be left behind on a pooled server
    connection. A TCP proxy forwards the server's own start-up answer, so it counts as direct.
    """
    statement = await conn.prepare("SELECT pg_backend_pid()", name="")
    server_pid = await statement.fetchval()
    return bool(server_pid != conn.get_server_pid())


class Database:
    """A lazily opened asyncpg pool of up to ``size`` connections.

    No connection is opened at start-up, so a database that is down at boot is a 503 per request, not a
    crash. Released connections are not reset with a round trip: nothing here leaves session state behind
    (no SET, LISTEN or advisory locks), and a transaction left open by a failure is rolled back on release;
    that is also what lets the pool work through a transaction pooler (module docstring).
    """

    def __init__(self, database_url: str, size: int) -> None:
        try:
            self._arguments = connect_arguments(database_url)
        except InvalidDatabaseURL as exc:  # settings validate the URL first; this is for URLs built in code
            raise ConfigError(f"DATABASE_URL: {exc}") from None
        self._size = size
        # Requests waiting for a connection are served first come, first served. asyncpg's pool queue is not
        # fair: a released connection wakes the oldest waiter, but a request that asks before that waiter runs
        # takes it, and the waiter goes to the back of the line; under load some lost that race again and
        # again (the refresh's p99: docs/performance.md). A semaphore with one permit per connection hands each
        # released permit to its oldest waiter (asyncio.Semaphore is FIFO since Python 3.11.1), so the pool's
        # own queue never waits.
        self._turns = asyncio.Semaphore(size)
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        # Whether the connections go through a pooler; None until the first connection has told (or the URL
        # sets statement_cache_size, which then decides alone).
        self._behind_pooler: bool | None = None
        self._detecting = asyncio.Lock()
        self._cache_explicit = "statement_cache_size" in self._arguments

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
                # A connection terminated by the failure is already back in the pool: even asking whether it
                # is closed raises then.
                with contextlib.suppress(*_DRIVER_ERRORS):
                    if not conn.is_closed():
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

    @property
    def behind_pooler(self) -> bool | None:
        """Whether the first connection found a pooler in front of PostgreSQL (None before it, or when
        ``statement_cache_size`` in ``DATABASE_URL`` took the decision)."""
        return self._behind_pooler

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
                await self._turns.acquire()
                try:
                    conn = await pool.acquire()
                except BaseException:
                    self._turns.release()
                    raise
        except TimeoutError as exc:
            raise DatabaseUnavailable(
                f"TimeoutError: no connection within {POOL_TIMEOUT:g} s (all {self._size} busy, or the server "
                "does not answer)"
            ) from exc
        except (*_DRIVER_ERRORS, ValueError, OverflowError) as exc:  # connecting failed, or every one stayed busy
            raise _translated(None, exc) from exc
        return conn

    async def _release(self, conn: Connection) -> None:
        try:
            if self._pool is not None:  # else closed: asyncpg's close has already let the connection go
                await self._pool.release(conn)
        finally:
            self._turns.release()

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._closed:
                raise DatabaseUnavailable("the connection pool is closed")
            if self._pool is None:
                # min_size=0: the pool itself opens nothing until a statement needs a connection.
                self._pool = await asyncpg.create_pool(
                    min_size=0,
                    max_size=self._size,
                    connect=self._connect,
                    reset=_rollback_if_open,
                    max_inactive_connection_lifetime=300,
                    **{"timeout": CONNECT_TIMEOUT, "command_timeout": COMMAND_TIMEOUT, **self._arguments},
                )
            return self._pool

    async def _connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        """The pool's way to open a connection: the first one finds out whether a pooler is in between, and
        every one after it through a pooler has its statement cache off (module docstring)."""
        if self._behind_pooler is None and not self._cache_explicit:
            async with self._detecting:
                if self._behind_pooler is None:
                    conn: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
                    try:
                        pooled = await behind_pooler(conn)
                    except BaseException:
                        conn.terminate()
                        raise
                    self._behind_pooler = pooled
                    if not pooled:
                        return conn
                    log.info(
                        "DATABASE_URL leads to a connection pooler: prepared-statement caching is off (README, Poolers)"
                    )
                    await conn.close()
        if self._behind_pooler and not self._cache_explicit:
            kwargs["statement_cache_size"] = 0
        connection: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        return connection


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


def _translated(conn: Connection | None, exc: BaseException) -> Exception:
    """The storage error for a driver error; a broken connection is terminated so the pool replaces it.

    A statement that timed out is not reused either (asyncpg has already asked the server to cancel it):
    in a network partition it would only time out again. Nor is a connection whose prepared statements a
    pooler has mixed up: its cache no longer matches the server connection behind it.
    """
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return ConstraintViolation(exc.constraint_name)
    misconfigured = _pooler_mixup(exc)
    if conn is not None and (
        misconfigured or not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, _CONNECTION_LOST)
    ):
        with contextlib.suppress(asyncpg.InterfaceError):  # a closed one is already back in the pool
            conn.terminate()
    if misconfigured:
        return PoolerMisconfigured(
            "DATABASE_URL: a connection pooler in transaction or statement mode (PgBouncer pool_mode = "
            "transaction) is passing this connection between server connections, which breaks the driver's "
            f"prepared statements ({describe(exc)}); remove statement_cache_size from DATABASE_URL or set it "
            "to 0 (README, Poolers)"
        )
    return DatabaseUnavailable(describe(exc))


def _pooler_mixup(exc: BaseException) -> bool:
    """A prepared statement of this connection missing, already there, or with other parameters: the server
    connection behind it changed (a pooler), as the statement cache never loses track of its own."""
    if isinstance(exc, (asyncpg.exceptions.DuplicatePreparedStatementError, asyncpg.InvalidSQLStatementNameError)):
        return True
    return isinstance(exc, asyncpg.exceptions.ProtocolViolationError) and "prepared statement" in str(exc)


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
