"""Storage conformance: every issuer.storage.store function behaves the same on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from issuer.storage.store import DuplicateEmail, Family, User
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage import store
from issuer.storage.schema import create_engine, families, refresh_tokens, users

NOW = datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def a_user(email: str | None = None) -> User:
    return User(
        id=str(uuid.uuid4()),
        email=email or f"{uuid.uuid4().hex}@example.com",
        password_hash="$argon2id$not-a-real-hash",
        role="user",
        token_version=0,
    )


def a_family(
    user_id: str, *, created: datetime = NOW, ttl: timedelta = 30 * 24 * HOUR, idle: timedelta = HOUR
) -> Family:
    return Family(
        id=str(uuid.uuid4()),
        user_id=user_id,
        created_at=created,
        last_used_at=created,
        expires_at=created + ttl,
        idle_expires_at=created + idle,
        user_agent="pytest",
        ip="203.0.113.7",
        revoked_at=None,
        revoked_reason=None,
    )


async def new_user(engine: AsyncEngine) -> User:
    user = a_user()
    async with engine.begin() as conn:
        await store.insert_user(conn, user, NOW)
    return user


async def new_family(engine: AsyncEngine, user_id: str, **kwargs: timedelta | datetime) -> Family:
    family = a_family(user_id, **kwargs)  # type: ignore[arg-type]
    async with engine.begin() as conn:
        await store.insert_family(conn, family)
    return family


async def new_token(engine: AsyncEngine, family_id: str, *, expires: datetime = NOW + HOUR) -> bytes:
    token_hash = secrets.token_bytes(32)
    async with engine.begin() as conn:
        await store.insert_token(conn, token_hash, family_id, NOW, expires)
    return token_hash


async def consume(engine: AsyncEngine, token_hash: bytes, now: datetime = NOW) -> str | None:
    async with engine.begin() as conn:
        return await store.consume_token(conn, token_hash, now)


# ---------------------------------------------------------------- users


async def test_insert_user_and_duplicate_email(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    twin = a_user(user.email)
    with pytest.raises(DuplicateEmail):
        async with engine.begin() as conn:
            await store.insert_user(conn, twin, NOW)
    async with engine.connect() as conn:
        assert await store.user_by_email(conn, user.email) == user
        assert await store.user_by_id(conn, user.id) == user
        assert await store.user_by_id(conn, twin.id) is None
        assert await store.user_by_email(conn, "nobody@example.com") is None
    # The failed insert left the engine usable (the aborted transaction was rolled back).
    await new_user(engine)


async def test_bump_token_version(engine: AsyncEngine) -> None:
    user, other = await new_user(engine), await new_user(engine)
    for _ in range(2):
        async with engine.begin() as conn:
            await store.bump_token_version(conn, user.id)
    async with engine.connect() as conn:
        assert (await store.user_by_id(conn, user.id)).token_version == 2  # type: ignore[union-attr]
        assert (await store.user_by_id(conn, other.id)).token_version == 0  # type: ignore[union-attr]


# ---------------------------------------------------------------- consuming tokens


async def test_consume_token_matches_only_once(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    token_hash = await new_token(engine, family.id)
    assert await consume(engine, token_hash) == family.id
    assert await consume(engine, token_hash) is None
    assert await consume(engine, token_hash, NOW + timedelta(seconds=1)) is None
    async with engine.connect() as conn:
        row = await store.token_by_hash(conn, token_hash)
    assert row is not None
    assert row.consumed_at == NOW  # the first consumption's time is kept


async def test_consume_token_concurrently_matches_once(engine: AsyncEngine) -> None:
    """Separate connections, overlapping transactions: the conditional UPDATE lets exactly one through."""
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    token_hash = await new_token(engine, family.id)
    results = await asyncio.gather(*(consume(engine, token_hash) for _ in range(8)))
    assert results.count(family.id) == 1
    assert results.count(None) == 7


async def test_consume_token_rolled_back_is_not_consumed(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    token_hash = await new_token(engine, family.id)

    class Boom(Exception):
        pass

    async def consume_then_fail() -> None:
        async with engine.begin() as conn:
            assert await store.consume_token(conn, token_hash, NOW) == family.id
            raise Boom

    with pytest.raises(Boom):
        await consume_then_fail()
    assert await consume(engine, token_hash) == family.id


async def test_consume_token_refuses_expired_tokens(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    expires = NOW + HOUR
    at_expiry = await new_token(engine, family.id, expires=expires)
    after_expiry = await new_token(engine, family.id, expires=expires)
    just_before = await new_token(engine, family.id, expires=expires)
    assert await consume(engine, at_expiry, expires) is None
    assert await consume(engine, after_expiry, expires + timedelta(days=1)) is None
    assert await consume(engine, just_before, expires - timedelta(microseconds=1)) == family.id
    async with engine.connect() as conn:
        assert (await store.token_by_hash(conn, at_expiry)).consumed_at is None  # type: ignore[union-attr]


async def test_consume_token_compares_instants_not_wall_clock_text(engine: AsyncEngine) -> None:
    """``now`` in another zone is the same instant: SQLite stores text, so a bug here would show."""
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    expires = NOW + HOUR
    plus5 = timezone(timedelta(hours=5))
    minus5 = timezone(timedelta(hours=-5))
    early = await new_token(engine, family.id, expires=expires)
    late = await new_token(engine, family.id, expires=expires)
    # 1 second before expiry, written as a +05:00 time whose wall clock reads later than the expiry.
    assert await consume(engine, early, (expires - timedelta(seconds=1)).astimezone(plus5)) == family.id
    # 1 second after expiry, written as a -05:00 time whose wall clock reads earlier than the expiry.
    assert await consume(engine, late, (expires + timedelta(seconds=1)).astimezone(minus5)) is None


async def test_consume_token_refuses_tokens_of_revoked_families(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    token_hash = await new_token(engine, family.id)
    async with engine.begin() as conn:
        assert await store.revoke_family(conn, family.id, NOW, "reuse")
    assert await consume(engine, token_hash) is None
    async with engine.connect() as conn:
        assert (await store.token_by_hash(conn, token_hash)).consumed_at is None  # type: ignore[union-attr]


async def test_consume_token_refuses_tokens_of_expired_families(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id, ttl=HOUR, idle=HOUR)
    # A token that (wrongly) outlives its family must still be refused once the family is over.
    at_end = await new_token(engine, family.id, expires=NOW + 2 * HOUR)
    later = await new_token(engine, family.id, expires=NOW + 2 * HOUR)
    assert await consume(engine, at_end, family.expires_at) is None
    assert await consume(engine, later, family.expires_at + timedelta(minutes=1)) is None
    assert await consume(engine, later, family.expires_at - timedelta(seconds=1)) == family.id


async def test_consume_unknown_token(engine: AsyncEngine) -> None:
    assert await consume(engine, secrets.token_bytes(32)) is None


async def test_tokens_need_an_existing_family(engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await store.insert_token(conn, secrets.token_bytes(32), str(uuid.uuid4()), NOW, NOW + HOUR)


async def test_token_hash_is_unique(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    token_hash = await new_token(engine, family.id)
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await store.insert_token(conn, token_hash, family.id, NOW, NOW + HOUR)


async def test_token_with_family_and_live_token_count(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    consumed = await new_token(engine, family.id)
    live = await new_token(engine, family.id, expires=NOW + 2 * HOUR)
    await new_token(engine, family.id, expires=NOW - timedelta(seconds=1))  # expired, never consumed
    assert await consume(engine, consumed) == family.id
    async with engine.connect() as conn:
        found = await store.token_with_family(conn, consumed)
        assert found is not None
        token, fam = found
        assert token.token_hash == consumed
        assert token.consumed_at == NOW
        assert fam == family
        assert await store.token_with_family(conn, secrets.token_bytes(32)) is None
        assert await store.live_token_count(conn, family.id, NOW) == 1
        assert await store.live_token_count(conn, family.id, NOW + 2 * HOUR) == 0
        assert (await store.token_by_hash(conn, live)).expires_at == NOW + 2 * HOUR  # type: ignore[union-attr]


# ---------------------------------------------------------------- families


async def test_revoke_family_returns_true_only_once(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    async with engine.begin() as conn:
        assert await store.revoke_family(conn, family.id, NOW, "reuse") is True
    async with engine.begin() as conn:
        assert await store.revoke_family(conn, family.id, NOW + HOUR, "logout") is False
        assert await store.revoke_family(conn, str(uuid.uuid4()), NOW, "logout") is False
    async with engine.connect() as conn:
        stored = await store.family_by_id(conn, family.id)
    assert stored is not None
    assert stored.revoked_at == NOW  # the first revocation's time and reason are kept
    assert stored.revoked_reason == "reuse"


async def test_revoke_family_concurrently_only_one_wins(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)

    async def revoke() -> bool:
        async with engine.begin() as conn:
            return await store.revoke_family(conn, family.id, NOW, "reuse")

    results = await asyncio.gather(*(revoke() for _ in range(6)))
    assert sorted(results) == [False] * 5 + [True]


async def test_revoke_user_families(engine: AsyncEngine) -> None:
    user, other = await new_user(engine), await new_user(engine)
    mine = [await new_family(engine, user.id) for _ in range(3)]
    theirs = await new_family(engine, other.id)
    async with engine.begin() as conn:
        assert await store.revoke_family(conn, mine[0].id, NOW, "logout")
    async with engine.begin() as conn:
        assert await store.revoke_user_families(conn, user.id, NOW + HOUR, "logout_all") == 2
    async with engine.connect() as conn:
        first = await store.family_by_id(conn, mine[0].id)
        assert first is not None
        assert (first.revoked_reason, first.revoked_at) == ("logout", NOW)
        for family in mine[1:]:
            stored = await store.family_by_id(conn, family.id)
            assert stored is not None
            assert (stored.revoked_reason, stored.revoked_at) == ("logout_all", NOW + HOUR)
        assert (await store.family_by_id(conn, theirs.id)).revoked_at is None  # type: ignore[union-attr]


async def test_touch_family(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = await new_family(engine, user.id)
    later = NOW + timedelta(minutes=5, microseconds=7)
    async with engine.begin() as conn:
        await store.touch_family(conn, family.id, later, later + HOUR)
    async with engine.connect() as conn:
        stored = await store.family_by_id(conn, family.id)
    assert stored is not None
    assert stored.last_used_at == later
    assert stored.idle_expires_at == later + HOUR
    assert stored.expires_at == family.expires_at


async def test_active_families_filters_and_orders(engine: AsyncEngine) -> None:
    user, other = await new_user(engine), await new_user(engine)
    older = await new_family(engine, user.id, created=NOW - timedelta(minutes=30))
    newer = await new_family(engine, user.id, created=NOW - timedelta(minutes=10))
    revoked = await new_family(engine, user.id)
    expired = await new_family(engine, user.id, created=NOW - 2 * HOUR, ttl=HOUR, idle=HOUR)
    idle = await new_family(engine, user.id, created=NOW - 2 * HOUR, ttl=30 * 24 * HOUR, idle=HOUR)
    # Expires exactly now: already over (expiry instants are exclusive everywhere).
    ends_now = await new_family(engine, user.id, created=NOW - HOUR, ttl=HOUR, idle=HOUR)
    await new_family(engine, other.id)
    async with engine.begin() as conn:
        await store.revoke_family(conn, revoked.id, NOW, "logout")
    async with engine.begin() as conn:
        # Touching the older one makes it the most recently used.
        await store.touch_family(conn, older.id, NOW - timedelta(minutes=1), NOW + HOUR)
    async with engine.connect() as conn:
        active = await store.active_families(conn, user.id, NOW)
        assert [f.id for f in active] == [older.id, newer.id]
        later = await store.active_families(conn, user.id, NOW + HOUR - timedelta(minutes=10))
        assert [f.id for f in later] == [older.id]
        assert await store.active_families(conn, user.id, NOW + HOUR) == []
        assert await store.active_families(conn, str(uuid.uuid4()), NOW) == []
    assert {expired.id, idle.id, ends_now.id}.isdisjoint(f.id for f in active)


async def test_delete_user_removes_families_and_tokens(engine: AsyncEngine) -> None:
    user, other = await new_user(engine), await new_user(engine)
    mine = [await new_family(engine, user.id) for _ in range(2)]
    my_tokens = [await new_token(engine, f.id) for f in mine for _ in range(2)]
    theirs = await new_family(engine, other.id)
    their_token = await new_token(engine, theirs.id)
    async with engine.begin() as conn:
        await store.delete_user(conn, user.id)
    async with engine.connect() as conn:
        assert await store.user_by_id(conn, user.id) is None
        for family in mine:
            assert await store.family_by_id(conn, family.id) is None
        for token_hash in my_tokens:
            assert await store.token_by_hash(conn, token_hash) is None
        count = select(func.count()).select_from(refresh_tokens)
        ids = [f.id for f in mine]
        assert (await conn.execute(count.where(refresh_tokens.c.family_id.in_(ids)))).scalar_one() == 0
        assert (
            await conn.execute(select(func.count()).select_from(families).where(families.c.user_id == user.id))
        ).scalar_one() == 0
        # Nobody else's data went with it.
        assert await store.user_by_id(conn, other.id) == other
        assert await store.family_by_id(conn, theirs.id) == theirs
        assert await store.token_by_hash(conn, their_token) is not None
    assert await consume(engine, their_token) == theirs.id


# ---------------------------------------------------------------- timestamps


async def test_timestamps_round_trip_as_aware_utc(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    tz = timezone(timedelta(hours=-7, minutes=-30))
    created = datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    family = Family(
        id=str(uuid.uuid4()),
        user_id=user.id,
        created_at=created,
        last_used_at=created.astimezone(tz),  # another zone, same instant
        expires_at=created + timedelta(days=30, microseconds=1),
        idle_expires_at=datetime(2032, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        user_agent=None,
        ip=None,
        revoked_at=None,
        revoked_reason=None,
    )
    token_hash = secrets.token_bytes(32)
    async with engine.begin() as conn:
        await store.insert_family(conn, family)
        await store.insert_token(conn, token_hash, family.id, created.astimezone(tz), created + HOUR)
        await store.revoke_family(conn, family.id, created.astimezone(tz) + timedelta(microseconds=5), "logout")
    async with engine.connect() as conn:
        stored = await store.family_by_id(conn, family.id)
        token = await store.token_by_hash(conn, token_hash)
        user_created = (await conn.execute(select(users.c.created_at).where(users.c.id == user.id))).scalar_one()
    assert stored is not None
    assert token is not None
    values = {
        "created_at": (stored.created_at, family.created_at),
        "last_used_at": (stored.last_used_at, family.last_used_at),
        "expires_at": (stored.expires_at, family.expires_at),
        "idle_expires_at": (stored.idle_expires_at, family.idle_expires_at),
        "revoked_at": (stored.revoked_at, created + timedelta(microseconds=5)),
        "issued_at": (token.issued_at, created),
        "token_expires_at": (token.expires_at, created + HOUR),
        "user_created_at": (user_created, NOW),
    }
    for name, (read, written) in values.items():
        assert isinstance(read, datetime), name
        assert read.tzinfo is not None, name
        assert read.utcoffset() == timedelta(0), name
        assert read == written, name
        assert read.microsecond == written.astimezone(UTC).microsecond, name


async def test_naive_datetimes_are_refused(engine: AsyncEngine) -> None:
    user = await new_user(engine)
    family = a_family(user.id)
    naive = family.created_at.replace(tzinfo=None)
    with pytest.raises((ValueError, StatementError)):
        async with engine.begin() as conn:
            await store.insert_family(conn, Family(**{**family.__dict__, "created_at": naive}))
    async with engine.connect() as conn:
        assert await store.family_by_id(conn, family.id) is None
