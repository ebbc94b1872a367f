"""The signing-key table: every key with its schedule, the private key encrypted (``issuer.keys.material``)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from issuer.keys.records import KeyRecord
from issuer.storage.database import ConstraintViolation, Executor, Row, Statement, rows_affected

_COLUMNS = (
    "kid, public_jwk, private_key_enc, created_at, publish_at, activate_at, retire_at, revoked_at, key_bits, generation"
)
ALL = Statement(f"SELECT {_COLUMNS} FROM signing_keys ORDER BY activate_at, kid", retry_safe=True)
INSERT = Statement(f"INSERT INTO signing_keys ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
# The schedule is all that changes after a key is written.
RESCHEDULE = Statement("UPDATE signing_keys SET activate_at = $2, retire_at = $3, revoked_at = $4 WHERE kid = $1")
DELETE = Statement("DELETE FROM signing_keys WHERE kid = ANY($1::text[])")
# What a notification on this channel means: the keys changed; every replica re-reads them.
CHANNEL = "issuer_keys"
# Run inside the changing transaction: PostgreSQL delivers it at commit, and never for a rollback.
ANNOUNCE = Statement(f"SELECT pg_notify('{CHANNEL}', '')")


class KeyConflict(Exception):
    """The key's kid or generation is taken: another replica or operator changed the keys at the same time."""


def _record(row: Row) -> KeyRecord:
    return KeyRecord(
        kid=row["kid"],
        public_jwk=json.loads(row["public_jwk"]),
        private_key_enc=row["private_key_enc"],
        created_at=row["created_at"],
        publish_at=row["publish_at"],
        activate_at=row["activate_at"],
        retire_at=row["retire_at"],
        revoked_at=row["revoked_at"],
        key_bits=row["key_bits"],
        generation=row["generation"],
    )


async def all_keys(db: Executor) -> list[KeyRecord]:
    return [_record(row) for row in await db.fetch(ALL)]


async def insert(db: Executor, record: KeyRecord) -> None:
    try:
        await db.execute(
            INSERT,
            record.kid,
            json.dumps(record.public_jwk, sort_keys=True),
            record.private_key_enc,
            record.created_at,
            record.publish_at,
            record.activate_at,
            record.retire_at,
            record.revoked_at,
            record.key_bits,
            record.generation,
        )
    except ConstraintViolation as exc:
        raise KeyConflict(record.kid) from exc


async def reschedule(db: Executor, record: KeyRecord) -> None:
    """Store ``record``'s activate, retire and revoke times."""
    await db.execute(RESCHEDULE, record.kid, record.activate_at, record.retire_at, record.revoked_at)


async def delete(db: Executor, kids: Sequence[str]) -> int:
    return rows_affected(await db.execute(DELETE, list(kids))) if kids else 0


async def announce(db: Executor) -> None:
    """Tell every replica's listener (``issuer.storage.notifications``) that the keys changed."""
    await db.execute(ANNOUNCE)
