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

from issuer.errors import TooManyRequests
from issuer.storage import lockout
from issuer.storage.database import Database
from issuer.storage.users import User


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
        return min(self.max_lock, self.base_lock * (1 << min(over, 30)))

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
    """The lock-out around a password check (login, account deletion), on the shared table."""

    def __init__(self, db: Database, policy: LockoutPolicy) -> None:
        self._db = db
        self._policy = policy
        self._lock_seconds = policy.lock_seconds()

    @property
    def policy(self) -> LockoutPolicy:
        return self._policy

    async def begin(self, email: str, now: datetime) -> User | None:
        """Count an attempt on ``email`` as a failure (until :meth:`clear` or a login's end clears it) and
        return its account, None for an unknown email; TooManyRequests, counting nothing, while locked."""
        attempt = None
        if self._policy.enabled:
            attempt = lockout.Attempt(now, now - self._policy.window, self._policy.threshold, self._lock_seconds)
        start = await lockout.begin_login(self._db, email, attempt)
        if start.locked:
            retry = 1 if start.locked_until is None else max(1, math.ceil((start.locked_until - now).total_seconds()))
            raise TooManyRequests(retry, "Too many failed password attempts for this account; try again later.")
        return start.user

    def clears(self, email: str) -> str | None:
        """The email whose count a successful login clears (in the statement that starts its session)."""
        return email if self._policy.enabled else None

    async def clear(self, email: str) -> None:
        if self._policy.enabled:
            await lockout.clear(self._db, email)

    @contextlib.asynccontextmanager
    async def guard(self, email: str, now: datetime) -> AsyncIterator[None]:
        """Around a password check other than login's (account deletion): count the attempt first (429 while
        locked), and clear the count only if the block ends without an exception."""
        await self.begin(email, now)
        yield
        await self.clear(email)
