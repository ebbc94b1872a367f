"""Async Alembic environment for PostgreSQL (through asyncpg).

The URL comes from the caller (``issuer migrate`` sets ``config.attributes["database_url"]``) or, for ``alembic``
run from the repository root, from DATABASE_URL. ``postgresql://`` and ``postgres://`` URLs get the asyncpg driver.

The connection prepares no named statement (asyncpg's and SQLAlchemy's statement caches are off): migrations
are rare and small, and so they also run through a transaction pooler (PgBouncer ``pool_mode = transaction``),
where the whole upgrade is one transaction and so stays on one server connection (README, "Poolers").
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from alembic.util import CommandError
from sqlalchemy import URL, pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import create_async_engine

from issuer.settings import DATABASE_SCHEMES
from issuer.storage.database import InvalidDatabaseURL, sqlalchemy_url, url_options
from issuer.storage.schema import metadata

config = context.config
target_metadata = metadata

CONNECT_TIMEOUT = 10.0  # seconds; asyncpg would otherwise wait a minute for an unreachable host


def _url() -> URL:
    raw = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not raw:
        raise CommandError("no database URL: set DATABASE_URL (postgresql://user@host/db) or run `issuer migrate`")
    try:
        driver = make_url(raw).drivername
    except ArgumentError:
        raise CommandError("the database URL is not a URL (e.g. postgresql://user@host/db)") from None
    if driver not in DATABASE_SCHEMES:
        raise CommandError(f"database driver {driver!r} is not supported: the issuer runs on PostgreSQL only")
    return sqlalchemy_url(raw)  # the pool's own parse: one reading of DATABASE_URL everywhere


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    url = _url()
    try:
        options = url_options(url.query)  # typed as the pool types them: "?statement_cache_size=0" is a number
    except InvalidDatabaseURL as exc:
        raise CommandError(f"DATABASE_URL: {exc}") from None
    engine = create_async_engine(
        url.set(query={}),
        poolclass=pool.NullPool,
        connect_args={
            "timeout": CONNECT_TIMEOUT,
            **options,
            "statement_cache_size": 0,  # asyncpg's
            "prepared_statement_cache_size": 0,  # SQLAlchemy's
        },
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_async())
