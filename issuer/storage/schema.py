"""Tables and the engine factory. The Alembic migrations create exactly these tables."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    event,
)
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator

UpsertInsert = PgInsert | SqliteInsert

# Bounded waits on PostgreSQL, shared by the engine's pool and the hot path's (``hotpath.HotPool``): a dead
# database must produce a 503 within seconds, never a hung request.
CONNECT_TIMEOUT = 5.0  # opening a connection
COMMAND_TIMEOUT = 10.0  # one statement (asyncpg then cancels it in the server)
POOL_TIMEOUT = 5.0  # waiting for a free pooled connection


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so values are stored as naive UTC and given
    their zone back on the way out. Comparisons in SQL stay correct because every value goes through here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    # Stored normalized (trimmed, lower-cased) so the unique index is the case-insensitive comparison.
    Column("email", String(254), nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("role", String(32), nullable=False, server_default="user"),
    Column("token_version", Integer, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime, nullable=False),
)

families = Table(
    "refresh_families",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_used_at", UTCDateTime, nullable=False),
    # Absolute end of the session (SESSION_MAX_AGE); no refresh can extend it.
    Column("expires_at", UTCDateTime, nullable=False, index=True),
    # Expiry of the family's newest token: past it the session is idle-dead even if never revoked.
    Column("idle_expires_at", UTCDateTime, nullable=False),
    Column("user_agent", String(512), nullable=True),
    Column("ip", String(64), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revoked_reason", String(32), nullable=True),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    # SHA-256 of the opaque token; the token itself is never stored.
    Column("token_hash", LargeBinary(32), primary_key=True),
    Column("family_id", String(36), ForeignKey("refresh_families.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("issued_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
    Column("consumed_at", UTCDateTime, nullable=True),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("public_jwk", Text, nullable=False),
    # AES-256-GCM(KEK, PKCS#8 DER), nonce prepended, kid as associated data.
    Column("private_key_enc", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("publish_at", UTCDateTime, nullable=False),
    Column("activate_at", UTCDateTime, nullable=False),
    Column("retire_at", UTCDateTime, nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("key_bits", BigInteger, nullable=False),
    Column("generation", BigInteger, nullable=False, unique=True),
)

login_failures = Table(
    "login_failures",
    metadata,
    # The normalized email, whether or not an account has it: throttling must not reveal which exist.
    Column("email", String(254), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure_at", UTCDateTime, nullable=False, index=True),
    Column("locked_until", UTCDateTime, nullable=True),
)

rate_buckets = Table(
    "rate_buckets",
    metadata,
    # "<scope>:<client address or /64>"; a token bucket shared by every replica.
    Column("bucket", String(96), primary_key=True),
    Column("tokens", Float, nullable=False),
    # Seconds since the epoch, as a float, so the refill is plain arithmetic on every backend.
    Column("updated_at", Float, nullable=False, index=True),
)

Index("ix_refresh_families_user_active", families.c.user_id, families.c.revoked_at)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def upsert_insert(conn: AsyncConnection, table: Table) -> UpsertInsert:
    """An INSERT that supports ``on_conflict_do_update``: both backends have one, each in its own dialect."""
    if conn.dialect.name == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine with the per-backend settings the issuer relies on."""
    if is_sqlite(url):
        # busy timeout: concurrent writers wait for the lock instead of failing at once.
        engine = create_async_engine(url, connect_args={"timeout": 15}, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    # A fixed-size pool (as HikariCP advises): requests beyond it wait for a connection (up to pool_timeout),
    # which is cheaper than overflow connections that are opened, TLS-negotiated and closed per burst.
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 0)
    kwargs.setdefault("pool_timeout", POOL_TIMEOUT)
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", CONNECT_TIMEOUT)
    connect_args.setdefault("command_timeout", COMMAND_TIMEOUT)
    engine = create_async_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine.sync_engine, "checkout")
    def _refuse_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        """A free liveness check instead of ``pool_pre_ping`` (a round trip on every checkout, which would
        double the hot path's). asyncpg sees a server-side close (restart, pg_terminate_backend, a proxy
        dropping the socket) as soon as it arrives; the pool then discards the connection and takes or
        opens another. A silent partition is caught by the command timeout instead."""
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("pooled connection was closed by the server")

    return engine
