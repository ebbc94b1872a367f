"""Shared fixtures: a fresh PostgreSQL database per run, settings, a controllable clock, an app client.

PostgreSQL is found at TEST_DATABASE_ADMIN_URL (default: postgres@127.0.0.1:5432). Without it the
PostgreSQL tests are skipped locally, and fail under CI=true: a missing database is never a silent pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from starlette.applications import Starlette

from issuer.http.app import create_app
from issuer.services import Services
from issuer.settings import Argon2Params, Secret, Settings
from issuer.storage.migrations import upgrade

if TYPE_CHECKING:
    from tests.key_support import Cli

ADMIN_DSN = os.environ.get("TEST_DATABASE_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
TABLES = ("refresh_tokens", "refresh_families", "users", "signing_keys", "login_failures", "rate_buckets")
ISSUER_URL = "https://issuer.test"
CLIENT_IP = "203.0.113.7"


class FakeClock:
    """A clock tests can move; starts at the real time so outside libraries accept its tokens."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = (start or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


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
        conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
        try:
            await conn.execute(query)
        finally:
            await conn.close()

    run_blocking(lambda: asyncio.run(go()))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database created for this test run, migrated to head, dropped at the end."""
    name = f"issuer_test_{secrets.token_hex(6)}"
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL is not reachable at {ADMIN_DSN}: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    url = f"{base}/{name}"
    try:
        run_blocking(lambda: upgrade(url))
        yield url
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'issuer.db'}"
    run_blocking(lambda: upgrade(url))
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """Both backends, for the storage tests."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_url(pg_url: str) -> str:
    """Default backend for HTTP tests: PostgreSQL."""
    return pg_url


@pytest.fixture
def settings(db_url: str) -> Settings:
    base = Settings(
        issuer_url=ISSUER_URL,
        audience="api",
        database_url=db_url,
        kek=Secret(secrets.token_bytes(32)),
        kek_is_dev=False,
        cookie_secure=True,
        # OWASP's minimum is the default; tests keep the same algorithm with a cheaper cost.
        argon2=Argon2Params(memory_cost_kib=1024, time_cost=1, parallelism=1),
        # Throttling is off by default so tests can log in and refresh freely from one address;
        # tests/test_throttling.py turns it on and attacks it.
        rate_limit_per_ip=0,
        login_lockout_threshold=0,
        cleanup_interval=0,
    )
    base.validate()
    return base


def with_settings(settings: Settings, **changes: object) -> Settings:
    changed = replace(settings, **changes)  # type: ignore[arg-type]
    changed.validate()
    return changed


async def _truncate(url: str) -> None:
    from issuer.storage.schema import create_engine, is_sqlite

    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if is_sqlite(url):
                for table in TABLES:
                    await conn.execute(text(f"DELETE FROM {table}"))
            else:
                await conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
async def _clean_database(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every test starts from empty tables on the shared PostgreSQL database."""
    yield
    if "pg_url" in request.fixturenames:
        await _truncate(request.getfixturevalue("pg_url"))


class IssuerHarness:
    """An app with its lifespan running, and a way to build clients for it."""

    def __init__(self, app: Starlette, clock: FakeClock) -> None:
        self.app = app
        self.clock = clock

    @property
    def services(self) -> Services:
        return self.app.state.services

    def client(self, ip: str = CLIENT_IP) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(ip, 40000))
        return httpx.AsyncClient(transport=transport, base_url=ISSUER_URL)


@contextlib.asynccontextmanager
async def running_issuer(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    """An issuer app with its lifespan (key loading, reload task) running, as uvicorn would run it."""
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield IssuerHarness(app, clock)


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
    from tests.key_support import Cli

    monkeypatch.chdir(tmp_path)  # Settings.from_environ must never create keys/dev-kek in the repository
    return Cli(settings, clock, monkeypatch, capsys)
