"""issuer.storage.sessions on PostgreSQL: starting a session, the one-statement rotation and its race rules,
why a token was refused (inspect), revocation in its three forms, and the active-session list.

A token is live while it is unconsumed, unexpired, and its family is neither revoked nor past its absolute
expiry (``LIVE_TOKEN``); expiry instants are exclusive everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage import sessions
from issuer.storage import users as storage_users
from issuer.storage.database import ConstraintViolation, Database, DatabaseUnavailable
from issuer.storage.schema import families, login_failures, refresh_tokens
from issuer.storage.sessions import UserGone
from issuer.storage.users import User
from tests.storage.conftest import (
    HOUR,
    NOW,
    Recorder,
    a_family,
    a_token,
    add_token,
    all_at_once,
    new_session,
    new_user,
    pool,
    snapshot,
    wait_until_blocked,
)
from tests.support.families import assert_single_chain, family_row, row_count, sha256, token_count, token_row

SECOND = timedelta(seconds=1)

# ---------------------------------------------------------------- start


async def test_start_stores_the_family_and_its_first_token_in_one_statement(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    family = a_family(user.id, idle=2 * HOUR)
    token = a_token()
    recorder = Recorder(db)
    await sessions.start(recorder, family, sha256(token))
    assert len(recorder.sent) == 1

    row = await family_row(engine, family.id)
    assert tuple(row) == (
        family.id,
        user.id,
        family.created_at,
        family.last_used_at,
        family.expires_at,
        family.idle_expires_at,
        family.user_agent,
        family.ip,
        None,
        None,
        family.user_agent,  # the latest use is the login, until the first refresh
        family.ip,
    )
    first = await token_row(engine, token)
    assert first is not None
    assert (first.family_id, first.issued_at, first.expires_at, first.consumed_at) == (
        family.id,
        family.created_at,
        family.idle_expires_at,  # the first token lives until the family's idle expiry
        None,
    )
    assert await token_count(engine, family.id) == 1


async def _failure_counts(engine: AsyncEngine, *emails: str) -> None:
    async with engine.begin() as conn:
        for email in emails:
            await conn.execute(insert(login_failures).values(email=email, failures=2, last_failure_at=NOW))


async def test_start_after_a_login_clears_that_emails_failures_in_the_same_statement(
    db: Database, engine: AsyncEngine
) -> None:
    user = await new_user(db)
    await _failure_counts(engine, user.email, "someone-else@example.com")
    recorder = Recorder(db)
    await sessions.start(recorder, a_family(user.id), sha256(a_token()), clear_failures_of=user.email)
    assert len(recorder.sent) == 1
    assert await row_count(engine, login_failures, login_failures.c.email == user.email) == 0
    assert await row_count(engine, login_failures, login_failures.c.email == "someone-else@example.com") == 1


@pytest.mark.parametrize("after_login", [False, True])
async def test_start_for_a_missing_user_raises_user_gone_and_writes_nothing(
    db: Database, engine: AsyncEngine, after_login: bool
) -> None:
    """The user was deleted while their password was checked: no orphan session, and the failed-login count
    the login would have cleared stays (the statement did nothing at all)."""
    user = await new_user(db)
    await _failure_counts(engine, user.email)
    await storage_users.delete(db, user.id)
    before = await snapshot(engine)
    family = a_family(user.id)
    with pytest.raises(UserGone):
        await sessions.start(db, family, sha256(a_token()), clear_failures_of=user.email if after_login else None)
    assert await snapshot(engine) == before


async def test_start_with_a_taken_token_hash_is_not_user_gone_and_writes_nothing(
    db: Database, engine: AsyncEngine
) -> None:
    """Only the user's foreign key means UserGone; any other violation is not disguised as one."""
    user = await new_user(db)
    session = await new_session(db, user.id)
    before = await snapshot(engine)
    with pytest.raises(ConstraintViolation) as refused:
        await sessions.start(db, a_family(user.id), session.token_hash)
    assert not isinstance(refused.value, UserGone)
    assert await snapshot(engine) == before


# ---------------------------------------------------------------- rotate


async def test_rotate_consumes_exactly_the_presented_token_and_issues_its_successor(
    db: Database, engine: AsyncEngine
) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    await new_session(db, user.id)  # another session of the same user: untouched
    older = await add_token(engine, session.family.id, consumed=NOW - SECOND)  # an older link of the chain
    await storage_users.set_password_hash(db, user.id, user.password_hash, "$argon2id$changed")
    successor = a_token()
    now = NOW + 10 * SECOND
    before = await snapshot(engine)

    recorder = Recorder(db)
    won = await sessions.rotate(recorder, session.token_hash, sha256(successor), now, now + HOUR)
    assert len(recorder.sent) == 1  # the whole rotation is one statement

    # The user as stored now, read in the same statement.
    assert won is not None
    assert won[:3] == (session.family.id, now + HOUR, replace(user, password_hash="$argon2id$changed"))
    presented = await token_row(engine, session.token)
    assert presented is not None
    assert presented.consumed_at == now
    issued = await token_row(engine, successor)
    assert issued is not None
    assert (issued.family_id, issued.issued_at, issued.expires_at, issued.consumed_at) == (
        session.family.id,
        now,
        now + HOUR,
        None,
    )
    family = await family_row(engine, session.family.id)
    assert (family.last_used_at, family.idle_expires_at, family.expires_at) == (
        now,
        now + HOUR,
        session.family.expires_at,
    )
    # Nothing else changed: one token consumed, one inserted, one family touched, one use on its trail.
    after = await snapshot(engine)
    changed = {
        (table, key)
        for table in after
        for key in after[table].keys() | before[table].keys()
        if after[table].get(key) != before[table].get(key)
    }
    use = (session.family.id, user.id, now, None, None)  # this call named no client address or agent
    assert changed == {
        ("refresh_tokens", session.token_hash),
        ("refresh_tokens", sha256(successor)),
        ("refresh_families", session.family.id),
        ("session_uses", use),
    }
    assert (await token_row(engine, older)) is not None
    await assert_single_chain(engine, now)


async def test_rotate_never_extends_the_session_past_its_end(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id, ttl=2 * HOUR, idle=2 * HOUR)
    now = NOW + 90 * timedelta(minutes=1)
    won = await sessions.rotate(db, session.token_hash, sha256(a_token()), now, now + HOUR)
    assert won is not None
    assert won[1] == session.family.expires_at
    assert (await family_row(engine, session.family.id)).idle_expires_at == session.family.expires_at


@dataclass(frozen=True)
class Presentation:
    token_hash: bytes
    now: datetime


Setup = Callable[[Database, AsyncEngine, User], Awaitable[Presentation]]


async def _consumed(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    session = await new_session(db, user.id)
    assert await sessions.rotate(db, session.token_hash, sha256(a_token()), NOW, NOW + HOUR) is not None
    return Presentation(session.token_hash, NOW + SECOND)


async def _at_its_expiry(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    session = await new_session(db, user.id, idle=HOUR)
    return Presentation(session.token_hash, NOW + HOUR)


async def _expired_long_ago(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    session = await new_session(db, user.id, idle=HOUR)
    return Presentation(session.token_hash, NOW + 24 * HOUR)


async def _just_before_its_expiry(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    session = await new_session(db, user.id, idle=HOUR)
    return Presentation(session.token_hash, NOW + HOUR - timedelta(microseconds=1))


async def _of_a_revoked_family(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    session = await new_session(db, user.id)
    assert await sessions.revoke(db, session.family.id, NOW, "reuse")
    return Presentation(session.token_hash, NOW)


async def _outliving_its_family(engine: AsyncEngine, db: Database, user: User, offset: timedelta) -> Presentation:
    """A token that (wrongly) expires after its family's end, presented ``offset`` after that end."""
    session = await new_session(db, user.id, ttl=HOUR, idle=HOUR)
    token = await add_token(engine, session.family.id, expires=NOW + 2 * HOUR)
    return Presentation(sha256(token), session.family.expires_at + offset)


async def _at_the_family_end(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    return await _outliving_its_family(engine, db, user, timedelta(0))


async def _after_the_family_end(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    return await _outliving_its_family(engine, db, user, timedelta(minutes=1))


async def _just_before_the_family_end(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    return await _outliving_its_family(engine, db, user, -SECOND)


async def _unknown(db: Database, engine: AsyncEngine, user: User) -> Presentation:
    await new_session(db, user.id)
    return Presentation(sha256(a_token()), NOW)


NOT_LIVE: dict[str, Setup] = {
    "consumed": _consumed,
    "at its expiry": _at_its_expiry,
    "expired long ago": _expired_long_ago,
    "of a revoked family": _of_a_revoked_family,
    "at the family's end": _at_the_family_end,
    "after the family's end": _after_the_family_end,
    "unknown": _unknown,
}
LIVE: dict[str, Setup] = {
    "just before its expiry": _just_before_its_expiry,
    "just before the family's end": _just_before_the_family_end,
}


@pytest.mark.parametrize("case", NOT_LIVE)
async def test_rotate_refuses_a_token_that_is_not_live_and_writes_nothing(
    db: Database, engine: AsyncEngine, case: str
) -> None:
    user = await new_user(db)
    presented = await NOT_LIVE[case](db, engine, user)
    before = await snapshot(engine)
    assert await sessions.rotate(db, presented.token_hash, sha256(a_token()), presented.now, NOW + 48 * HOUR) is None
    # Not consumed (a consumed one keeps its first consumption's time), no successor, no family touched.
    assert await snapshot(engine) == before


@pytest.mark.parametrize("case", LIVE)
async def test_rotate_redeems_a_token_up_to_the_last_instant(db: Database, engine: AsyncEngine, case: str) -> None:
    user = await new_user(db)
    presented = await LIVE[case](db, engine, user)
    assert await sessions.rotate(db, presented.token_hash, sha256(a_token()), presented.now, NOW + HOUR) is not None


async def test_rotate_compares_instants_not_wall_clock_times(db: Database, engine: AsyncEngine) -> None:
    """``now`` in another zone is the same instant."""
    user = await new_user(db)
    early = await new_session(db, user.id, idle=HOUR)
    late = await new_session(db, user.id, idle=HOUR)
    expires = NOW + HOUR
    # One second before expiry, written as a +05:00 time whose wall clock reads later than the expiry.
    before = (expires - SECOND).astimezone(timezone(timedelta(hours=5)))
    assert await sessions.rotate(db, early.token_hash, sha256(a_token()), before, NOW + 2 * HOUR) is not None
    # One second after expiry, written as a -05:00 time whose wall clock reads earlier than the expiry.
    after = (expires + SECOND).astimezone(timezone(timedelta(hours=-5)))
    assert await sessions.rotate(db, late.token_hash, sha256(a_token()), after, NOW + 2 * HOUR) is None
    consumed = await token_row(engine, early.token)
    assert consumed is not None
    assert consumed.consumed_at == expires - SECOND


async def test_rotate_of_one_token_by_many_callers_at_once_succeeds_once(pg_url: str, engine: AsyncEngine) -> None:
    """Separate connections, overlapping statements, the same (derived) successor: exactly one wins, and
    the losers neither fail nor mint a second successor."""
    async with pool(pg_url, 8) as db:
        user = await new_user(db)
        session = await new_session(db, user.id)
        successor = sha256(a_token())
        results = await all_at_once(
            engine,
            refresh_tokens,
            refresh_tokens.c.token_hash == session.token_hash,
            lambda: sessions.rotate(db, session.token_hash, successor, NOW, NOW + HOUR),
            8,
        )
    assert [r is not None for r in results].count(True) == 1
    assert await token_count(engine, session.family.id) == 2
    await assert_single_chain(engine, NOW)


class Abandoned(Exception):
    pass


@pytest.mark.parametrize("first_commits", [True, False])
async def test_rotate_waits_for_a_rotation_in_progress(db: Database, engine: AsyncEngine, first_commits: bool) -> None:
    """A second rotation of the token waits for the first's transaction: if it commits the second matches
    nothing; if it rolls back the token was never consumed and the second wins."""
    user = await new_user(db)
    session = await new_session(db, user.id)
    first, second = a_token(), a_token()
    async with asyncio.TaskGroup() as group:  # the waiting rotation ends before the test does, whatever happens
        with contextlib.nullcontext() if first_commits else pytest.raises(Abandoned):
            async with db.transaction() as transaction:
                assert await sessions.rotate(transaction, session.token_hash, sha256(first), NOW, NOW + HOUR)
                waiting = group.create_task(sessions.rotate(db, session.token_hash, sha256(second), NOW, NOW + HOUR))
                await wait_until_blocked(engine)
                if not first_commits:
                    raise Abandoned
    outcome = waiting.result()
    winner, loser = (first, second) if first_commits else (second, first)
    assert (outcome is None) == first_commits
    assert await token_row(engine, winner) is not None
    assert await token_row(engine, loser) is None
    await assert_single_chain(engine, NOW)


async def test_a_revocation_that_commits_during_a_rotation_wins(db: Database, engine: AsyncEngine) -> None:
    """The rotation found the token live, then waited for the family's row lock held by a revocation: once
    that commits, the token is spent but no successor is issued and nothing comes back."""
    user = await new_user(db)
    session = await new_session(db, user.id)
    successor = a_token()
    async with asyncio.TaskGroup() as group, engine.begin() as conn:
        revoke = families.update().where(families.c.id == session.family.id)
        await conn.execute(revoke.values(revoked_at=NOW, revoked_reason="logout"))
        rotation = group.create_task(sessions.rotate(db, session.token_hash, sha256(successor), NOW, NOW + HOUR))
        await wait_until_blocked(engine)
    assert rotation.result() is None
    assert await token_row(engine, successor) is None
    presented = await token_row(engine, session.token)
    assert presented is not None
    assert presented.consumed_at == NOW
    family = await family_row(engine, session.family.id)
    assert (family.revoked_reason, family.last_used_at) == ("logout", NOW)


async def test_a_rotation_rolled_back_consumed_nothing(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    before = await snapshot(engine)

    async def rotate_then_fail() -> None:
        async with db.transaction() as transaction:
            assert await sessions.rotate(transaction, session.token_hash, sha256(a_token()), NOW, NOW + HOUR)
            raise Abandoned

    with pytest.raises(Abandoned):
        await rotate_then_fail()
    assert await snapshot(engine) == before
    assert await sessions.rotate(db, session.token_hash, sha256(a_token()), NOW, NOW + HOUR) is not None


# ---------------------------------------------------------------- inspect


async def test_inspect_an_unknown_token(db: Database) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    assert await sessions.inspect(db, sha256(a_token()), sha256(a_token()), NOW) is None
    assert await sessions.inspect(db, sha256(a_token()), session.token_hash, NOW) is None


async def test_inspect_a_token_never_used(db: Database) -> None:
    """Live, or expired without having been used: not consumed, no successor."""
    user = await new_user(db)
    session = await new_session(db, user.id, idle=HOUR)
    for now in (NOW, NOW + HOUR, NOW + 2 * HOUR):
        found = await sessions.inspect(db, session.token_hash, sha256(a_token()), now)
        assert found == sessions.Presented(
            family_id=session.family.id,
            user_id=user.id,
            consumed_at=None,
            family_ended=False,
            successor_expires_at=None,
            successor_unused=False,
        ), now


async def test_inspect_a_rotated_token_reports_its_successor(db: Database) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    successor = a_token()
    rotated_at = NOW + 10 * SECOND
    assert await sessions.rotate(db, session.token_hash, sha256(successor), rotated_at, rotated_at + HOUR)

    found = await sessions.inspect(db, session.token_hash, sha256(successor), rotated_at + SECOND)
    assert found == sessions.Presented(
        family_id=session.family.id,
        user_id=user.id,
        consumed_at=rotated_at,
        family_ended=False,
        successor_expires_at=rotated_at + HOUR,
        successor_unused=True,
    )
    # Not the successor asked about (the presented token did not derive it): as if none had been issued.
    other = await sessions.inspect(db, session.token_hash, sha256(a_token()), rotated_at + SECOND)
    assert other is not None
    assert (other.successor_expires_at, other.successor_unused) == (None, False)
    # At its expiry the successor is no longer unused-and-live.
    expired = await sessions.inspect(db, session.token_hash, sha256(successor), rotated_at + HOUR)
    assert expired is not None
    assert (expired.successor_expires_at, expired.successor_unused) == (rotated_at + HOUR, False)
    # Once the successor was itself used, it is not unused any more.
    assert await sessions.rotate(db, sha256(successor), sha256(a_token()), rotated_at + 2 * SECOND, NOW + HOUR)
    used = await sessions.inspect(db, session.token_hash, sha256(successor), rotated_at + 3 * SECOND)
    assert used is not None
    assert (used.consumed_at, used.successor_expires_at, used.successor_unused) == (
        rotated_at,
        rotated_at + HOUR,
        False,
    )


async def test_inspect_ignores_a_successor_hash_from_another_family(db: Database) -> None:
    user = await new_user(db)
    session, elsewhere = await new_session(db, user.id), await new_session(db, user.id)
    assert await sessions.rotate(db, session.token_hash, sha256(a_token()), NOW, NOW + HOUR)
    found = await sessions.inspect(db, session.token_hash, elsewhere.token_hash, NOW)
    assert found is not None
    assert (found.successor_expires_at, found.successor_unused) == (None, False)


async def test_inspect_says_when_the_family_ended(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    revoked = await new_session(db, user.id)
    assert await sessions.revoke(db, revoked.family.id, NOW, "logout")
    short = await new_session(db, user.id, ttl=HOUR, idle=HOUR)
    outliving = await add_token(engine, short.family.id, expires=NOW + 2 * HOUR)

    async def ended(token_hash: bytes, now: datetime) -> bool:
        found = await sessions.inspect(db, token_hash, sha256(a_token()), now)
        assert found is not None
        return found.family_ended

    assert await ended(revoked.token_hash, NOW)
    assert not await ended(sha256(outliving), NOW + HOUR - SECOND)
    assert await ended(sha256(outliving), NOW + HOUR)  # the absolute end is exclusive
    assert await ended(sha256(outliving), NOW + 2 * HOUR)


# ---------------------------------------------------------------- user_of_live_family


async def test_user_of_live_family(db: Database) -> None:
    user = await new_user(db)
    live = await new_session(db, user.id, ttl=HOUR)
    revoked = await new_session(db, user.id)
    assert await sessions.revoke(db, revoked.family.id, NOW, "logout")
    await storage_users.set_password_hash(db, user.id, user.password_hash, "$argon2id$changed")

    found = await sessions.user_of_live_family(db, live.family.id, NOW)
    assert found is not None
    assert found.user == replace(user, password_hash="$argon2id$changed")
    assert found.recent == (sessions.Use(live.family.ip, live.family.user_agent),)  # the login, so far
    assert await sessions.user_of_live_family(db, live.family.id, NOW + HOUR) is None
    assert await sessions.user_of_live_family(db, revoked.family.id, NOW) is None
    assert await sessions.user_of_live_family(db, "no-such-family", NOW) is None


# ---------------------------------------------------------------- revocation


async def test_revoke_returns_true_only_once_and_keeps_the_first(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    assert await sessions.revoke(db, session.family.id, NOW, "reuse") is True
    assert await sessions.revoke(db, session.family.id, NOW + HOUR, "logout") is False
    assert await sessions.revoke(db, "no-such-family", NOW, "logout") is False
    row = await family_row(engine, session.family.id)
    assert (row.revoked_at, row.revoked_reason) == (NOW, "reuse")


async def test_revoke_by_many_callers_at_once_succeeds_once(pg_url: str, engine: AsyncEngine) -> None:
    async with pool(pg_url, 6) as db:
        user = await new_user(db)
        session = await new_session(db, user.id)
        results = await all_at_once(
            engine,
            families,
            families.c.id == session.family.id,
            lambda: sessions.revoke(db, session.family.id, NOW, "reuse"),
            6,
        )
    assert sorted(results) == [False] * 5 + [True]


async def test_revoke_by_token_finds_the_family_of_a_token_in_any_state(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    other = await new_session(db, user.id)
    assert await sessions.rotate(db, session.token_hash, sha256(a_token()), NOW, NOW + HOUR)

    # The consumed first token still names its family.
    revoked = sessions.Revoked(session.family.id, user.id, by_this_call=True)
    assert await sessions.revoke_by_token(db, session.token_hash, NOW + SECOND, "logout") == revoked
    assert await sessions.revoke_by_token(db, session.token_hash, NOW + HOUR, "reuse") == replace(
        revoked, by_this_call=False
    )
    assert await sessions.revoke_by_token(db, sha256(a_token()), NOW, "logout") is None
    row = await family_row(engine, session.family.id)
    assert (row.revoked_at, row.revoked_reason) == (NOW + SECOND, "logout")
    assert (await family_row(engine, other.family.id)).revoked_at is None


async def test_revoke_own_never_touches_another_users_session(db: Database, engine: AsyncEngine) -> None:
    alice, mallory = await new_user(db), await new_user(db)
    mine = await new_session(db, alice.id)
    theirs = await new_session(db, mallory.id)
    before = await snapshot(engine)

    assert await sessions.revoke_own(db, mallory.id, mine.family.id, NOW, "logout") is None
    assert await sessions.revoke_own(db, mallory.id, "no-such-family", NOW, "logout") is None
    assert await sessions.revoke_own(db, mallory.id, "' OR '1'='1", NOW, "logout") is None
    assert await snapshot(engine) == before

    assert await sessions.revoke_own(db, alice.id, mine.family.id, NOW, "logout") == sessions.Revoked(
        mine.family.id, alice.id, by_this_call=True
    )
    row = await family_row(engine, mine.family.id)
    assert (row.revoked_at, row.revoked_reason) == (NOW, "logout")
    # Already revoked: still the user's own (found, not revoked now), and the first revocation is kept.
    assert await sessions.revoke_own(db, alice.id, mine.family.id, NOW + HOUR, "other") == sessions.Revoked(
        mine.family.id, alice.id, by_this_call=False
    )
    row = await family_row(engine, mine.family.id)
    assert (row.revoked_at, row.revoked_reason) == (NOW, "logout")
    assert (await family_row(engine, theirs.family.id)).revoked_at is None


# ---------------------------------------------------------------- active


async def test_active_lists_the_refreshable_sessions_most_recently_used_first(db: Database) -> None:
    user, other = await new_user(db), await new_user(db)
    older = await new_session(db, user.id, created=NOW - 30 * timedelta(minutes=1))
    newer = await new_session(db, user.id, created=NOW - 10 * timedelta(minutes=1))
    revoked = await new_session(db, user.id)
    expired = await new_session(db, user.id, created=NOW - 2 * HOUR, ttl=HOUR, idle=HOUR)
    idle = await new_session(db, user.id, created=NOW - 2 * HOUR, idle=HOUR)
    # Ends exactly now: already over.
    ends_now = await new_session(db, user.id, created=NOW - HOUR, ttl=HOUR, idle=HOUR)
    await new_session(db, other.id)
    assert await sessions.revoke(db, revoked.family.id, NOW, "logout")
    # Using the older one makes it the most recently used.
    touched = NOW - timedelta(minutes=1)
    assert await sessions.rotate(db, older.token_hash, sha256(a_token()), touched, NOW + HOUR)

    active = await sessions.active(db, user.id, NOW)
    assert [f.id for f in active] == [older.family.id, newer.family.id]
    # The rotation above named no client, so the latest use has no address or agent.
    assert active[0] == replace(
        older.family, last_used_at=touched, idle_expires_at=NOW + HOUR, last_ip=None, last_user_agent=None
    )
    assert active[1] == replace(newer.family, last_ip=newer.family.ip, last_user_agent=newer.family.user_agent)
    later = await sessions.active(db, user.id, NOW + HOUR - timedelta(minutes=10))
    assert [f.id for f in later] == [older.family.id]
    assert await sessions.active(db, user.id, NOW + HOUR) == []
    assert await sessions.active(db, "no-such-user", NOW) == []
    assert {expired.family.id, idle.family.id, ends_now.family.id}.isdisjoint(f.id for f in active)


# ---------------------------------------------------------------- timestamps


async def test_timestamps_round_trip_as_aware_utc_instants(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    zone = timezone(timedelta(hours=-7, minutes=-30))
    created = datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    family = replace(
        a_family(user.id),
        created_at=created,
        last_used_at=created.astimezone(zone),  # another zone, same instant
        expires_at=created + timedelta(days=30, microseconds=1),
        idle_expires_at=created + HOUR,
        user_agent=None,
        ip=None,
    )
    token = a_token()
    await sessions.start(db, family, sha256(token))
    (listed,) = await sessions.active(db, user.id, created.astimezone(zone))
    assert await sessions.revoke(db, family.id, created.astimezone(zone) + timedelta(microseconds=5), "logout")
    row = await family_row(engine, family.id)
    stored = await token_row(engine, token)
    assert stored is not None
    assert listed == family
    values: dict[str, tuple[datetime, datetime]] = {
        "created_at": (row.created_at, created),
        "last_used_at": (row.last_used_at, created),
        "expires_at": (row.expires_at, family.expires_at),
        "idle_expires_at": (row.idle_expires_at, family.idle_expires_at),
        "revoked_at": (row.revoked_at, created + timedelta(microseconds=5)),
        "issued_at": (stored.issued_at, created),
        "token_expires_at": (stored.expires_at, created + HOUR),
    }
    for name, (read, written) in values.items():
        assert read == written, name
        assert read.utcoffset() == timedelta(0), name
        assert read.microsecond == written.astimezone(UTC).microsecond, name
    for name in ("created_at", "last_used_at", "expires_at", "idle_expires_at"):
        assert getattr(listed, name).utcoffset() == timedelta(0), name


async def test_naive_datetimes_are_refused(db: Database, engine: AsyncEngine) -> None:
    """A naive datetime names no instant (asyncpg would read it in the process's local zone): refused, and
    nothing is written."""
    user = await new_user(db)
    family = a_family(user.id)
    naive = replace(family, created_at=family.created_at.replace(tzinfo=None))
    with pytest.raises((ValueError, TypeError, DatabaseUnavailable)):
        await sessions.start(db, naive, sha256(a_token()))
    assert await row_count(engine, families, families.c.id == family.id) == 0
    assert await row_count(engine, refresh_tokens) == 0
