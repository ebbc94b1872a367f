"""The pooler tests run on the suite's own fixtures (``issuer``, ``client``, ``cli``, ...) with ``settings``
pointing at the test database through a real PgBouncer in transaction pooling mode (tests/pooler/pgbouncer.py).

``pg_url`` stays the direct URL: the tests' own checks of the tables, and the truncation between tests, do
not go through the pooler under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from issuer.settings import Settings
from tests.pooler.pgbouncer import PgBouncer, running_pgbouncer
from tests.support.database import admin_dsn
from tests.support.issuer import with_settings


@pytest.fixture(scope="session")
def pgbouncer(pg_url: str) -> Iterator[PgBouncer]:
    with running_pgbouncer(admin_dsn(), urlsplit(pg_url).path.lstrip("/")) as bouncer:
        yield bouncer


@pytest.fixture
def pooled_url(pg_url: str, pgbouncer: PgBouncer) -> str:
    """The test database through PgBouncer (transaction mode, a few server connections for many clients)."""
    return pgbouncer.url(pg_url)


@pytest.fixture
def solo_url(pg_url: str, pgbouncer: PgBouncer) -> str:
    """The test database through PgBouncer over a single server connection that every client shares."""
    return pgbouncer.url(pg_url, database=f"solo_{urlsplit(pg_url).path.lstrip('/')}")


@pytest.fixture
def settings(settings: Settings, pooled_url: str) -> Settings:
    """The suite's test settings, with DATABASE_URL through PgBouncer and a pool larger than PgBouncer's."""
    return with_settings(settings, database_url=pooled_url, db_pool_size=8)
