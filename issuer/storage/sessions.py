"""Sessions (refresh-token families) and their refresh tokens.

A token is *live* while it is unconsumed, unexpired, and its family is neither revoked nor past its
absolute expiry: :data:`LIVE_TOKEN` is that rule, spelled once, and every statement that redeems or
judges a token uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from issuer.storage import lockout, users
from issuer.storage.database import ConstraintViolation, Executor, Row, Statement, rows_affected
from issuer.storage.users import User


@dataclass(frozen=True)
class Family:
    id: str
    user_id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    idle_expires_at: datetime
    user_agent: str | None
    ip: str | None
    revoked_at: datetime | None
    revoked_reason: str | None
    # The latest use's (the login's until the first refresh).
    last_user_agent: str | None = None
    last_ip: str | None = None


@dataclass(frozen=True)
class Presented:
    """What the database knows of a refresh token that could not be redeemed (see :func:`inspect`)."""

    family_id: str
    user_id: str
    consumed_at: datetime | None
    family_ended: bool
    # The token's successor (derived from the token), if it was issued, and whether it is still unused.
    successor_expires_at: datetime | None
    successor_unused: bool


class UserGone(Exception):
    """The session's user no longer exists (deleted while its login was being checked)."""


_FAMILY_COLUMNS = (
    "f.id, f.user_id, f.created_at, f.last_used_at, f.expires_at, f.idle_expires_at, f.user_agent, f.ip, "
    "f.revoked_at, f.revoked_reason, f.last_user_agent, f.last_ip"
)


def _family_live(alias: str) -> str:
    """SQL: the family row ``alias`` is neither revoked nor past its absolute expiry at ``$2`` (now)."""
    return f"{alias}.revoked_at IS NULL AND {alias}.expires_at > $2"


_LIVE_FAMILY = _family_live("f")
# The refresh_tokens row ``t`` can be redeemed at ``$2``.
LIVE_TOKEN = (
    "t.consumed_at IS NULL AND t.expires_at > $2 AND EXISTS "
    f"(SELECT 1 FROM refresh_families AS live WHERE live.id = t.family_id AND {_family_live('live')})"
)


# SQL: the refresh_tokens row ``t`` belongs to the user the presented token names (the parameter ``{route}``;
# NULL for a token from before routes, issuer.sessions.tokens). On one PostgreSQL the hash alone finds the row;
# the user is what a distributed one routes the statement by (docs/scaling.md).
_ROUTED = "({route}::text IS NULL OR t.user_id = {route}::text)"


def _family(row: Row) -> Family:
    return Family(
        id=row["id"],
        user_id=row["user_id"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        idle_expires_at=row["idle_expires_at"],
        user_agent=row["user_agent"],
        ip=row["ip"],
        revoked_at=row["revoked_at"],
        revoked_reason=row["revoked_reason"],
        last_user_agent=row["last_user_agent"],
        last_ip=row["last_ip"],
    )


# A new family, its first token (which expires at the family's idle expiry) and the first entry of its trail.
# The family row is inserted inside WITH, so the foreign keys of the others hold when they are checked at the
# end of the statement. Parameters: the family's columns in table order ($1 to $8), then the token's hash ($9).
_START = """family AS (
    INSERT INTO refresh_families
        (id, user_id, created_at, last_used_at, expires_at, idle_expires_at, user_agent, ip, last_user_agent, last_ip)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $8)
), trail AS (
    INSERT INTO session_uses (family_id, user_id, used_at, ip, user_agent) VALUES ($1, $2, $3, $8, $7)
)
INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at, consumed_at)
VALUES ($9, $1, $2, $3, $6, NULL)
"""
START = Statement("WITH " + _START)
# The same, ending a login: the email's failed-attempt count ($10) is cleared in the same commit.
START_AFTER_LOGIN = Statement(f"WITH cleared AS ({lockout.clear_failures_sql('$10')}), " + _START)

# How many of a session's latest uses a refresh is compared with (issuer.sessions.binding).
RECENT_USES = 5
# SQL: the latest RECENT_USES uses of the family ``{family}``, newest first, as an array of [ip, user agent].
# Cast to text: asyncpg decodes text[] with its built-in codec, but has to look varchar[] up in the catalog,
# three round trips on every use where its statement cache is off (behind a transaction pooler).
_RECENT_USES = (
    "ARRAY(SELECT ARRAY[r.ip::text, r.user_agent::text] FROM session_uses AS r "
    f"WHERE r.family_id = {{family}} ORDER BY r.used_at DESC LIMIT {RECENT_USES})"
)

# The rotation, in one statement. ``consumed`` is the race arbiter: under READ COMMITTED, of N concurrent
# callers with one token the row lock lets exactly one see the token live; the others re-check the row after
# it commits and match nothing. ``touched`` re-checks ``revoked_at`` under the family's row lock, so a
# revocation that commits mid-statement wins: the token is consumed, no successor is issued, and no row
# comes back. The same statement extends the refresh trail and returns the session's recent uses as they
# were before this one (a statement does not see its own writes). Parameters: $1 presented hash, $2 now,
# $3 successor hash, $4 now + refresh TTL, $5 client IP, $6 user agent, $7 the token's route (its user).
ROTATE = Statement(
    f"""
WITH consumed AS (
    UPDATE refresh_tokens AS t
    SET consumed_at = $2
    WHERE t.token_hash = $1 AND {_ROUTED.format(route="$7")} AND {LIVE_TOKEN}
    RETURNING t.family_id
), touched AS (
    UPDATE refresh_families AS f
    SET last_used_at = $2, idle_expires_at = LEAST($4, f.expires_at), last_ip = $5, last_user_agent = $6
    FROM consumed
    WHERE f.id = consumed.family_id AND f.revoked_at IS NULL
    RETURNING f.id, f.user_id, f.idle_expires_at
), successor AS (
    INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at, consumed_at)
    SELECT $3, touched.id, touched.user_id, $2, touched.idle_expires_at, NULL FROM touched
    RETURNING family_id, expires_at
), trail AS (
    INSERT INTO session_uses (family_id, user_id, used_at, ip, user_agent)
    SELECT touched.id, touched.user_id, $2, $5, $6 FROM touched
)
SELECT successor.family_id, successor.expires_at, {users.COLUMNS},
       {_RECENT_USES.format(family="successor.family_id")} AS recent
FROM successor
JOIN touched ON touched.id = successor.family_id
JOIN users AS u ON u.id = touched.user_id
"""
)
# Why a token could not be redeemed: the token, its family, and its successor ($3) if that was issued.
INSPECT = Statement(
    f"""
SELECT f.id AS family_id, f.user_id, t.consumed_at, NOT ({_LIVE_FAMILY}) AS family_ended,
       s.expires_at AS successor_expires_at, (s.consumed_at IS NULL AND s.expires_at > $2) AS successor_unused
FROM refresh_tokens AS t
JOIN refresh_families AS f ON f.id = t.family_id
LEFT JOIN refresh_tokens AS s ON s.token_hash = $3 AND s.family_id = t.family_id
WHERE t.token_hash = $1 AND {_ROUTED.format(route="$4")}
""",
    retry_safe=True,
)
# The family's user, if the family is live, with its recent uses: one statement, so one snapshot. A
# logout-all (which bumps the version and revokes the families in one statement) is seen entirely or not at
# all; reading the family and then the user could pair "not revoked" with the new tokenVersion and mint a
# token that survives it.
USER_OF_LIVE_FAMILY = Statement(
    f"SELECT {users.COLUMNS}, {_RECENT_USES.format(family='f.id')} AS recent "
    f"FROM refresh_families AS f JOIN users AS u ON u.id = f.user_id WHERE f.id = $1 AND {_LIVE_FAMILY}",
    retry_safe=True,
)
# A live token's family and user, changing nothing (introspection must never consume a token).
LIVE_TOKEN_OWNER = Statement(
    f"SELECT t.family_id, t.issued_at, t.expires_at, {users.COLUMNS} FROM refresh_tokens AS t "
    f"JOIN refresh_families AS f ON f.id = t.family_id JOIN users AS u ON u.id = f.user_id "
    f"WHERE t.token_hash = $1 AND {_ROUTED.format(route='$3')} AND {LIVE_TOKEN}",
    retry_safe=True,
)
REVOKE = Statement(
    "UPDATE refresh_families SET revoked_at = $2, revoked_reason = $3 WHERE id = $1 AND revoked_at IS NULL"
)
# The family of a token, whatever state the token is in; the row comes back whether or not this call
# revoked it (``revoked`` says which).
REVOKE_BY_TOKEN = Statement(
    f"""
WITH target AS (
    SELECT f.id, f.user_id FROM refresh_tokens AS t JOIN refresh_families AS f ON f.id = t.family_id
    WHERE t.token_hash = $1 AND {_ROUTED.format(route="$4")}
), revoked AS (
    UPDATE refresh_families SET revoked_at = $2, revoked_reason = $3
    WHERE id = (SELECT id FROM target) AND revoked_at IS NULL
    RETURNING id
)
SELECT target.id AS family_id, target.user_id, EXISTS (SELECT 1 FROM revoked) AS revoked FROM target
"""
)
# One of the user's own families ($2); someone else's comes back as no row, like a missing one.
REVOKE_OWN = Statement(
    """
WITH target AS (
    SELECT id FROM refresh_families WHERE id = $1::text AND user_id = $2
), revoked AS (
    UPDATE refresh_families SET revoked_at = $3, revoked_reason = $4
    WHERE id = (SELECT id FROM target) AND revoked_at IS NULL
    RETURNING id
)
SELECT target.id, EXISTS (SELECT 1 FROM revoked) AS revoked FROM target
"""
)
ACTIVE = Statement(
    f"SELECT {_FAMILY_COLUMNS} FROM refresh_families AS f "
    f"WHERE f.user_id = $1 AND {_LIVE_FAMILY} AND f.idle_expires_at > $2 ORDER BY f.last_used_at DESC, f.id",
    retry_safe=True,
)


async def start(db: Executor, family: Family, token_hash: bytes, *, clear_failures_of: str | None = None) -> None:
    """Store a new family and its first token (and clear ``clear_failures_of``'s failed logins), at once.

    Raises :class:`UserGone` (nothing written) when the user no longer exists.
    """
    args = (
        family.id,
        family.user_id,
        family.created_at,
        family.last_used_at,
        family.expires_at,
        family.idle_expires_at,
        family.user_agent,
        family.ip,
        token_hash,
    )
    try:
        if clear_failures_of is None:
            await db.execute(START, *args)
        else:
            await db.execute(START_AFTER_LOGIN, *args, clear_failures_of)
    except ConstraintViolation as exc:
        if exc.constraint == "fk_refresh_families_user_id_users":
            raise UserGone(family.user_id) from exc
        raise


class Use(NamedTuple):
    """One entry of a session's refresh trail."""

    ip: str | None
    user_agent: str | None


class Rotated(NamedTuple):
    family_id: str
    expires_at: datetime
    user: User
    # The session's latest uses before this one, newest first (at most RECENT_USES).
    recent: tuple[Use, ...]


async def rotate(
    db: Executor,
    presented_hash: bytes,
    successor_hash: bytes,
    now: datetime,
    longest: datetime,
    *,
    ip: str | None = None,
    user_agent: str | None = None,
    route: str | None = None,
) -> Rotated | None:
    """Consume a live token, insert its successor (expiring at ``longest`` or the family's end) and record the
    use; None when the token was not live."""
    row = await db.fetchrow(ROTATE, presented_hash, now, successor_hash, longest, ip, user_agent, route)
    if row is None:
        return None
    return Rotated(row["family_id"], row["expires_at"], users.from_row(row), _uses(row["recent"]))


async def inspect(
    db: Executor, presented_hash: bytes, successor_hash: bytes, now: datetime, *, route: str | None = None
) -> Presented | None:
    row = await db.fetchrow(INSPECT, presented_hash, now, successor_hash, route)
    if row is None:
        return None
    return Presented(
        family_id=row["family_id"],
        user_id=row["user_id"],
        consumed_at=row["consumed_at"],
        family_ended=row["family_ended"],
        successor_expires_at=row["successor_expires_at"],
        successor_unused=bool(row["successor_unused"]),
    )


class LiveFamily(NamedTuple):
    user: User
    # The session's latest uses, newest first (at most RECENT_USES).
    recent: tuple[Use, ...]


async def user_of_live_family(db: Executor, family_id: str, now: datetime) -> LiveFamily | None:
    row = await db.fetchrow(USER_OF_LIVE_FAMILY, family_id, now)
    return None if row is None else LiveFamily(users.from_row(row), _uses(row["recent"]))


def _uses(recent: list[list[str | None]]) -> tuple[Use, ...]:
    return tuple(Use(entry[0], entry[1]) for entry in recent)


@dataclass(frozen=True)
class LiveToken:
    family_id: str
    issued_at: datetime
    expires_at: datetime
    user: User


async def live_token_owner(
    db: Executor, token_hash: bytes, now: datetime, *, route: str | None = None
) -> LiveToken | None:
    """The family and user of a token that could be redeemed at ``now``; None otherwise."""
    row = await db.fetchrow(LIVE_TOKEN_OWNER, token_hash, now, route)
    if row is None:
        return None
    return LiveToken(row["family_id"], row["issued_at"], row["expires_at"], users.from_row(row))


async def revoke(db: Executor, family_id: str, now: datetime, reason: str) -> bool:
    """Revoke a family unless it already is; True when this call did it."""
    return rows_affected(await db.execute(REVOKE, family_id, now, reason)) == 1


@dataclass(frozen=True)
class Revoked:
    """A family found by a revoking statement; ``by_this_call`` is False when it had been revoked before."""

    family_id: str
    user_id: str
    by_this_call: bool


async def revoke_by_token(
    db: Executor, token_hash: bytes, now: datetime, reason: str, *, route: str | None = None
) -> Revoked | None:
    """Revoke the family of a token, whatever state the token is in; None for an unknown token."""
    row = await db.fetchrow(REVOKE_BY_TOKEN, token_hash, now, reason, route)
    return None if row is None else Revoked(row["family_id"], row["user_id"], row["revoked"])


async def revoke_own(db: Executor, user_id: str, family_id: str, now: datetime, reason: str) -> Revoked | None:
    """Revoke one of the user's families; None when the user has no family with that id."""
    row = await db.fetchrow(REVOKE_OWN, family_id, user_id, now, reason)
    return None if row is None else Revoked(row["id"], user_id, row["revoked"])


async def active(db: Executor, user_id: str, now: datetime) -> list[Family]:
    """The user's sessions that can still be refreshed, most recently used first."""
    return [_family(row) for row in await db.fetch(ACTIVE, user_id, now)]
