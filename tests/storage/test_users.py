"""issuer.storage.users on PostgreSQL: insert and read accounts, the duplicate email, the password hash's
compare-and-set, logout-all (version and revocation in one statement), and deletion with its cascade."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage import sessions
from issuer.storage import users as storage_users
from issuer.storage.database import Database
from issuer.storage.schema import families, refresh_tokens, users
from issuer.storage.users import DuplicateEmail
from tests.storage.conftest import HOUR, NOW, Recorder, a_user, add_token, backend_pid, new_session, new_user
from tests.support.families import family_row, row_count, sha256, token_row


async def test_insert_then_read_by_email_and_by_ids(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    assert await storage_users.by_email(db, user.email) == user
    assert await storage_users.by_email(db, "nobody@example.com") is None
    assert await storage_users.by_ids(db, [user.id]) == {user.id: user}
    async with engine.connect() as conn:
        created = (await conn.execute(select(users.c.created_at).where(users.c.id == user.id))).scalar_one()
    assert created == NOW
    assert created.utcoffset() == timedelta(0)
    assert created.microsecond == NOW.microsecond


async def test_by_ids_reads_many_users_in_one_statement(db: Database) -> None:
    """The batched Bearer read: every known id in one round trip; unknown and repeated ids are harmless."""
    known = [await new_user(db) for _ in range(3)]
    recorder = Recorder(db)
    found = await storage_users.by_ids(recorder, [known[0].id, "no-such-id", known[2].id, known[0].id, known[1].id])
    assert found == {user.id: user for user in known}
    assert len(recorder.sent) == 1
    assert await storage_users.by_ids(db, []) == {}
    assert await storage_users.by_ids(db, ["no-such-id"]) == {}


async def test_duplicate_email_is_refused_and_writes_nothing(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    twin = a_user(user.email)
    with pytest.raises(DuplicateEmail):
        await storage_users.insert(db, twin, NOW + HOUR)
    assert await storage_users.by_email(db, user.email) == user
    assert await storage_users.by_ids(db, [twin.id]) == {}
    assert await row_count(engine, users) == 1
    # The failed insert left the pool usable.
    await new_user(db)


async def test_duplicate_email_keeps_the_pooled_connection(solo: Database) -> None:
    """A constraint violation is the caller's mistake, not a broken connection: the same connection (the
    same server process) serves the next statement, and the pool opened no other."""
    user = await new_user(solo)
    pid = await backend_pid(solo)
    assert solo.open_connections() == 1
    with pytest.raises(DuplicateEmail):
        await storage_users.insert(solo, a_user(user.email), NOW)
    assert solo.open_connections() == 1
    assert await backend_pid(solo) == pid
    assert await storage_users.by_email(solo, user.email) == user


async def test_set_password_hash_only_replaces_the_hash_it_was_given(db: Database) -> None:
    """Compare-and-set: a change based on a stale hash loses to the change that happened meanwhile."""
    user, other = await new_user(db), await new_user(db)
    await storage_users.set_password_hash(db, user.id, user.password_hash, "$argon2id$rehashed")
    await storage_users.set_password_hash(db, user.id, user.password_hash, "$argon2id$stale")
    stored = await storage_users.by_email(db, user.email)
    assert stored is not None
    assert stored.password_hash == "$argon2id$rehashed"
    assert await storage_users.by_email(db, other.email) == other


async def test_log_out_everywhere_bumps_the_version_and_revokes_every_live_session(
    db: Database, engine: AsyncEngine
) -> None:
    user, other = await new_user(db), await new_user(db)
    mine = [await new_session(db, user.id) for _ in range(3)]
    theirs = await new_session(db, other.id)
    assert await sessions.revoke(db, mine[0].family.id, NOW, "logout")

    recorder = Recorder(db)
    assert await storage_users.log_out_everywhere(recorder, user.id, NOW + HOUR) == 1
    assert len(recorder.sent) == 1  # the version and the revocations: one statement, seen together or not at all

    first = await family_row(engine, mine[0].family.id)
    assert (first.revoked_reason, first.revoked_at) == ("logout", NOW)  # an earlier revocation is kept
    for session in mine[1:]:
        row = await family_row(engine, session.family.id)
        assert (row.revoked_reason, row.revoked_at) == ("logout_all", NOW + HOUR)
    assert (await family_row(engine, theirs.family.id)).revoked_at is None
    assert (await storage_users.by_ids(db, [other.id]))[other.id].token_version == 0

    assert await storage_users.log_out_everywhere(db, user.id, NOW + 2 * HOUR) == 2
    assert (await storage_users.by_ids(db, [user.id]))[user.id].token_version == 2
    assert (await family_row(engine, mine[1].family.id)).revoked_at == NOW + HOUR  # not revoked twice
    assert await storage_users.log_out_everywhere(db, "no-such-id", NOW) is None


async def test_delete_removes_the_user_with_their_sessions_and_tokens(db: Database, engine: AsyncEngine) -> None:
    user, other = await new_user(db), await new_user(db)
    mine = [await new_session(db, user.id) for _ in range(2)]
    my_tokens = [s.token for s in mine] + [await add_token(engine, s.family.id) for s in mine]
    theirs = await new_session(db, other.id)

    await storage_users.delete(db, user.id)

    assert await storage_users.by_ids(db, [user.id]) == {}
    assert await row_count(engine, families, families.c.user_id == user.id) == 0
    ids = [s.family.id for s in mine]
    assert await row_count(engine, refresh_tokens, refresh_tokens.c.family_id.in_(ids)) == 0
    for token in my_tokens:
        assert await token_row(engine, token) is None
    # Nobody else's data went with it.
    assert await storage_users.by_ids(db, [other.id]) == {other.id: other}
    assert (await family_row(engine, theirs.family.id)).id == theirs.family.id
    assert await token_row(engine, theirs.token) is not None
    rotated = await sessions.rotate(db, theirs.token_hash, sha256("successor"), NOW, NOW + HOUR)
    assert rotated is not None
    assert rotated[0] == theirs.family.id
    await storage_users.delete(db, "no-such-id")  # a missing user is not an error
