"""Faults in the middle of a rotation: all or nothing (contract section 4).

The rotation is one statement (:data:`issuer.storage.sessions.ROTATE`): consume the presented token, touch the
family, insert the successor, read the user. A fault anywhere leaves either

- the old state: the presented token unconsumed and still redeemable, nothing minted; or
- the new state: the token consumed and its successor the family's one live token; a retry with the same
  token inside REFRESH_REUSE_GRACE gets that same successor back (the client never saw it);

never a family with zero or two live tokens. A database failure is a 503 with ``Retry-After`` and leaves the
refresh cookie alone, never a 500 or a corrupted family.

Faults are injected
- around the storage call (``issuer.storage.sessions`` functions monkeypatched): a crash, a database error, a
  timeout or a cancellation, before the statement is sent or after it has committed;
- in the driver (asyncpg's ``Connection`` methods, for one statement): each kind of error it raises;
- on the wire (:meth:`tests.support.faults.PostgresProxy.drop_at`): the connection dies before the statement
  reaches the server, or after the server has committed it and before its answer arrives;
- in the server: the statement fails after its consume (a row already holding the successor's hash), or its
  backend is killed, or its task cancelled, while it waits for a row lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.errors import InvalidGrant, RefreshTokenReused
from issuer.storage import sessions
from issuer.storage.database import DatabaseUnavailable, Statement
from issuer.storage.schema import families as families_table
from issuer.storage.schema import refresh_tokens
from issuer.storage.schema import users as users_table
from tests.sessions.conftest import GRACE, MakeIssuer, db_error_count
from tests.support.clock import FakeClock
from tests.support.families import (
    assert_refresh_cookie,
    assert_single_chain,
    family_of,
    family_row,
    live_tokens,
    refresh_cookie,
    sha256,
    token_count,
    token_row,
)
from tests.support.faults import PostgresProxy, assert_unavailable, postgres_proxy
from tests.support.http import PASSWORD, assert_error, login, refresh_body, register, retry_after
from tests.support.issuer import IssuerHarness


class Injected(Exception):
    """A failure the test injected."""


Fault = Callable[[], BaseException]

# What can go wrong around the statement, as the rotation's caller sees it.
SERVICE_FAULTS: dict[str, Fault] = {
    "crash": lambda: Injected("crash"),
    "db_error": lambda: DatabaseUnavailable("ConnectionResetError"),
    "timeout": TimeoutError,
}
# What asyncpg raises when a statement fails under it; the pool turns each into a 503.
DRIVER_ERRORS: dict[str, Fault] = {
    "connection_lost": lambda: asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    "admin_shutdown": lambda: asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
    "timeout": TimeoutError,
    "connection_reset": lambda: ConnectionResetError("connection reset by peer"),
}
# ``after``: the fault hits once the statement has committed (its answer is lost); else before it is sent.
POINTS = {"before": False, "after": True}


# ---------------------------------------------------------------- the two outcomes


async def assert_untouched(engine: AsyncEngine, token: str, family_id: str, now: datetime) -> None:
    """The old state: the presented token unconsumed, nothing minted, the family live with one token."""
    row = await token_row(engine, token)
    assert row is not None
    assert row.consumed_at is None, "the failed rotation consumed the token"
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await token_count(engine, family_id) == 1, "a successor survived the failed rotation"
    assert await live_tokens(engine, family_id, now) == 1
    await assert_single_chain(engine, now)


async def assert_rotated(engine: AsyncEngine, token: str, successor: str, family_id: str, now: datetime) -> None:
    """The new state: the token consumed and its successor the family's one live token."""
    row = await token_row(engine, token)
    assert row is not None
    assert row.consumed_at is not None, "the committed rotation did not consume the token"
    after = await token_row(engine, successor)
    assert after is not None
    assert after.family_id == family_id
    assert after.consumed_at is None
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await token_count(engine, family_id) == 2
    assert await live_tokens(engine, family_id, now) == 1
    await assert_single_chain(engine, now)


async def assert_outcome(
    harness: IssuerHarness, clock: FakeClock, token: str, family_id: str, *, committed: bool
) -> None:
    """After a fault: the old or the new state, as ``committed`` says; then the client's retry with the same
    token succeeds (a replay of the same successor if the rotation had committed) and the chain goes on."""
    engine, families = harness.engine, harness.services.families
    successor = families.successor_of(token)
    if committed:
        await assert_rotated(engine, token, successor, family_id, clock())
    else:
        await assert_untouched(engine, token, family_id, clock())
    clock.advance(GRACE - 1)  # inside the grace window
    retried = await families.rotate(token, now=clock())
    assert retried.replayed is committed
    assert retried.refresh.family_id == family_id
    assert retried.refresh.token == successor
    consumed = await token_row(engine, token)
    assert consumed is not None
    assert (consumed.consumed_at == clock()) is not committed  # a replay does not consume again
    await assert_rotated(engine, token, successor, family_id, clock())
    following = await families.rotate(successor, now=clock())
    assert following.replayed is False
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


async def logged_in(harness: IssuerHarness) -> tuple[str, str]:
    """Alice's refresh token (body transport) and its family."""
    async with harness.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
    return token, await family_of(harness.engine, token)


# ---------------------------------------------------------------- around the storage call


def around_rotate(monkeypatch: pytest.MonkeyPatch, fault: Callable[[], Any], *, after: bool) -> list[int]:
    """Make the next ``sessions.rotate`` call meet ``fault`` (an awaitable's factory, or an exception's) before
    or after the real statement; later calls behave normally. Returns a log of the faults that hit."""
    original = sessions.rotate
    hits: list[int] = []

    async def faulty(*args: Any, **kwargs: Any) -> Any:
        if hits:
            return await original(*args, **kwargs)
        hits.append(1)
        result = await original(*args, **kwargs) if after else None
        outcome = fault()
        if isinstance(outcome, BaseException):
            raise outcome
        await outcome
        return result

    monkeypatch.setattr(sessions, "rotate", faulty)
    return hits


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("fault", SERVICE_FAULTS)
async def test_failure_around_the_rotation_leaves_the_old_or_the_new_state(
    issuer: IssuerHarness, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, fault: str, point: str
) -> None:
    token, family_id = await logged_in(issuer)
    hits = around_rotate(monkeypatch, SERVICE_FAULTS[fault], after=POINTS[point])
    expected = type(SERVICE_FAULTS[fault]())
    with pytest.raises(expected):
        await issuer.services.families.rotate(token, now=clock())
    assert hits == [1]
    await assert_outcome(issuer, clock, token, family_id, committed=POINTS[point])


@pytest.mark.parametrize("point", POINTS)
async def test_cancelled_rotation_leaves_the_old_or_the_new_state(
    issuer: IssuerHarness, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """A request task cancelled mid-rotation (client gone, server shutting down), before the statement is sent or
    after it has committed."""
    token, family_id = await logged_in(issuer)
    reached = asyncio.Event()

    async def stall() -> None:
        reached.set()
        await asyncio.Event().wait()  # forever, until cancelled

    around_rotate(monkeypatch, stall, after=POINTS[point])
    task = asyncio.create_task(issuer.services.families.rotate(token, now=clock()))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_outcome(issuer, clock, token, family_id, committed=POINTS[point])


# ---------------------------------------------------------------- in the driver


def fail_statement_once(
    monkeypatch: pytest.MonkeyPatch, statement: Statement, fault: Fault, *, after: bool = False
) -> list[str]:
    """Make asyncpg raise ``fault()`` the next time it runs ``statement`` (by fetch, fetchrow or execute): before
    sending it, or once the server has run it (its answer lost). Returns the log of the faults that hit."""
    hits: list[str] = []

    def failing_version(name: str) -> Callable[..., Any]:
        original = getattr(asyncpg.Connection, name)

        async def failing(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
            if query != statement.sql or hits:
                return await original(self, query, *args, **kwargs)
            hits.append(name)
            if after:
                await original(self, query, *args, **kwargs)
            raise fault()

        return failing

    for name in ("fetch", "fetchrow", "execute"):
        monkeypatch.setattr(asyncpg.Connection, name, failing_version(name))
    return hits


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("error", DRIVER_ERRORS)
async def test_database_error_during_refresh_is_503_and_the_family_intact(
    issuer: IssuerHarness,
    clock: FakeClock,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    error: str,
    point: str,
) -> None:
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(issuer.engine, token)
    hits = fail_statement_once(monkeypatch, sessions.ROTATE, DRIVER_ERRORS[error], after=POINTS[point])

    assert_unavailable(await refresh_body(client, token))

    assert hits == ["fetchrow"]
    assert db_error_count(issuer) == 1
    await assert_outcome(issuer, clock, token, family_id, committed=POINTS[point])


async def test_a_rotation_the_driver_never_sent_is_sent_again(
    issuer: IssuerHarness, clock: FakeClock, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one write the pool sends twice: asyncpg failed before anything left (InternalClientError)."""
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(issuer.engine, token)
    hits = fail_statement_once(monkeypatch, sessions.ROTATE, lambda: asyncpg.InternalClientError("unsent"))

    response = await refresh_body(client, token)

    assert response.status_code == 200, response.text
    assert hits == ["fetchrow"]
    successor = response.json()["refresh_token"]
    assert successor == issuer.services.families.successor_of(token)
    await assert_rotated(issuer.engine, token, successor, family_id, clock())


@pytest.mark.parametrize("point", POINTS)
async def test_database_error_on_cookie_refresh_keeps_the_cookie(
    issuer: IssuerHarness, clock: FakeClock, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """A 503 neither clears nor replaces the browser's refresh cookie; the cookie it keeps still works (a replay of
    the lost successor when the rotation had committed)."""
    await register(client)
    response = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
    token = response.cookies["refresh_token"]
    family_id = await family_of(issuer.engine, token)
    fail_statement_once(monkeypatch, sessions.ROTATE, DRIVER_ERRORS["connection_lost"], after=POINTS[point])

    assert_unavailable(await refresh_cookie(client, token))

    if POINTS[point]:
        await assert_rotated(issuer.engine, token, issuer.services.families.successor_of(token), family_id, clock())
    else:
        await assert_untouched(issuer.engine, token, family_id, clock())
    retried = await refresh_cookie(client, token)
    assert retried.status_code == 200, retried.text
    assert assert_refresh_cookie(retried, 604800) == issuer.services.families.successor_of(token)
    assert await live_tokens(issuer.engine, family_id, clock()) == 1


async def test_database_error_during_logout_is_503_not_a_false_204(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register(client)
    token = (await login(client))["refresh_token"]
    family_id = await family_of(issuer.engine, token)
    fail_statement_once(monkeypatch, sessions.REVOKE_BY_TOKEN, DRIVER_ERRORS["connection_reset"])
    response = await client.post("/auth/logout", json={"refresh_token": token})
    assert_error(response, 503, "temporarily_unavailable")
    retry_after(response)
    assert "set-cookie" not in response.headers  # the cookie is not cleared for a session that was not ended
    assert (await family_row(issuer.engine, family_id)).revoked_at is None
    assert (await client.post("/auth/logout", json={"refresh_token": token})).status_code == 204
    assert (await family_row(issuer.engine, family_id)).revoked_reason == "logout"


async def test_failure_while_revoking_on_reuse_leaves_family_to_be_revoked_on_retry(
    issuer: IssuerHarness, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, families = issuer.engine, issuer.services.families
    token, family_id = await logged_in(issuer)
    successor = (await families.rotate(token, now=clock())).refresh.token
    clock.advance(3600)
    hits = fail_statement_once(monkeypatch, sessions.REVOKE, DRIVER_ERRORS["connection_reset"])
    with pytest.raises(DatabaseUnavailable):
        await families.rotate(token, now=clock())
    assert hits == ["execute"]
    assert (await family_row(engine, family_id)).revoked_at is None
    # Still detectable: the theft is caught on the next attempt.
    with pytest.raises(RefreshTokenReused):
        await families.rotate(token, now=clock())
    assert (await family_row(engine, family_id)).revoked_reason == "reuse"
    with pytest.raises(InvalidGrant):
        await families.rotate(successor, now=clock())


async def test_unexpected_error_during_refresh_is_500_json_and_family_intact(
    issuer: IssuerHarness, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with issuer.client(raise_app_exceptions=False) as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        family_id = await family_of(issuer.engine, token)
        fail_statement_once(monkeypatch, sessions.ROTATE, lambda: Injected("a bug"))
        response = await refresh_body(client, token)
        assert_error(response, 500, "server_error")
        assert "Injected" not in response.text
        assert "a bug" not in response.text
        await assert_untouched(issuer.engine, token, family_id, clock())
        assert (await refresh_body(client, token)).status_code == 200


# ---------------------------------------------------------------- on the wire


@pytest.fixture
async def proxied(make_issuer: MakeIssuer, pg_url: str) -> AsyncIterator[tuple[IssuerHarness, PostgresProxy]]:
    """The issuer talking to PostgreSQL through a proxy that can kill a connection at a chosen statement."""
    async with (
        postgres_proxy() as proxy,
        make_issuer(database_url=proxy.url(pg_url), database_listen_url=pg_url) as harness,
    ):
        yield harness, proxy


@pytest.mark.parametrize("point", POINTS)
async def test_connection_lost_around_the_rotation_statement(
    proxied: tuple[IssuerHarness, PostgresProxy], clock: FakeClock, point: str
) -> None:
    """The network dies under the rotation: before the statement reaches the server (old state), or after the
    server has committed it, before the answer arrives (new state). Either is a 503, and the client's retry with
    the same token gets the one successor."""
    harness, proxy = proxied
    async with harness.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        family_id = await family_of(harness.engine, token)
        proxy.drop_at("WITH consumed AS", after_answer=POINTS[point])

        assert_unavailable(await refresh_body(client, token))

        assert proxy.dropped == 1, "the fault never hit the rotation"
        assert db_error_count(harness) == 1
        successor = harness.services.families.successor_of(token)
        if POINTS[point]:
            await assert_rotated(harness.engine, token, successor, family_id, clock())
        else:
            await assert_untouched(harness.engine, token, family_id, clock())
        retried = await refresh_body(client, token)
        assert retried.status_code == 200, retried.text
        assert retried.json()["refresh_token"] == successor
        await assert_rotated(harness.engine, token, successor, family_id, clock())


# ---------------------------------------------------------------- in the server


async def test_statement_failing_after_the_consume_rolls_back_entirely(
    issuer: IssuerHarness, clock: FakeClock, client: httpx.AsyncClient
) -> None:
    """A real fault inside the one-statement rotation, after it has consumed the token: the successor INSERT hits
    a row already holding the successor's hash. PostgreSQL must undo the consume as well."""
    engine, families = issuer.engine, issuer.services.families
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
                user_id=(await family_row(engine, other_family)).user_id,
                issued_at=clock(),
                expires_at=clock() + timedelta(hours=1),
                consumed_at=clock(),
            )
        )

    async with issuer.client(raise_app_exceptions=False) as plain:  # a 500 is a response here, not a raise
        response = await refresh_body(plain, token)

    await assert_untouched(engine, token, family_id, clock())
    assert_unavailable(response)
    async with engine.begin() as conn:
        await conn.execute(delete(refresh_tokens).where(refresh_tokens.c.token_hash == blocker))
    retried = await refresh_body(client, token)
    assert retried.status_code == 200, retried.text
    await assert_single_chain(engine, clock())


KILL_LOCK_WAITERS = (
    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
)
LOCK_WAITERS = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"


async def _lock_waiters(engine: AsyncEngine, *, until_none: bool = False) -> int:
    """Poll (bounded) until some backend of this database waits for a lock, or with ``until_none`` until none
    does; returns how many wait at the end."""
    waiting = 0
    async with engine.connect() as watcher:
        for _ in range(500):
            waiting = (await watcher.execute(text(LOCK_WAITERS))).scalar_one()
            # pg_stat_activity is snapshotted per transaction: end it so the next poll sees fresh state.
            await watcher.rollback()
            if bool(waiting) is not until_none:
                break
            await asyncio.sleep(0.01)
    return waiting


async def test_database_connection_killed_mid_rotation(
    issuer: IssuerHarness, clock: FakeClock, client: httpx.AsyncClient
) -> None:
    """A real fault: the server process running the rotation dies after the statement consumed the token.

    Another transaction holds the family's row lock, so the statement waits in the server between its consuming
    UPDATE and its family UPDATE; that backend is then terminated (as in a crash or failover).
    """
    engine = issuer.engine
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

    assert_unavailable(response)
    await assert_untouched(engine, token, family_id, clock())
    retried = await refresh_body(client, token)
    assert retried.status_code == 200, retried.text
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


async def test_rotation_cancelled_while_waiting_for_the_row_lock(
    issuer: IssuerHarness, clock: FakeClock, client: httpx.AsyncClient
) -> None:
    """Cancel a rotation that is blocked inside PostgreSQL (as in a race when the client disconnects).

    Another transaction holds the token's row lock, so the consuming UPDATE waits in the server; the request
    task is cancelled there. The short polling below only waits for that server state to appear.
    """
    engine, families = issuer.engine, issuer.services.families
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
        # Cancellation reaches the server as a cancel request; only once it has ended the waiting statement is
        # releasing the lock a test of rollback (released earlier, the statement would simply complete).
        assert await _lock_waiters(engine, until_none=True) == 0, "the cancelled statement kept waiting in the server"
        await locker.rollback()

    await assert_untouched(engine, token, family_id, clock())
    assert (await families.rotate(token, now=clock())).refresh.token == families.successor_of(token)
    await assert_single_chain(engine, clock())


# ---------------------------------------------------------------- a deletion between the replay's reads


async def test_account_deleted_while_a_replay_is_decided(
    issuer: IssuerHarness, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace-replay path reads the token's state and then the family's user: an account deletion can commit
    between the two.

    Deterministic version of that race: the deletion commits right after the replay found the unused successor.
    The replay must then be refused as invalid_grant (not a 500, and no token for a deleted account).
    """
    engine = issuer.engine
    async with issuer.client(raise_app_exceptions=False) as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        assert (await refresh_body(client, token)).status_code == 200
        user_id = (await family_row(engine, await family_of(engine, token))).user_id
        original = sessions.inspect

        async def delete_account_meanwhile(*args: Any, **kwargs: Any) -> sessions.Presented | None:
            found = await original(*args, **kwargs)
            assert found is not None
            assert found.successor_unused, "not a replay: the race is not reached"
            async with engine.begin() as other:
                await other.execute(delete(users_table).where(users_table.c.id == user_id))
            return found

        monkeypatch.setattr(sessions, "inspect", delete_account_meanwhile)
        clock.advance(1)
        response = await refresh_body(client, token)
        assert_error(response, 401, "invalid_grant")
        monkeypatch.setattr(sessions, "inspect", original)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert await token_row(engine, token) is None, "the deleted account's sessions outlived it"
