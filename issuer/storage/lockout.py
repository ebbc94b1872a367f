"""Failed-login counts per email, and the locks they call for (the rules are ``issuer.accounts.lockout``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from issuer.storage import users
from issuer.storage.database import Executor, Statement
from issuer.storage.users import User


@dataclass(frozen=True)
class Attempt:
    """A login attempt as :data:`BEGIN_LOGIN` counts it: at ``now``, forgetting failures before
    ``window_start``; ``lock_seconds[i]`` is the lock at ``threshold + i`` failures (the last entry holds
    beyond)."""

    now: datetime
    window_start: datetime
    threshold: int
    lock_seconds: list[float]


@dataclass(frozen=True)
class LoginStart:
    """What :func:`begin_login` found: the account (None for an unknown email) and, while the email is
    locked, until when (the attempt was then not counted)."""

    user: User | None
    locked: bool
    locked_until: datetime | None


def clear_failures_sql(email: str) -> str:
    """SQL that forgets the failures of the email in parameter ``email`` (e.g. ``"$1"``): after a success."""
    return f"DELETE FROM login_failures WHERE email = {email}"


# ``attempt`` counts a login attempt unless the email is locked, and sets the lock that the new count calls
# for, in one upsert: concurrent attempts on one email (from any replica) queue on its row lock, and each
# sees the lock set by the one before. While locked the WHERE matches nothing and no row comes back.
# Parameters: $1 email, $2 now, $3 window start, $4 threshold, $5 lock seconds.
_COUNTED = "(CASE WHEN lf.last_failure_at < $3 THEN 1 ELSE lf.failures + 1 END)"  # the stored row's new count


def _lock_after(failures: str) -> str:
    """SQL for the lock that ``failures`` calls for (NULL below the threshold), from the policy's table."""
    over = f"LEAST({failures} - $4, cardinality($5::float8[]) - 1)"
    return f"CASE WHEN {failures} >= $4 THEN $2::timestamptz + make_interval(secs => ($5::float8[])[{over} + 1]) END"


# The outer SELECT always yields one row: the attempt's new count (NULL while locked), the lock as it stood
# before this statement, and the account (NULL columns for an unknown email). A data-modifying WITH runs
# exactly once, however the query reads it.
BEGIN_LOGIN = Statement(
    f"""
WITH attempt AS (
    INSERT INTO login_failures AS lf (email, failures, last_failure_at, locked_until)
    VALUES ($1, 1, $2, {_lock_after("1")})
    ON CONFLICT (email) DO UPDATE
    SET failures = {_COUNTED}, last_failure_at = $2, locked_until = {_lock_after(_COUNTED)}
    WHERE lf.locked_until IS NULL OR lf.locked_until <= $2
    RETURNING lf.failures
)
SELECT (SELECT failures FROM attempt) AS failures, lock.locked_until, {users.COLUMNS}
FROM (VALUES (1)) AS one
LEFT JOIN users AS u ON u.email = $1
LEFT JOIN login_failures AS lock ON lock.email = $1
"""
)
CLEAR = Statement(clear_failures_sql("$1"))


async def begin_login(db: Executor, email: str, attempt: Attempt | None) -> LoginStart:
    """Count the attempt (``attempt`` None: the lock-out is off, only read the account)."""
    if attempt is None:
        return LoginStart(await users.by_email(db, email), locked=False, locked_until=None)
    args = (attempt.now, attempt.window_start, attempt.threshold, attempt.lock_seconds)
    row = await db.fetchrow(BEGIN_LOGIN, email, *args)
    assert row is not None  # the outer SELECT always yields one row
    user = None if row["id"] is None else users.from_row(row)
    locked = row["failures"] is None
    return LoginStart(user, locked, row["locked_until"] if locked else None)


async def clear(db: Executor, email: str) -> None:
    await db.execute(CLEAR, email)
