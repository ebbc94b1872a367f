"""Database faults an operator can diagnose (issue 18, item 4), through PgBouncer like every test here: the 503
log line names the driver's error, and ``/readyz`` fails when the hot statements fail, not only when no
connection opens."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from issuer.storage import users
from issuer.storage.database import Database
from tests.support.faults import assert_unavailable
from tests.support.http import bearer, login, register
from tests.support.issuer import IssuerHarness

PASSWORD_IN_URL = "hunter2-secret"


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "issuer" and r.levelno == logging.ERROR]


async def test_the_503_log_line_names_the_drivers_error_and_not_the_url(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await register(client)
    access = (await login(client))["access_token"]
    unreachable = Database(f"postgresql://issuer:{PASSWORD_IN_URL}@127.0.0.1:1/issuer", 1)
    real = users.by_ids
    monkeypatch.setattr(users, "by_ids", lambda db, ids: real(unreachable, ids))
    try:
        with caplog.at_level(logging.ERROR, logger="issuer"):
            assert_unavailable(await client.get("/auth/me", headers=bearer(access)))
    finally:
        await unreachable.close()
    (line,) = error_lines(caplog)
    assert re.fullmatch(
        r"database error on GET /auth/me: (ConnectionRefusedError|OSError): .*Connect call failed.*", line
    ), line
    assert PASSWORD_IN_URL not in caplog.text


async def test_the_503_log_line_carries_the_servers_message(
    issuer: IssuerHarness, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with renamed(issuer.services.settings.database_url, "users"):
        with caplog.at_level(logging.ERROR, logger="issuer"):
            response = await client.post("/auth/login", json={"email": "a@example.com", "password": "whatever1"})
    assert response.status_code == 503, response.text
    assert error_lines(caplog) == [
        'database error on POST /auth/login: UndefinedTableError: relation "users" does not exist'
    ]


@contextlib.asynccontextmanager
async def renamed(database_url: str, name: str) -> AsyncIterator[None]:
    """The table ``name`` renamed for the block (a schema behind the code), through a direct connection."""

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(database_url, statement_cache_size=0)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await execute(f"ALTER TABLE {name} RENAME TO {name}_elsewhere")
    try:
        yield
    finally:
        await execute(f"ALTER TABLE {name}_elsewhere RENAME TO {name}")


@pytest.fixture
async def ready_client(client: httpx.AsyncClient) -> httpx.AsyncClient:
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    return client


@pytest.mark.parametrize("table", ["refresh_tokens", "users"])
async def test_readiness_fails_when_a_hot_statement_fails_though_the_database_answers(
    issuer: IssuerHarness, ready_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, table: str
) -> None:
    """``SELECT 1`` still works; the refresh and the Bearer path's statements do not: not ready, and the log
    says which statement failed and why. Ready again once the table is back."""
    async with renamed(issuer.services.settings.database_url, table):
        with caplog.at_level(logging.WARNING, logger="issuer"):
            ready = await ready_client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "problems": ["database statements failing"]}
        assert ready.headers["cache-control"] == "no-store"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "issuer"]
        assert warnings == [
            f'not ready: database statements failing (DatabaseUnavailable: UndefinedTableError: relation "{table}" '
            "does not exist)"
        ]
    assert (await ready_client.get("/readyz")).status_code == 200
