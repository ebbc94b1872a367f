"""Token buckets shared by every replica, one per scope and client address (``issuer.http.throttle``)."""

from __future__ import annotations

from dataclasses import dataclass

from issuer.storage.database import Executor, Statement

# Take one token: refill for the time since the bucket's last use, capped at the capacity, and take one if
# there is one. An empty bucket's WHERE matches nothing and the row stays as it was; the outer SELECT then
# reports the bucket as it stood. Parameters: $1 bucket, $2 capacity, $3 now (epoch seconds), $4 tokens
# per second.
_REFILLED = "LEAST($2::float8, b.tokens + ($3::float8 - b.updated_at) * $4::float8)"
TAKE = Statement(
    f"""
WITH taken AS (
    INSERT INTO rate_buckets AS b (bucket, tokens, updated_at) VALUES ($1, $2::float8 - 1.0, $3::float8)
    ON CONFLICT (bucket) DO UPDATE SET tokens = {_REFILLED} - 1.0, updated_at = $3::float8
    WHERE {_REFILLED} >= 1.0
    RETURNING b.tokens
)
SELECT EXISTS (SELECT 1 FROM taken) AS taken, b.tokens, b.updated_at
FROM (VALUES (1)) AS one LEFT JOIN rate_buckets AS b ON b.bucket = $1
"""
)


@dataclass(frozen=True)
class Take:
    taken: bool
    # The bucket before this statement (None if it had none): what a refusal's Retry-After is computed from.
    tokens: float | None
    updated_at: float | None


async def take(db: Executor, bucket: str, capacity: float, per_second: float, now: float) -> Take:
    row = await db.fetchrow(TAKE, bucket, capacity, now, per_second)
    assert row is not None  # the outer SELECT always yields one row
    return Take(row["taken"], row["tokens"], row["updated_at"])
