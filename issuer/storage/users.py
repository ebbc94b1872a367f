"""Accounts: insert, read (one at a time or many at once), update the password hash, log out everywhere,
delete."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from issuer.storage.database import ConstraintViolation, Executor, Row, Statement, rows_affected


@dataclass(frozen=True)
class User:
    id: str
    email: str
    password_hash: str
    role: str
    token_version: int


class DuplicateEmail(Exception):
    """Another account already has this (normalized) email."""


# The columns every statement that returns a user selects, under these names (``from_row`` reads them).
COLUMNS = "u.id, u.email, u.password_hash, u.role, u.token_version"


def from_row(row: Row) -> User:
    return User(row["id"], row["email"], row["password_hash"], row["role"], row["token_version"])


INSERT = Statement(
    "INSERT INTO users (id, email, password_hash, role, token_version, created_at) VALUES ($1, $2, $3, $4, $5, $6)"
)
BY_EMAIL = Statement(f"SELECT {COLUMNS} FROM users AS u WHERE u.email = $1", retry_safe=True)
# Every user in ``$1`` in one statement: concurrent Bearer calls share one read (``issuer.access.user_lookup``).
BY_IDS = Statement(f"SELECT {COLUMNS} FROM users AS u WHERE u.id = ANY($1::text[])", retry_safe=True)
# Only if the hash is still the one that was verified: a concurrent password change wins.
SET_PASSWORD_HASH = Statement("UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2")
# Logout-all: the version goes up (tokens below it are refused) and every live session is revoked, in one
# statement, so no reader ever sees one without the other. Returns the new version.
LOG_OUT_EVERYWHERE = Statement(
    """
WITH revoked AS (
    UPDATE refresh_families SET revoked_at = $2, revoked_reason = $3
    WHERE user_id = $1 AND revoked_at IS NULL
)
UPDATE users SET token_version = token_version + 1 WHERE id = $1 RETURNING token_version
"""
)
# Sessions and refresh tokens go with the user (ON DELETE CASCADE).
DELETE = Statement("DELETE FROM users WHERE id = $1")


async def insert(db: Executor, user: User, now: datetime) -> None:
    try:
        await db.execute(INSERT, user.id, user.email, user.password_hash, user.role, user.token_version, now)
    except ConstraintViolation as exc:
        raise DuplicateEmail(user.email) from exc


async def by_email(db: Executor, email: str) -> User | None:
    row = await db.fetchrow(BY_EMAIL, email)
    return None if row is None else from_row(row)


async def by_ids(db: Executor, user_ids: list[str]) -> dict[str, User]:
    return {user.id: user for user in map(from_row, await db.fetch(BY_IDS, user_ids))}


async def set_password_hash(db: Executor, user_id: str, old_hash: str, new_hash: str) -> None:
    await db.execute(SET_PASSWORD_HASH, user_id, old_hash, new_hash)


async def log_out_everywhere(db: Executor, user_id: str, now: datetime, *, reason: str = "logout_all") -> int | None:
    """Bump the user's token version and revoke all their sessions; the new version, None if no such user."""
    row = await db.fetchrow(LOG_OUT_EVERYWHERE, user_id, now, reason)
    return None if row is None else int(row["token_version"])


async def delete(db: Executor, user_id: str) -> bool:
    """Delete the user with their sessions; False when there was no such user."""
    return rows_affected(await db.execute(DELETE, user_id)) == 1
