"""Faults in the middle of a rotation: the consume-and-replace is all or nothing (contract section 4).

A failure between consuming the presented token and storing its successor must leave the old state: the
presented token unconsumed and still redeemable, the family with exactly one live token. A database
failure is a 503 with ``Retry-After``, never a 500 or a corrupted family.

On SQLite the rotation is several statements in one transaction, so faults are injected between them. On
PostgreSQL it is one statement (``hotpath.ROTATE_SQL``): faults are made inside the server, after the
statement has consumed the token (a conflicting successor row, a backend killed while it waits for the
family's row lock), and in the driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import delete, insert, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from issuer.errors import InvalidGrant
from issuer.settings import Settings
from issuer.storage import store
from issuer.storage.schema import families as families_table
from issuer.storage.schema import refresh_tokens
from tests.support.clock import FakeClock
from tests.support.families import (
    assert_single_chain,
    family_of,
    family_row,
    live_tokens,
    sha256,
    token_count,
    token_row,
)
from tests.support.http import assert_error, login, refresh_body, register
from tests.support.issuer import CLIENT_IP, ISSUER_URL, IssuerHarness, running_issuer, with_settings


class Injected(Exception):
    """A failure the test injected."""


def fail_once(monkeypatch: pytest.MonkeyPatch, name: str, exc: BaseException) -> list[int]:
    """Make ``issuer.storage.store.<name>`` raise ``exc`` on its next call, then behave normally; returns a call log."""
    original = getattr(store, name)
    calls: list[int] = []

    async def failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return await original(*args, **kwargs)

    monkeypatch.setattr(store, name, failing)
    return calls


def fail_driver_once(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> list[int]:
    """Make the next asyncpg ``fetch`` (the PostgreSQL hot path's only call) raise ``exc``."""
    original = asyncpg.Connection.fetch
    calls: list[int] = []

    async def failing(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetch", failing)
    return calls


def db_error() -> OperationalError:
    return OperationalError("INSERT INTO refresh_tokens ...", {}, Exception("boom"))


async def assert_untouched(engine: AsyncEngine, token: str, family_id: str, clock: FakeClock) -> None:
    """The old state: the presented token unconsumed, nothing minted, the family live with one token."""
    row = await token_row(engine, token)
    assert row is not None
    assert row.consumed_at is None, "the failed rotation consumed the token"
    family = await family_row(engine, family_id)
    assert family.revoked_at is None
    assert await token_count(engine, family_id) == 1, "a successor survived the failed rotation"
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


# ---------------------------------------------------------------- service level, both backends


@pytest.fixture
async def any_issuer(settings: Settings, clock: FakeClock, pg_url: str) -> AsyncIterator[IssuerHarness]:
    async with running_issuer(with_settings(settings, database_url=pg_url), clock) as harness:
        yield harness


@pytest.fixture
async def sqlite_issuer(settings: Settings, clock: FakeClock, sqlite_url: str) -> AsyncIterator[IssuerHarness]:
    """The portable, multi-statement rotation (PostgreSQL runs it as one statement instead)."""
    async with running_issuer(with_settings(settings, database_url=sqlite_url), clock) as harness:
        yield harness


async def _logged_in(harness: IssuerHarness) -> tuple[str, str]:
    async with harness.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
    return token, await family_of(harness.engine, token)


# Every store call made inside the rotation's transaction after the token was consumed.
FAULT_POINTS = ["family_by_id", "insert_token", "touch_family", "user_by_id"]


@pytest.mark.parametrize("point", FAULT_POINTS)
@pytest.mark.parametrize("exc", [Injected("crash"), db_error(), TimeoutError()], ids=["crash", "db_error", "timeout"])
async def test_failure_after_consume_rolls_back(
    sqlite_issuer: IssuerHarness, monkeypatch: pytest.MonkeyPatch, point: str, exc: BaseException
) -> None:
    engine, clock, families = sqlite_issuer.engine, sqlite_issuer.clock, sqlite_issuer.services.families
    token, family_id = await _logged_in(sqlite_issuer)
    consumed_in_failed_attempt: list[str | None] = []
    original_consume = store.consume_token

    async def spy_consume(conn: AsyncConnection, token_hash: bytes, now: Any) -> str | None:
        result = await original_consume(conn, token_hash, now)
        consumed_in_failed_attempt.append(result)
        return result

    monkeypatch.setattr(store, "consume_token", spy_consume)
    calls = fail_once(monkeypatch, point, exc)

    with pytest.raises(type(exc)):
        await families.rotate(token, now=clock())

    # The fault really hit after the conditional UPDATE had matched (so a rollback was needed).
    assert calls, f"{point} was not called during the rotation"
    assert consumed_in_failed_attempt == [family_id]
    await assert_untouched(engine, token, family_id, clock)

    # The client retries with the same token: a normal rotation, not a reuse.
    clock.advance(1)
    rotation = await families.rotate(token, now=clock())
    assert rotation.replayed is False
    assert rotation.refresh.family_id == family_id
    assert rotation.refresh.token == families.successor_of(token)
    assert (await token_row(engine, token)).consumed_at == clock()  # type: ignore[union-attr]
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


async def test_failure_while_revoking_on_reuse_leaves_family_to_be_revoked_on_retry(
    any_issuer: IssuerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, clock, families = any_issuer.engine, any_issuer.clock, any_issuer.services.families
    token, family_id = await _logged_in(any_issuer)
    successor = (await families.rotate(token, now=clock())).refresh.token
    clock.advance(3600)
    fail_once(monkeypatch, "revoke_family", db_error())
    with pytest.raises(OperationalError):
        await families.rotate(token, now=clock())
    # Still detectable: the theft is caught on the next attempt.
    with pytest.raises(InvalidGrant):
        await families.rotate(token, now=clock())
    assert (await family_row(engine, family_id)).revoked_reason == "reuse"
    with pytest.raises(InvalidGrant):
        await families.rotate(successor, now=clock())


async def test_cancelled_rotation_rolls_back(sqlite_issuer: IssuerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request task cancelled mid-rotation (client gone, server shutting down) consumes nothing."""
    engine, clock, families = sqlite_issuer.engine, sqlite_issuer.clock, sqlite_issuer.services.families
    token, family_id = await _logged_in(sqlite_issuer)
    reached = asyncio.Event()
    original = store.insert_token

    async def stall(*args: Any, **kwargs: Any) -> None:
        reached.set()
        await asyncio.Event().wait()  # forever, until cancelled
        await original(*args, **kwargs)

    monkeypatch.setattr(store, "insert_token", stall)
    task = asyncio.create_task(families.rotate(token, now=clock()))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(store, "insert_token", original)

    await assert_untouched(engine, token, family_id, clock)
    assert (await families.rotate(token, now=clock())).refresh.token == families.successor_of(token)
    await assert_single_chain(engine, clock())


# ---------------------------------------------------------------- over HTTP (PostgreSQL)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        PoolTimeout("QueuePool limit reached"),
        TimeoutError(),
        ConnectionResetError("connection reset by peer"),
    ],
    ids=["connection_lost", "admin_shutdown", "pool_timeout", "timeout", "connection_reset"],
)
async def test_database_error_during_refresh_is_503_and_family_intact(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    engine, clock = issuer.engine, issuer.clock
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(engine, token)
    fail_driver_once(monkeypatch, exc)

    response = await refresh_body(client, token)

    assert_error(response, 503, "temporarily_unavailable")
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["cache-control"] == "no-store"
    assert "refresh_token" not in response.json()
    assert "set-cookie" not in response.headers
    assert issuer.services.metrics.db_errors._value.get() == 1
    await assert_untouched(engine, token, family_id, clock)

    retried = await refresh_body(client, token)
    assert retried.status_code == 200, retried.text
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


async def test_database_error_on_cookie_refresh_keeps_the_cookie(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 must not clear or replace the browser's refresh cookie: the old token is still the live one."""
    engine, clock = issuer.engine, issuer.clock
    await register(client)
    response = await client.post(
        "/auth/login", json={"email": "alice@example.com", "password": "correct horse battery"}
    )
    token = response.cookies["refresh_token"]
    family_id = await family_of(engine, token)
    fail_driver_once(monkeypatch, asyncpg.ConnectionDoesNotExistError("connection was closed"))
    client.cookies.clear()
    failed = await client.post("/auth/refresh", headers={"Cookie": f"refresh_token={token}"})
    assert_error(failed, 503, "temporarily_unavailable")
    assert "set-cookie" not in failed.headers
    await assert_untouched(engine, token, family_id, clock)


async def test_database_error_during_logout_is_503_not_a_false_204(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = issuer.engine
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(engine, token)
    fail_once(monkeypatch, "revoke_family", db_error())
    response = await client.post("/auth/logout", json={"refresh_token": token})
    assert_error(response, 503, "temporarily_unavailable")
    assert (await family_row(engine, family_id)).revoked_at is None
    assert (await client.post("/auth/logout", json={"refresh_token": token})).status_code == 204
    assert (await family_row(engine, family_id)).revoked_reason == "logout"


async def test_unexpected_error_during_refresh_is_500_json_and_family_intact(
    issuer: IssuerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, clock = issuer.engine, issuer.clock
    transport = httpx.ASGITransport(app=issuer.app, client=(CLIENT_IP, 40000), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER_URL) as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        family_id = await family_of(engine, token)
        fail_driver_once(monkeypatch, Injected("a bug"))
        response = await refresh_body(client, token)
        assert_error(response, 500, "server_error")
        assert "Injected" not in response.text
        await assert_untouched(engine, token, family_id, clock)
        assert (await refresh_body(client, token)).status_code == 200


async def _terminate_own_backend(engine: AsyncEngine, conn: AsyncConnection) -> None:
    """Kill the PostgreSQL backend serving ``conn`` (as a crash or failover would), waiting until it is gone."""
    pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    async with engine.connect() as admin:
        killed = (await admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})).scalar_one()
    assert killed is True


async def test_statement_failing_after_the_consume_rolls_back_entirely(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    """A real fault inside the one-statement rotation, after its UPDATE has consumed the token: the successor
    INSERT hits a row already holding the successor's hash. PostgreSQL must undo the consume as well."""
    engine, clock, families = issuer.engine, issuer.clock, issuer.services.families
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(engine, token)
    other_family = await family_of(engine, (await login(client))["refresh_token"])
    blocker = sha256(families.successor_of(token))
    async with engine.begin() as conn:  # a consumed row, so the other family keeps a single live token
        await conn.execute(
            insert(refresh_tokens).values(
                token_hash=blocker,
                family_id=other_family,
                issued_at=clock(),
                expires_at=clock() + timedelta(hours=1),
                consumed_at=clock(),
            )
        )

    response = await refresh_body(client, token)

    assert_error(response, 503, "temporarily_unavailable")
    await assert_untouched(engine, token, family_id, clock)
    async with engine.begin() as conn:
        await conn.execute(delete(refresh_tokens).where(refresh_tokens.c.token_hash == blocker))
    retried = await refresh_body(client, token)
    assert retried.status_code == 200, retried.text
    await assert_single_chain(engine, clock())


async def test_database_connection_killed_mid_rotation(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """A real fault: the server process running the rotation dies after the statement consumed the token.

    Another transaction holds the family's row lock, so the statement waits in the server between its
    consuming UPDATE and its family UPDATE; that backend is then terminated (as in a crash or failover).
    """
    engine, clock = issuer.engine, issuer.clock
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(engine, token)
    async with engine.connect() as locker:
        await locker.execute(select(families_table).where(families_table.c.id == family_id).with_for_update())
        request = asyncio.create_task(refresh_body(client, token))
        assert await _lock_waiters(engine) == 1, "the rotation never blocked on the family's row lock"
        async with engine.connect() as admin:
            killed = (await admin.execute(text(KILL_LOCK_WAITERS))).scalars().all()
        assert killed == [True]
        response = await request
        await locker.rollback()

    assert_error(response, 503, "temporarily_unavailable")
    assert "retry-after" in response.headers
    await assert_untouched(engine, token, family_id, clock)
    retried = await refresh_body(client, token)
    assert retried.status_code == 200, retried.text
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


KILL_LOCK_WAITERS = (
    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
)
LOCK_WAITERS = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"


async def _lock_waiters(engine: AsyncEngine) -> int:
    """Poll until some backend of this database waits for a lock (bounded); returns how many do."""
    waiting = 0
    async with engine.connect() as watcher:
        for _ in range(500):
            waiting = (await watcher.execute(text(LOCK_WAITERS))).scalar_one()
            # pg_stat_activity is snapshotted per transaction: end it so the next poll sees fresh state.
            await watcher.rollback()
            if waiting:
                break
            await asyncio.sleep(0.01)
    return waiting


async def _until_no_lock_waiters(engine: AsyncEngine) -> bool:
    async with engine.connect() as watcher:
        for _ in range(500):
            waiting = (await watcher.execute(text(LOCK_WAITERS))).scalar_one()
            await watcher.rollback()
            if not waiting:
                return True
            await asyncio.sleep(0.01)
    return False


async def test_rotation_cancelled_while_waiting_for_the_row_lock(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    """Cancel a rotation that is blocked inside PostgreSQL (as in a race when the client disconnects).

    Another transaction holds the token's row lock, so the consuming UPDATE waits in the server; the
    request task is cancelled there. The short polling below only waits for that server state to appear.
    """
    engine, clock, families = issuer.engine, issuer.clock, issuer.services.families
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(engine, token)
    async with engine.connect() as locker:
        await locker.execute(
            select(refresh_tokens).where(refresh_tokens.c.token_hash == sha256(token)).with_for_update()
        )
        task = asyncio.create_task(families.rotate(token, now=clock()))
        try:
            waiting = await _lock_waiters(engine)
        finally:
            task.cancel()
        assert waiting == 1, "the rotation never blocked on the row lock"
        with pytest.raises(asyncio.CancelledError):
            await task
        # Cancellation reaches the server as a cancel request; only once it has ended the waiting statement
        # is releasing the lock a test of rollback (released earlier, the statement would simply complete).
        assert await _until_no_lock_waiters(engine), "the cancelled statement kept waiting in the server"
        await locker.rollback()

    await assert_untouched(engine, token, family_id, clock)
    assert (await families.rotate(token, now=clock())).refresh.token == families.successor_of(token)
    await assert_single_chain(engine, clock())


async def test_account_deleted_while_a_replay_is_decided(
    any_issuer: IssuerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace-replay path reads without locks: an account deletion can commit between its reads.

    Deterministic version of that race: the deletion commits right after the replay found the unused
    successor. The replay must then be refused as invalid_grant (not a 500, and no token for a deleted
    account).
    """
    engine, clock = any_issuer.engine, any_issuer.clock
    transport = httpx.ASGITransport(app=any_issuer.app, client=(CLIENT_IP, 40000), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER_URL) as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        assert (await refresh_body(client, token)).status_code == 200
        user_id = (await family_row(engine, await family_of(engine, token))).user_id
        original = store.token_by_hash

        async def delete_account_meanwhile(conn: AsyncConnection, token_hash: bytes) -> Any:
            found = await original(conn, token_hash)
            async with engine.begin() as other:
                await store.delete_user(other, user_id)
            return found

        monkeypatch.setattr(store, "token_by_hash", delete_account_meanwhile)
        clock.advance(1)
        response = await refresh_body(client, token)
        assert_error(response, 401, "invalid_grant")
        monkeypatch.setattr(store, "token_by_hash", original)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
