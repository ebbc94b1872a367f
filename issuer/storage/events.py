"""Security events: what the revocation feed serves (``issuer.events``).

An event is appended by :func:`append` inside the transaction of the revocation it describes, so a
revocation that commits always has its event and a rolled-back one never has. Its sequence number comes from
the one counter row, whose lock is held until that transaction ends: numbers follow commit order with no
gaps, so a reader that has seen number N has seen every event below it, and a cursor (the last number read)
can never skip an event that commits late. Revocations are rare next to refreshes, so serialising their last
few microseconds costs nothing measurable.

The same statement announces the event with ``pg_notify``, which PostgreSQL delivers only at commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from issuer.storage.database import Executor, Row, Statement

# What a notification on this channel means: an event was committed (payload: its sequence number).
CHANNEL = "issuer_events"

SESSION_REVOKED = "session_revoked"
USER_REVOKED = "user_revoked"
ACCOUNT_PURGED = "account_purged"


@dataclass(frozen=True)
class Event:
    id: str
    occurred_at: datetime
    kind: str
    user_id: str
    session_id: str | None
    token_version: int | None
    reason: str
    # Handed out on append; 0 before.
    seq: int = 0


@dataclass(frozen=True)
class Page:
    """Events after a cursor, in order, with the counter's state at the same snapshot."""

    events: list[Event]
    last_seq: int
    pruned_through: int


_COLUMNS = "seq, id, occurred_at, kind, user_id, session_id, token_version, reason"

APPEND = Statement(
    f"""
WITH next AS (
    UPDATE security_event_counter SET last_seq = last_seq + 1 WHERE id = 1 RETURNING last_seq
), appended AS (
    INSERT INTO security_events ({_COLUMNS})
    SELECT next.last_seq, $1, $2, $3, $4, $5, $6, $7 FROM next
    RETURNING seq
)
SELECT seq, pg_notify('{CHANNEL}', seq::text) FROM appended
"""
)
# Up to $2 events after sequence number $1, and the counter, in one snapshot.
AFTER = Statement(
    f"""
SELECT c.last_seq, c.pruned_through, e.*
FROM security_event_counter AS c
LEFT JOIN LATERAL (
    SELECT {_COLUMNS} FROM security_events WHERE seq > $1 ORDER BY seq LIMIT $2
) AS e ON true
WHERE c.id = 1
ORDER BY e.seq
""",
    retry_safe=True,
)
# One batch of events older than $1; the counter remembers the highest number deleted.
PRUNE = Statement(
    """
WITH gone AS (
    DELETE FROM security_events
    WHERE seq IN (SELECT seq FROM security_events WHERE occurred_at < $1 ORDER BY seq LIMIT $2)
    RETURNING seq
), marked AS (
    UPDATE security_event_counter SET pruned_through = GREATEST(pruned_through, (SELECT max(seq) FROM gone))
    WHERE id = 1 AND EXISTS (SELECT 1 FROM gone)
)
SELECT count(*) AS deleted FROM gone
"""
)


async def append(db: Executor, event: Event) -> int:
    """Store ``event`` (inside the revoking transaction) and return its sequence number."""
    row = await db.fetchrow(
        APPEND,
        event.id,
        event.occurred_at,
        event.kind,
        event.user_id,
        event.session_id,
        event.token_version,
        event.reason,
    )
    assert row is not None, "the security_event_counter row is missing (migration 0002 creates it)"
    return int(row["seq"])


def _event(row: Row) -> Event:
    return Event(
        id=row["id"],
        occurred_at=row["occurred_at"],
        kind=row["kind"],
        user_id=row["user_id"],
        session_id=row["session_id"],
        token_version=row["token_version"],
        reason=row["reason"],
        seq=row["seq"],
    )


async def after(db: Executor, seq: int, limit: int) -> Page:
    rows = await db.fetch(AFTER, seq, limit)
    assert rows, "the security_event_counter row is missing (migration 0002 creates it)"
    events = [_event(row) for row in rows if row["seq"] is not None]
    return Page(events, last_seq=int(rows[0]["last_seq"]), pruned_through=int(rows[0]["pruned_through"]))


async def prune(db: Executor, cutoff: datetime, batch: int) -> int:
    """Delete one batch of events that occurred before ``cutoff``; the number deleted."""
    row = await db.fetchrow(PRUNE, cutoff, batch)
    return 0 if row is None else int(row["deleted"])
