"""issuer.storage.lockout on PostgreSQL: ``begin_login`` counts an attempt and reads the account in one
statement, sets the lock the policy's table calls for, and while locked counts nothing and returns the lock.

The expected locks come from ``LockoutPolicy.lock_for`` (Python), the statement gets ``lock_seconds()`` (the
same policy as a table): the two must agree at every count, including beyond the table's end.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.accounts.lockout import LockoutPolicy
from issuer.storage import lockout
from issuer.storage.database import Database
from issuer.storage.lockout import Attempt, LoginStart
from issuer.storage.schema import login_failures
from tests.storage.conftest import NOW, Recorder, all_at_once, new_user, pool, snapshot

SECOND = timedelta(seconds=1)
POLICY = LockoutPolicy(threshold=3)


def attempt(now: datetime, policy: LockoutPolicy = POLICY) -> Attempt:
    return Attempt(now, now - policy.window, policy.threshold, policy.lock_seconds())


async def stored(engine: AsyncEngine, email: str) -> tuple[int, datetime, datetime | None] | None:
    """(failures, last_failure_at, locked_until) of the email's row, None without one."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    login_failures.c.failures, login_failures.c.last_failure_at, login_failures.c.locked_until
                ).where(login_failures.c.email == email)
            )
        ).one_or_none()
    return None if row is None else (row.failures, row.last_failure_at, row.locked_until)


async def test_without_an_attempt_it_only_reads_the_account(db: Database, engine: AsyncEngine) -> None:
    """The lock-out is off: nothing is counted, nothing is locked."""
    user = await new_user(db)
    before = await snapshot(engine)
    assert await lockout.begin_login(db, user.email, None) == LoginStart(user, locked=False, locked_until=None)
    assert await lockout.begin_login(db, "nobody@example.com", None) == LoginStart(None, False, None)
    assert await snapshot(engine) == before


async def test_an_attempt_is_counted_and_the_account_read_in_one_statement(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    recorder = Recorder(db)
    assert await lockout.begin_login(recorder, user.email, attempt(NOW)) == LoginStart(user, False, None)
    assert len(recorder.sent) == 1
    assert await stored(engine, user.email) == (1, NOW, None)


async def test_an_unknown_email_is_counted_like_a_known_one(db: Database, engine: AsyncEngine) -> None:
    """A 429 must not tell which emails have accounts: the count and the lock do not depend on it."""
    user = await new_user(db)
    for n in range(POLICY.threshold):
        known = await lockout.begin_login(db, user.email, attempt(NOW))
        unknown = await lockout.begin_login(db, "nobody@example.com", attempt(NOW))
        assert (known.user, unknown.user) == (user, None)
        assert (known.locked, unknown.locked) == (False, False)
        assert await stored(engine, user.email) == await stored(engine, "nobody@example.com")
        assert (await stored(engine, user.email) or (0,))[0] == n + 1
    assert (await lockout.begin_login(db, "nobody@example.com", attempt(NOW))).locked


async def test_counts_and_locks_as_the_policy_table_says(db: Database, engine: AsyncEngine) -> None:
    """Every attempt made once the previous lock has run out is counted, and the count sets the policy's lock
    for it: none below the threshold, then 1 s, 2 s, 4 s, ... up to the cap, which then holds."""
    policy = LockoutPolicy(threshold=2)
    assert len(policy.lock_seconds()) < 16  # the loop below runs past the table's last entry
    user = await new_user(db)
    now = NOW
    for failures in range(1, policy.threshold + 16):
        start = await lockout.begin_login(db, user.email, attempt(now, policy))
        assert start == LoginStart(user, locked=False, locked_until=None), failures
        lock = policy.lock_for(failures)
        expected_until = None if lock is None else now + lock
        assert await stored(engine, user.email) == (failures, now, expected_until), failures
        now = expected_until or now + SECOND  # exactly when the lock ends: no longer locked
    assert policy.lock_for(policy.threshold + 15) == policy.max_lock


async def test_while_locked_nothing_is_counted_and_the_lock_comes_back(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    for _ in range(POLICY.threshold):
        await lockout.begin_login(db, user.email, attempt(NOW))
    until = NOW + SECOND  # POLICY's first lock
    assert await stored(engine, user.email) == (POLICY.threshold, NOW, until)

    for now in (NOW, until - timedelta(microseconds=1)):
        recorder = Recorder(db)
        start = await lockout.begin_login(recorder, user.email, attempt(now))
        assert start == LoginStart(user, locked=True, locked_until=until), now
        assert len(recorder.sent) == 1
        assert await stored(engine, user.email) == (POLICY.threshold, NOW, until)

    # At the lock's end the next attempt is counted again (and locks for twice as long).
    assert await lockout.begin_login(db, user.email, attempt(until)) == LoginStart(user, False, None)
    assert await stored(engine, user.email) == (POLICY.threshold + 1, until, until + 2 * SECOND)


async def test_failures_older_than_the_window_are_forgotten(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    for _ in range(POLICY.threshold - 1):
        await lockout.begin_login(db, user.email, attempt(NOW))
    at_window_end = NOW + POLICY.window  # the last failure is exactly at the window's start: still counted
    await lockout.begin_login(db, user.email, attempt(at_window_end))
    assert await stored(engine, user.email) == (POLICY.threshold, at_window_end, at_window_end + SECOND)
    later = at_window_end + POLICY.window + SECOND
    assert await lockout.begin_login(db, user.email, attempt(later)) == LoginStart(user, False, None)
    assert await stored(engine, user.email) == (1, later, None)


async def test_a_burst_of_parallel_attempts_counts_exactly_up_to_the_lock(pg_url: str, engine: AsyncEngine) -> None:
    """Concurrent attempts on one email queue on its row: exactly up to ``threshold`` are counted, every
    other one sees the lock. Checking first and counting afterwards would let them all through."""
    async with pool(pg_url, 8) as db:
        user = await new_user(db)
        await lockout.begin_login(db, user.email, attempt(NOW))
        starts = await all_at_once(
            engine,
            login_failures,
            login_failures.c.email == user.email,
            lambda: lockout.begin_login(db, user.email, attempt(NOW)),
            8,
        )
    assert [s.locked for s in starts].count(False) == POLICY.threshold - 1
    # A refused attempt reports the lock as its statement's snapshot saw it: one that queued behind the attempt
    # that set the lock may not see it yet (None: the caller then answers Retry-After 1), never another lock.
    assert {s.locked_until for s in starts if s.locked} <= {NOW + SECOND, None}
    assert await stored(engine, user.email) == (POLICY.threshold, NOW, NOW + SECOND)


async def test_clear_forgets_one_emails_failures(db: Database, engine: AsyncEngine) -> None:
    for email in ("a@example.com", "b@example.com"):
        for _ in range(POLICY.threshold):
            await lockout.begin_login(db, email, attempt(NOW))
    await lockout.clear(db, "a@example.com")
    assert await stored(engine, "a@example.com") is None
    assert await stored(engine, "b@example.com") == (POLICY.threshold, NOW, NOW + SECOND)
    assert await lockout.begin_login(db, "a@example.com", attempt(NOW)) == LoginStart(None, False, None)
    assert (await lockout.begin_login(db, "b@example.com", attempt(NOW))).locked
    await lockout.clear(db, "nobody@example.com")  # no row: not an error
