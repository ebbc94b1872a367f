"""Per-account login back-off, kept in the database so it holds across replicas.

Failures are counted per normalized email whether or not the account exists, so a 429 never tells an
attacker which emails are registered. After ``threshold`` failures each further failure locks the
email for an exponentially growing time (1 s, 2 s, 4 s, ... capped at ``max_lock``); while locked, even
the right password is refused. A success clears the count; failures older than ``window`` are forgotten.

An attempt is counted *before* its password is checked, in the same atomic statement that checks the
lock, and stays counted as a failure unless it succeeds. Checking first and counting after the password
check would let a burst of parallel guesses (from many addresses and replicas) all pass the check before
the first failure was recorded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from issuer.errors import TooManyRequests
from issuer.storage import database as hotpath
from issuer.storage.schema import login_failures, upsert_insert


@dataclass(frozen=True)
class LockoutPolicy:
    threshold: int
    # Longer than max_lock: an attacker at the cap who waits out one lock must not find the count reset.
    window: timedelta = timedelta(hours=1)
    base_lock: timedelta = timedelta(seconds=1)
    max_lock: timedelta = timedelta(minutes=15)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def lock_for(self, failures: int) -> timedelta | None:
        over = failures - self.threshold
        if not self.enabled or over < 0:
            return None
        return min(self.max_lock, self.base_lock * (2 ** min(over, 30)))

    def lock_seconds(self) -> list[float]:
        """``lock_for`` as a table, for SQL: entry i is the lock at threshold + i failures; the last entry
        holds for every count beyond it. Empty when the lock-out is off."""
        if not self.enabled:
            return []
        table: list[float] = []
        for over in range(31):
            lock = self.lock_for(self.threshold + over)
            assert lock is not None
            table.append(lock.total_seconds())
            if lock >= self.max_lock:
                break
        return table


class LoginLockout:
    """The lock-out's steps one by one, in transactions (any database). On PostgreSQL the login counts and
    clears inside its own two statements (``login``), with :meth:`attempt` as their parameters."""

    def __init__(self, engine: AsyncEngine, policy: LockoutPolicy) -> None:
        self._engine = engine
        self._policy = policy
        self._lock_seconds = policy.lock_seconds()

    @property
    def policy(self) -> LockoutPolicy:
        return self._policy

    def attempt(self, now: datetime) -> hotpath.Attempt | None:
        """An attempt at ``now`` as ``hotpath.BEGIN_LOGIN_SQL`` counts it; None while the lock-out is off."""
        if not self._policy.enabled:
            return None
        return hotpath.Attempt(now, now - self._policy.window, self._policy.threshold, self._lock_seconds)

    async def begin_attempt(self, email: str, now: datetime) -> None:
        """Count a login attempt as a failure, or raise TooManyRequests (counting nothing) while locked."""
        if not self._policy.enabled:
            return
        # One upsert checks the lock and counts the attempt atomically: the row lock serializes concurrent
        # attempts from every replica. While locked its WHERE matches nothing, so nothing is returned.
        async with self._engine.begin() as conn:
            table = login_failures
            statement = upsert_insert(conn, table).values(
                email=email, failures=1, last_failure_at=now, locked_until=None
            )
            counted = case((table.c.last_failure_at < now - self._policy.window, 1), else_=table.c.failures + 1)
            statement = statement.on_conflict_do_update(
                index_elements=["email"],
                set_={"failures": counted, "last_failure_at": now},
                where=or_(table.c.locked_until.is_(None), table.c.locked_until <= now),
            ).returning(table.c.failures)
            failures = (await conn.execute(statement)).scalar_one_or_none()
            if failures is None:
                raise _locked(await _locked_until(conn, email), now)
            lock = self._policy.lock_for(failures)
            if lock is not None:
                await conn.execute(update(table).where(table.c.email == email).values(locked_until=now + lock))

    @contextlib.asynccontextmanager
    async def guard(self, email: str, now: datetime) -> AsyncIterator[None]:
        """Around one password check of ``email`` (login, account deletion): count the attempt first (429
        while locked), and clear the count only if the block ends without an exception."""
        await self.begin_attempt(email, now)
        yield
        await self.record_success(email)

    async def refusal(self, email: str, now: datetime) -> TooManyRequests:
        """The 429 for an attempt that ``hotpath.begin_login`` found locked (its lock read afterwards)."""
        async with self._engine.connect() as conn:
            return _locked(await _locked_until(conn, email), now)

    async def record_success(self, email: str) -> None:
        if not self._policy.enabled:
            return
        async with self._engine.begin() as conn:
            await conn.execute(delete(login_failures).where(login_failures.c.email == email))


async def _locked_until(conn: AsyncConnection, email: str) -> datetime | None:
    """The email's lock; None when its row is gone (a success on another request cleared it meanwhile)."""
    row = (await conn.execute(select(login_failures.c.locked_until).where(login_failures.c.email == email))).first()
    return None if row is None else row[0]


def _locked(until: datetime | None, now: datetime) -> TooManyRequests:
    """The 429 for a locked email; with no lock left (cleared meanwhile) the caller may retry in a second."""
    retry = 1 if until is None else max(1, math.ceil((until - now).total_seconds()))
    return TooManyRequests(retry, "Too many failed password attempts for this account; try again later.")
