"""issuer.storage.signing_keys on PostgreSQL: key rows round-trip field for field, a taken kid or generation
is a KeyConflict that writes nothing, a reschedule changes only the schedule, deletes are by kid."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.keys.records import KeyRecord
from issuer.storage import signing_keys
from issuer.storage.database import Database
from issuer.storage.signing_keys import KeyConflict
from tests.storage.conftest import HOUR, NOW, Recorder, snapshot

DAY = 24 * HOUR


def a_key(generation: int, *, activate_at: datetime = NOW, kid: str | None = None) -> KeyRecord:
    kid = kid or secrets.token_urlsafe(32)
    return KeyRecord(
        kid=kid,
        public_jwk={
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
            "n": secrets.token_urlsafe(256),
            "e": "AQAB",
        },
        # Any bytes: NULs and high bytes must survive.
        private_key_enc=b"\x00\xff" + secrets.token_bytes(1200) + b"\x00",
        created_at=NOW - DAY,
        publish_at=NOW - DAY,
        activate_at=activate_at,
        retire_at=None,
        revoked_at=None,
        key_bits=4096,
        generation=generation,
    )


async def test_key_rows_round_trip(db: Database) -> None:
    zone = timezone(timedelta(hours=9, minutes=30))
    record = replace(
        a_key(7),
        created_at=datetime(2029, 12, 31, 23, 59, 59, 999999, tzinfo=zone),
        retire_at=NOW + 90 * DAY,
        revoked_at=NOW + 91 * DAY + timedelta(microseconds=1),
        key_bits=2**33,  # the column is a bigint
        generation=2**40,
    )
    await signing_keys.insert(db, record)
    (read,) = await signing_keys.all_keys(db)
    assert read == record
    for moment in (read.created_at, read.publish_at, read.activate_at, read.retire_at, read.revoked_at):
        assert moment is not None
        assert moment.utcoffset() == timedelta(0)


async def test_all_keys_are_ordered_by_activation_then_kid(db: Database) -> None:
    later = a_key(1, activate_at=NOW + DAY)
    first_b = a_key(2, kid="b" * 43)
    first_a = a_key(3, kid="a" * 43)
    for record in (later, first_b, first_a):
        await signing_keys.insert(db, record)
    assert [r.kid for r in await signing_keys.all_keys(db)] == [first_a.kid, first_b.kid, later.kid]


async def test_a_taken_kid_or_generation_is_a_key_conflict_that_writes_nothing(
    db: Database, engine: AsyncEngine
) -> None:
    """Two replicas (or an operator) changing the keys at once: the second insert loses, whole."""
    stored = a_key(1)
    await signing_keys.insert(db, stored)
    before = await snapshot(engine)
    with pytest.raises(KeyConflict):
        await signing_keys.insert(db, replace(a_key(2), kid=stored.kid))
    with pytest.raises(KeyConflict):
        await signing_keys.insert(db, a_key(stored.generation))
    assert await snapshot(engine) == before
    assert await signing_keys.all_keys(db) == [stored]
    await signing_keys.insert(db, a_key(2))  # the pool still works


async def test_a_conflict_inside_a_transaction_undoes_the_whole_change(db: Database) -> None:
    stored = a_key(1)
    await signing_keys.insert(db, stored)

    async def retire_and_insert_twice() -> None:
        async with db.transaction() as transaction:
            await signing_keys.reschedule(transaction, replace(stored, retire_at=NOW))
            await signing_keys.insert(transaction, a_key(2))
            await signing_keys.insert(transaction, a_key(2))

    with pytest.raises(KeyConflict):
        await retire_and_insert_twice()
    assert await signing_keys.all_keys(db) == [stored]


async def test_reschedule_changes_only_the_schedule_of_that_key(db: Database) -> None:
    record, other = a_key(1), a_key(2, activate_at=NOW + DAY)
    await signing_keys.insert(db, record)
    await signing_keys.insert(db, other)
    retired = replace(record, retire_at=NOW + DAY, revoked_at=NOW + 2 * DAY)
    # Only activate_at, retire_at and revoked_at are written; the rest of the record is ignored.
    await signing_keys.reschedule(
        db, replace(retired, publish_at=NOW + 5 * DAY, key_bits=1, public_jwk={}, private_key_enc=b"", generation=9)
    )
    assert await signing_keys.all_keys(db) == [retired, other]
    earlier = replace(retired, activate_at=NOW - HOUR, retire_at=None, revoked_at=None)
    await signing_keys.reschedule(db, earlier)
    assert await signing_keys.all_keys(db) == [earlier, other]


async def test_delete_removes_only_the_given_kids(db: Database) -> None:
    keys = [a_key(n, activate_at=NOW + n * HOUR) for n in range(1, 4)]
    for record in keys:
        await signing_keys.insert(db, record)
    assert await signing_keys.delete(db, [keys[0].kid, keys[2].kid, "no-such-kid"]) == 2
    assert await signing_keys.all_keys(db) == [keys[1]]
    assert await signing_keys.delete(db, [keys[0].kid]) == 0
    recorder = Recorder(db)
    assert await signing_keys.delete(recorder, []) == 0
    assert recorder.sent == []  # nothing to delete: no round trip
    assert await signing_keys.all_keys(db) == [keys[1]]
