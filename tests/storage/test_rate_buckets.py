"""issuer.storage.rate_buckets on PostgreSQL: ``take`` refills a shared token bucket for the time since its
last use (capped at the capacity), takes a token if there is one, and reports the bucket as it stood before
the statement, all in one statement. A refusal changes nothing, so the refill keeps counting from the last
token taken."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage import rate_buckets
from issuer.storage.database import Database
from issuer.storage.rate_buckets import Take
from issuer.storage.schema import rate_buckets as buckets
from tests.storage.conftest import Recorder, all_at_once, pool

# Exactly representable values: the arithmetic below is exact in float8.
CAPACITY = 3.0
PER_SECOND = 0.5  # one token every 2 s
T0 = 1_900_000_000.0
BUCKET = "login+register:192.0.2.1"


async def stored(engine: AsyncEngine, bucket: str = BUCKET) -> tuple[float, float] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(buckets.c.tokens, buckets.c.updated_at).where(buckets.c.bucket == bucket))
        ).one_or_none()
    return None if row is None else (row.tokens, row.updated_at)


async def take(db: Database, now: float, bucket: str = BUCKET) -> Take:
    return await rate_buckets.take(db, bucket, CAPACITY, PER_SECOND, now)


async def test_a_new_bucket_starts_full_and_gives_a_token_in_one_statement(db: Database, engine: AsyncEngine) -> None:
    recorder = Recorder(db)
    assert await rate_buckets.take(recorder, BUCKET, CAPACITY, PER_SECOND, T0) == Take(True, None, None)
    assert len(recorder.sent) == 1
    assert await stored(engine) == (CAPACITY - 1, T0)


async def test_an_empty_bucket_refuses_and_reports_itself_without_changing(db: Database, engine: AsyncEngine) -> None:
    assert [await take(db, T0) for _ in range(3)] == [
        Take(True, None, None),
        Take(True, 2.0, T0),
        Take(True, 1.0, T0),
    ]
    assert await stored(engine) == (0.0, T0)
    assert await take(db, T0) == Take(False, 0.0, T0)
    # Half a token refilled is not a token; the refusal does not store the half either.
    assert await take(db, T0 + 1.0) == Take(False, 0.0, T0)
    assert await stored(engine) == (0.0, T0)
    # Refilled from the last token taken, not from the last refusal.
    assert await take(db, T0 + 2.0) == Take(True, 0.0, T0)
    assert await stored(engine) == (0.0, T0 + 2.0)


async def test_the_refill_is_proportional_and_capped_at_the_capacity(db: Database, engine: AsyncEngine) -> None:
    for _ in range(3):
        await take(db, T0)
    assert (await take(db, T0 + 3.0)).taken  # 1.5 refilled, one taken
    assert await stored(engine) == (0.5, T0 + 3.0)
    # An hour idle refills to the capacity, not beyond: exactly CAPACITY takes succeed at once.
    later = T0 + 3600.0
    assert [(await take(db, later)).taken for _ in range(4)] == [True, True, True, False]
    assert await stored(engine) == (0.0, later)


async def test_buckets_are_independent(db: Database, engine: AsyncEngine) -> None:
    for _ in range(3):
        assert (await take(db, T0)).taken
    assert not (await take(db, T0)).taken
    assert await take(db, T0, "login+register:192.0.2.2") == Take(True, None, None)
    assert await stored(engine, "login+register:192.0.2.2") == (CAPACITY - 1, T0)
    assert await stored(engine) == (0.0, T0)


async def test_concurrent_takes_never_give_more_than_the_capacity(pg_url: str, engine: AsyncEngine) -> None:
    """Replicas share the bucket: of many takes at the same instant, exactly CAPACITY get a token."""
    async with pool(pg_url, 8) as db:
        assert (await take(db, T0)).taken
        results = await all_at_once(engine, buckets, buckets.c.bucket == BUCKET, lambda: take(db, T0), 8)
    assert [r.taken for r in results].count(True) == CAPACITY - 1
    assert await stored(engine) == (0.0, T0)
