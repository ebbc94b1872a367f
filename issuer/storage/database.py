"""The statements on the request hot path, each one round trip to PostgreSQL.

Refreshes and bearer-authenticated calls are the issuer's volume. On PostgreSQL they skip SQLAlchemy
entirely: its execution layer (about 100 µs of CPU per statement here), its transaction handling (a BEGIN
and a COMMIT, two more round trips) and its pool (a greenlet switch and an event dispatch per checkout,
about a quarter of an /auth/me). They run on :class:`HotPool`, a plain asyncpg pool beside the engine's,
outside any transaction, as prepared statements that asyncpg caches per connection. One statement is
atomic on its own, so the rotation stays all-or-nothing without BEGIN/COMMIT. Login's two statements
and the shared per-IP bucket run here too: whatever a login costs beyond its hash comes out of the
hashing threads' cores (``login``).

SQLite cannot nest an UPDATE inside WITH; there the portable functions in ``store`` run in one
transaction instead (a local file has no round trips to save).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage.schema import COMMAND_TIMEOUT, CONNECT_TIMEOUT, POOL_TIMEOUT
from issuer.storage.store import Family, User

# The rotation in one statement. ``consumed`` is the race arbiter: under READ COMMITTED, of N concurrent
# callers with one token the row lock lets exactly one see ``consumed_at IS NULL``; the others re-check
# the row after it commits and match nothing. ``touched`` re-checks ``revoked_at`` under the family's row
# lock, so a revocation that commits mid-statement wins: the token is consumed, no successor is issued,
# and no row comes back. Parameters: $1 presented hash, $2 now, $3 successor hash, $4 now + refresh TTL.
ROTATE_SQL = """
WITH consumed AS (
    UPDATE refresh_tokens AS t
    SET consumed_at = $2
    WHERE t.token_hash = $1
      AND t.consumed_at IS NULL
      AND t.expires_at > $2
      AND EXISTS (
          SELECT 1 FROM refresh_families AS live
          WHERE live.id = t.family_id AND live.revoked_at IS NULL AND live.expires_at > $2
      )
    RETURNING t.family_id
), touched AS (
    UPDATE refresh_families AS f
    SET last_used_at = $2, idle_expires_at = LEAST($4, f.expires_at)
    FROM consumed
    WHERE f.id = consumed.family_id AND f.revoked_at IS NULL
    RETURNING f.id, f.user_id, f.idle_expires_at
), successor AS (
    INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at, consumed_at)
    SELECT $3, touched.id, $2, touched.idle_expires_at, NULL FROM touched
    RETURNING family_id, expires_at
)
SELECT successor.family_id, successor.expires_at,
       u.id, u.email, u.password_hash, u.role, u.token_version
FROM successor
JOIN touched ON touched.id = successor.family_id
JOIN users AS u ON u.id = touched.user_id
"""

# Every user in ``$1`` in one statement: concurrent bearer calls share one lookup (``user_lookup``).
USERS_BY_ID_SQL = "SELECT id, email, password_hash, role, token_version FROM users WHERE id = ANY($1::text[])"

# Login in two statements (the rules are in ``lockout``, ``accounts`` and ``families``; ``login`` orders
# them): ``BEGIN_LOGIN_SQL`` before the password check, ``FINISH_LOGIN_SQL`` after a success.
#
# ``attempt`` counts a login attempt unless the email is locked, and sets the lock that the new count calls
# for, in one upsert: concurrent attempts on one email (from any replica) queue on its row lock, and each
# sees the lock set by the one before. While locked the WHERE matches nothing and no row comes back. The
# lock lengths come from ``LockoutPolicy.lock_seconds()``, indexed by the failures over the threshold (its
# last entry holds beyond). Parameters: $1 email, $2 now, $3 now - window, $4 threshold, $5 lock seconds.
_COUNTED = "(CASE WHEN lf.last_failure_at < $3 THEN 1 ELSE lf.failures + 1 END)"  # the stored row's new count


def _lock_after(failures: str) -> str:
    """SQL for the lock that ``failures`` calls for (NULL below the threshold), from the policy's table."""
    over = f"LEAST({failures} - $4, cardinality($5::float8[]) - 1)"
    return f"CASE WHEN {failures} >= $4 THEN $2::timestamptz + make_interval(secs => ($5::float8[])[{over} + 1]) END"


_USER_COLUMNS = "u.id, u.email, u.password_hash, u.role, u.token_version"
# The outer SELECT always yields one row: the attempt's new count (NULL while locked) and the account (NULL
# columns for an unknown email). A data-modifying WITH runs exactly once, however the query reads it.
BEGIN_LOGIN_SQL = f"""
WITH attempt AS (
    INSERT INTO login_failures AS lf (email, failures, last_failure_at, locked_until)
    VALUES ($1, 1, $2, {_lock_after("1")})
    ON CONFLICT (email) DO UPDATE
    SET failures = {_COUNTED}, last_failure_at = $2, locked_until = {_lock_after(_COUNTED)}
    WHERE lf.locked_until IS NULL OR lf.locked_until <= $2
    RETURNING lf.failures
)
SELECT (SELECT failures FROM attempt), {_USER_COLUMNS}
FROM (VALUES (1)) AS one LEFT JOIN users AS u ON u.email = $1
"""  # noqa: S608 (built from the constant fragments above; every value is a $n parameter)
# The same with the lock-out off: only the account (NULL columns for an unknown email).
READ_LOGIN_SQL = f"SELECT NULL, {_USER_COLUMNS} FROM (VALUES (1)) AS one LEFT JOIN users AS u ON u.email = $1"  # noqa: S608

# A new family and its first token, issued when the family is created and expiring at its idle expiry.
# The family row is inserted inside WITH, so the token's foreign key holds when it is checked at the end
# of the statement. Parameters: the family's columns in table order ($1 to $8), then the token's hash.
_NEW_FAMILY = """family AS (
    INSERT INTO refresh_families (id, user_id, created_at, last_used_at, expires_at, idle_expires_at, user_agent, ip)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
)
INSERT INTO refresh_tokens (token_hash, family_id, issued_at, expires_at, consumed_at)
VALUES ($9, $1, $3, $6, NULL)
"""
START_FAMILY_SQL = "WITH " + _NEW_FAMILY
# After a success with the lock-out on: the same, and the attempt's count cleared ($10, the email), in one
# commit.
FINISH_LOGIN_SQL = "WITH cleared AS (DELETE FROM login_failures WHERE email = $10), " + _NEW_FAMILY  # noqa: S608


# Take one token from a shared per-client bucket (``throttle.SharedRateLimiter``): refill for the time since
# its last use, capped at the capacity, and take one if there is one. An empty bucket's WHERE matches nothing,
# the row stays as it was and nothing comes back. Parameters: $1 bucket, $2 capacity, $3 now (epoch seconds),
# $4 tokens per second.
_REFILLED = "LEAST($2::float8, b.tokens + ($3::float8 - b.updated_at) * $4::float8)"
TAKE_RATE_TOKEN_SQL = f"""
INSERT INTO rate_buckets AS b (bucket, tokens, updated_at) VALUES ($1, $2::float8 - 1.0, $3::float8)
ON CONFLICT (bucket) DO UPDATE SET tokens = {_REFILLED} - 1.0, updated_at = $3::float8
WHERE {_REFILLED} >= 1.0
RETURNING b.tokens
"""  # noqa: S608 (constant fragments; every value is a $n parameter)


class DatabaseUnavailable(Exception):
    """A hot-path statement failed in the driver; answered like any database fault (503, retryable)."""


def is_postgres(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "postgresql"


class HotPool:
    """A plain asyncpg pool for the hot-path statements, on the engine's database and connect settings.

    Connections are opened on demand (none at start-up, so a database that is down at boot is a 503 per
    request, not a crash) up to ``size``; a connection the server has closed is replaced when it is next
    taken. Released connections are not reset: asyncpg's default reset is one more round trip per
    statement, and nothing here changes session state (no transactions, LISTEN, advisory locks or SET).
    """

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        _args, kwargs = engine.dialect.create_connect_args(engine.url)
        for dialect_only in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_creator_fn"):
            kwargs.pop(dialect_only, None)
        self._connect: dict[str, Any] = {"timeout": CONNECT_TIMEOUT, "command_timeout": COMMAND_TIMEOUT, **kwargs}
        self._size = size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    async def fetch_one(self, sql: str, *args: object, idempotent: bool) -> asyncpg.Record | None:
        rows = await self.fetch(sql, *args, idempotent=idempotent)
        return rows[0] if rows else None

    async def fetch(self, sql: str, *args: object, idempotent: bool) -> list[asyncpg.Record]:
        """Run one statement on a pooled connection, in autocommit, in one round trip.

        A connection the server dropped while it sat in the pool (a restart, a failover, a killed backend
        whose close had not arrived yet when it was taken) fails on first use. The statement is then
        retried once on a fresh connection when that is safe: always for a read (``idempotent``), and for a
        write only when the driver refused before sending anything. A write that may have reached the
        server is never replayed here; the client gets a 503 and retries itself (for a refresh,
        REFRESH_REUSE_GRACE makes that retry return the same successor if the first attempt did commit).
        """
        try:
            return await self._fetch(sql, args)
        except DatabaseUnavailable as exc:
            cause = exc.__cause__
            unsent = isinstance(cause, asyncpg.InternalClientError)
            if not (unsent or (idempotent and isinstance(cause, _CONNECTION_LOST))):
                raise
        return await self._fetch(sql, args)

    async def _fetch(self, sql: str, args: tuple[object, ...]) -> list[asyncpg.Record]:
        pool = self._pool or await self._open()
        try:
            async with asyncio.timeout(POOL_TIMEOUT):
                conn = await pool.acquire()
        except _DRIVER_ERRORS as exc:  # connecting failed, or every connection stayed busy
            raise DatabaseUnavailable(type(exc).__name__) from exc
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        except _DRIVER_ERRORS as exc:
            # A connection the server dropped, or one whose statement timed out (asyncpg has already asked
            # the server to cancel it), is not reused: in a partition it would only time out again.
            with contextlib.suppress(asyncpg.InterfaceError):  # a closed one is already back in the pool
                conn.terminate()
            raise DatabaseUnavailable(type(exc).__name__) from exc
        # A cancelled task (client gone, server shutting down) needs nothing here: asyncpg sends the server
        # a cancel request for the running statement, which then rolls back unless it had already finished
        # (then the rotation happened and its response is lost, which REFRESH_REUSE_GRACE covers), and the
        # connection's next user waits until that cancel has completed.
        finally:
            await pool.release(conn)

    async def _open(self) -> asyncpg.Pool:
        async with self._opening:
            if self._closed:
                raise DatabaseUnavailable("the hot-path pool is closed")
            if self._pool is None:
                # min_size=0: the pool itself opens nothing until a statement needs a connection.
                self._pool = await asyncpg.create_pool(
                    min_size=0,
                    max_size=self._size,
                    reset=_keep_session,
                    max_inactive_connection_lifetime=300,
                    **self._connect,
                )
            return self._pool

    def open_connections(self) -> int:
        """Connections open now, idle or in use; one the server has closed no longer counts once its close
        has arrived (asyncpg's ``Pool.get_size``)."""
        return self._pool.get_size() if self._pool is not None else 0

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo (see :class:`HotPool`), so no round trip on release."""


_DRIVER_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # e.g. the server's FATAL for a terminated backend arrived just before its close did
    asyncpg.InternalClientError,
)
# The connection died under the statement (as opposed to the statement failing or timing out).
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    ConnectionError,
)


async def rotate(
    pool: HotPool, presented_hash: bytes, successor_hash: bytes, now: datetime, token_expires: datetime
) -> tuple[str, datetime, User] | None:
    """Consume a live token and insert its successor; ``(family_id, successor_expiry, user)`` or None."""
    row = await pool.fetch_one(ROTATE_SQL, presented_hash, now, successor_hash, token_expires, idempotent=False)
    if row is None:
        return None
    return row[0], row[1], User(row[2], row[3], row[4], row[5], row[6])


async def users_by_id(pool: HotPool, user_ids: list[str]) -> dict[str, User]:
    rows = await pool.fetch(USERS_BY_ID_SQL, user_ids, idempotent=True)
    return {row[0]: User(row[0], row[1], row[2], row[3], row[4]) for row in rows}


@dataclass(frozen=True)
class Attempt:
    """A login attempt as the lock-out counts it (the parameters of ``BEGIN_LOGIN_SQL``)."""

    now: datetime
    window_start: datetime
    threshold: int
    lock_seconds: list[float]


async def begin_login(pool: HotPool, email: str, attempt: Attempt | None) -> tuple[bool, User | None]:
    """Count the attempt (when the lock-out is on) and read the account: ``(locked, user or None)``.

    While the email is locked nothing is counted and ``locked`` is True; the caller refuses the attempt
    without looking at the account."""
    if attempt is None:
        (row,) = await pool.fetch(READ_LOGIN_SQL, email, idempotent=True)
        locked = False
    else:
        args = (attempt.now, attempt.window_start, attempt.threshold, attempt.lock_seconds)
        (row,) = await pool.fetch(BEGIN_LOGIN_SQL, email, *args, idempotent=False)
        locked = row[0] is None
    user = None if row[1] is None else User(row[1], row[2], row[3], row[4], row[5])
    return locked, user


async def finish_login(pool: HotPool, family: Family, token_hash: bytes, *, clear_failures_of: str | None) -> bool:
    """Insert the family and its first token and, when given an email, clear its failures: one statement.

    False (nothing written) when the user is gone: the account was deleted while its password was checked.
    """
    args = (
        family.id,
        family.user_id,
        family.created_at,
        family.last_used_at,
        family.expires_at,
        family.idle_expires_at,
        family.user_agent,
        family.ip,
        token_hash,
    )
    try:
        if clear_failures_of is None:
            await pool.fetch(START_FAMILY_SQL, *args, idempotent=False)
        else:
            await pool.fetch(FINISH_LOGIN_SQL, *args, clear_failures_of, idempotent=False)
    except DatabaseUnavailable as exc:
        if isinstance(exc.__cause__, asyncpg.ForeignKeyViolationError):
            return False
        raise
    return True


async def take_rate_token(pool: HotPool, bucket: str, capacity: float, per_second: float, now: float) -> bool:
    """Take a token from ``bucket``; False (nothing changed) when it is empty."""
    row = await pool.fetch_one(TAKE_RATE_TOKEN_SQL, bucket, capacity, now, per_second, idempotent=False)
    return row is not None
