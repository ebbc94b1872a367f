"""Deleting what can never be used again, in small batches so no statement holds locks for long.

- refresh tokens expired more than ``retention`` ago (consumed or not: past expiry they are refused
  either way, and reuse of an expired token has nothing left to steal);
- families that ended (absolute lifetime, idle expiry, or revocation) more than ``retention`` ago,
  with their tokens;
- login-failure counters older than the lock-out window, and rate buckets idle for an hour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Delete, delete, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage.schema import families, login_failures, rate_buckets, refresh_tokens

DEFAULT_BATCH = 1000


@dataclass(frozen=True)
class CleanupReport:
    tokens: int
    families: int
    login_failures: int


async def cleanup(
    engine: AsyncEngine,
    *,
    now: datetime,
    retention: timedelta,
    failure_window: timedelta,
    batch: int = DEFAULT_BATCH,
) -> CleanupReport:
    cutoff = now - retention
    ended = or_(
        families.c.expires_at < cutoff,
        families.c.idle_expires_at < cutoff,
        families.c.revoked_at < cutoff,
    )
    tokens = await _in_batches(
        engine,
        lambda: delete(refresh_tokens).where(
            refresh_tokens.c.token_hash.in_(
                select(refresh_tokens.c.token_hash).where(refresh_tokens.c.expires_at < cutoff).limit(batch)
            )
        ),
    )
    dead_families = 0
    while True:
        # One transaction per batch: the families' remaining tokens first, then the families.
        async with engine.begin() as conn:
            ids = list((await conn.execute(select(families.c.id).where(ended).limit(batch))).scalars())
            if not ids:
                break
            tokens += (await conn.execute(delete(refresh_tokens).where(refresh_tokens.c.family_id.in_(ids)))).rowcount
            dead_families += (await conn.execute(delete(families).where(families.c.id.in_(ids)))).rowcount
    failures = await _in_batches(
        engine,
        lambda: delete(login_failures).where(
            login_failures.c.email.in_(
                select(login_failures.c.email)
                .where(
                    login_failures.c.last_failure_at < now - failure_window,
                    or_(login_failures.c.locked_until.is_(None), login_failures.c.locked_until < now),
                )
                .limit(batch)
            )
        ),
    )
    # An idle bucket is full again after a minute; an hour-old row carries no information.
    stale_bucket = now.timestamp() - 3600
    await _in_batches(
        engine,
        lambda: delete(rate_buckets).where(
            rate_buckets.c.bucket.in_(
                select(rate_buckets.c.bucket).where(rate_buckets.c.updated_at < stale_bucket).limit(batch)
            )
        ),
    )
    return CleanupReport(tokens=tokens, families=dead_families, login_failures=failures)


async def _in_batches(engine: AsyncEngine, statement: Callable[[], Delete]) -> int:
    total = 0
    while True:
        async with engine.begin() as conn:
            deleted = (await conn.execute(statement())).rowcount
        total += deleted
        if deleted == 0:
            return total
