"""Shared fixtures: a fresh PostgreSQL database per run, settings, a controllable clock, an app client.

The server is chosen by ``tests.support.database.admin_dsn``: TEST_DATABASE_ADMIN_DSN, else PostgreSQL on
127.0.0.1:5432, else an embedded one; nothing is skipped for want of a database.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import httpx
import pytest

from issuer.settings import Argon2Params, Secret, Settings
from issuer.storage.migrations import upgrade
from tests.support.clock import FakeClock
from tests.support.database import admin_dsn
from tests.support.issuer import ISSUER_URL, IssuerHarness, running_issuer

if TYPE_CHECKING:
    from tests.support.keys import Cli

TABLES = (
    "refresh_tokens",
    "refresh_families",
    "users",
    "signing_keys",
    "login_failures",
    "rate_buckets",
    "clients",
    "security_events",
)


def run_blocking(fn: Callable[[], object]) -> None:
    """Run ``fn`` in a fresh thread (Alembic's env calls asyncio.run, which must not nest in a loop)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _admin(query: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(admin_dsn(), timeout=5)
        try:
            await conn.execute(query)
        finally:
            await conn.close()

    run_blocking(lambda: asyncio.run(go()))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database created for this test run, migrated to head, dropped at the end."""
    name = f"issuer_test_{secrets.token_hex(6)}"
    _admin(f'CREATE DATABASE "{name}"')
    url = f"{admin_dsn().rsplit('/', 1)[0]}/{name}"
    try:
        run_blocking(lambda: upgrade(url))
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def settings(pg_url: str) -> Settings:
    base = Settings(
        issuer_url=ISSUER_URL,
        audience="api",
        database_url=pg_url,
        kek=Secret(secrets.token_bytes(32)),
        kek_is_dev=False,
        cookie_secure=True,
        # OWASP's minimum is the default; tests keep the same algorithm with a cheaper cost.
        argon2=Argon2Params(memory_cost_kib=1024, time_cost=1, parallelism=1),
        # Throttling is off by default so tests can log in and refresh freely from one address;
        # tests/accounts/test_lockout.py and tests/http/test_throttle.py turn it on and attack it.
        rate_limit_per_ip=0,
        login_lockout_threshold=0,
        cleanup_interval=0,
    )
    base.validate()
    return base


async def _truncate(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} CASCADE")
        await conn.execute("UPDATE security_event_counter SET last_seq = 0, pruned_through = 0")
    finally:
        await conn.close()


@pytest.fixture(autouse=True)
async def _clean_database(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every test starts from empty tables on the shared PostgreSQL database."""
    yield
    if "pg_url" in request.fixturenames:
        await _truncate(request.getfixturevalue("pg_url"))


@pytest.fixture
async def issuer(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    async with running_issuer(settings, clock) as harness:
        yield harness


@pytest.fixture
async def client(issuer: IssuerHarness) -> AsyncIterator[httpx.AsyncClient]:
    async with issuer.client() as http:
        yield http


@pytest.fixture
def cli(
    settings: Settings,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> Cli:
    """Runs the `issuer` command in-process with exactly the test settings (see tests/key_support.py)."""
    from tests.support.keys import Cli

    monkeypatch.chdir(tmp_path)  # Settings.from_environ must never create keys/dev-kek in the repository
    return Cli(settings, clock, monkeypatch, capsys)
