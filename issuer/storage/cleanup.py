"""Deleting what can never be used again, in small batches so no statement holds locks for long.

- refresh tokens expired more than ``retention`` ago (consumed or not: past expiry they are refused
  either way, and reuse of an expired token has nothing left to steal);
- families that ended (absolute lifetime, idle expiry, or revocation) more than ``retention`` ago,
  with their tokens (ON DELETE CASCADE);
- security events older than ``event_retention`` (``issuer.events.feed.event_retention``);
- login-failure counters older than the lock-out window (and not locked), and rate buckets idle for an hour
  (an idle bucket is full again after a minute).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from issuer.storage import events
from issuer.storage.database import Database, Statement, rows_affected

DEFAULT_BATCH = 1000
STALE_BUCKET_SECONDS = 3600.0

# Each takes the cutoff as $1 and the batch size as $2; each deletes at most one batch.
TOKENS = Statement(
    "DELETE FROM refresh_tokens WHERE token_hash IN "
    "(SELECT token_hash FROM refresh_tokens WHERE expires_at < $1 LIMIT $2)"
)
# The families' remaining tokens go with them; counted first so the report includes them.
FAMILIES = Statement(
    """
WITH ended AS (
    SELECT id FROM refresh_families
    WHERE expires_at < $1 OR idle_expires_at < $1 OR revoked_at < $1
    LIMIT $2
), tokens AS (
    SELECT count(*) AS n FROM refresh_tokens WHERE family_id IN (SELECT id FROM ended)
), deleted AS (
    DELETE FROM refresh_families WHERE id IN (SELECT id FROM ended) RETURNING id
)
SELECT (SELECT count(*) FROM deleted) AS families, (SELECT n FROM tokens) AS tokens
"""
)
# $3: now (a counter whose lock still holds is kept).
LOGIN_FAILURES = Statement(
    "DELETE FROM login_failures WHERE email IN (SELECT email FROM login_failures "
    "WHERE last_failure_at < $1 AND (locked_until IS NULL OR locked_until < $3) LIMIT $2)"
)
RATE_BUCKETS = Statement(
    "DELETE FROM rate_buckets WHERE bucket IN (SELECT bucket FROM rate_buckets WHERE updated_at < $1 LIMIT $2)"
)


@dataclass(frozen=True)
class CleanupReport:
    tokens: int
    families: int
    login_failures: int
    events: int


async def cleanup(
    db: Database,
    *,
    now: datetime,
    retention: timedelta,
    failure_window: timedelta,
    event_retention: timedelta,
    batch: int = DEFAULT_BATCH,
) -> CleanupReport:
    cutoff = now - retention
    tokens = await _in_batches(db, TOKENS, cutoff, batch)
    families = 0
    while True:
        row = await db.fetchrow(FAMILIES, cutoff, batch)
        assert row is not None
        if row["families"] == 0:
            break
        families += row["families"]
        tokens += row["tokens"]
    failures = await _in_batches(db, LOGIN_FAILURES, now - failure_window, batch, now)
    await _in_batches(db, RATE_BUCKETS, now.timestamp() - STALE_BUCKET_SECONDS, batch)
    pruned = 0
    while deleted := await events.prune(db, now - event_retention, batch):
        pruned += deleted
    return CleanupReport(tokens=tokens, families=families, login_failures=failures, events=pruned)


async def _in_batches(db: Database, statement: Statement, cutoff: object, batch: int, *more: object) -> int:
    total = 0
    while True:
        deleted = rows_affected(await db.execute(statement, cutoff, batch, *more))
        total += deleted
        if deleted == 0:
            return total
