"""The migrations and issuer.storage.schema describe the same database.

The test database was migrated to head by the ``pg_url`` fixture; Alembic's autogenerate comparison of it
with ``schema.metadata`` must find nothing to change (tables, columns and their types, nullability, server
defaults, indexes, unique constraints, foreign keys with their ON DELETE), and it must be able to see such a
drift. Two constraints no storage function can reach (only ever inserting tokens of existing families, with
fresh hashes) are attacked directly.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Column,
    Connection,
    DefaultClause,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    insert,
    inspect,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.storage.database import Database
from issuer.storage.migrations import alembic_config
from issuer.storage.schema import metadata, refresh_tokens
from tests.storage.conftest import HOUR, NOW, new_session, new_user

OPTIONS = {"compare_type": True, "compare_server_default": True}


def differences(conn: Connection, target: MetaData) -> list[Any]:
    context = MigrationContext.configure(conn, opts=OPTIONS)
    return list(compare_metadata(context, target))


async def test_the_migrated_database_is_exactly_the_schema_module(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        diff = await conn.run_sync(differences, metadata)
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert diff == []
    assert tables == set(metadata.tables) | {"alembic_version"}


def _add_column(tables: dict[str, Table]) -> None:
    tables["users"].append_column(Column("nickname", Integer, nullable=True))


def _drop_table(tables: dict[str, Table]) -> None:
    tables["rate_buckets"].metadata.remove(tables["rate_buckets"])


def _change_type(tables: dict[str, Table]) -> None:
    tables["users"].c.email.type = String(255)


def _change_nullable(tables: dict[str, Table]) -> None:
    tables["refresh_families"].c.revoked_at.nullable = False


def _change_server_default(tables: dict[str, Table]) -> None:
    tables["users"].c.role.server_default = DefaultClause("admin")


def _drop_index(tables: dict[str, Table]) -> None:
    table = tables["refresh_tokens"]
    table.indexes.remove(next(ix for ix in table.indexes if ix.name == "ix_refresh_tokens_expires_at"))


def _drop_unique(tables: dict[str, Table]) -> None:
    tables["signing_keys"].c.generation.unique = False
    table = tables["signing_keys"]
    table.constraints -= {c for c in table.constraints if isinstance(c, UniqueConstraint)}


def _no_cascade(tables: dict[str, Table]) -> None:
    for fk in tables["refresh_tokens"].foreign_key_constraints:
        fk.ondelete = None
        for element in fk.elements:
            element.ondelete = None


DRIFTS: dict[str, tuple[Callable[[dict[str, Table]], None], str]] = {
    "a column": (_add_column, "add_column"),
    "a table": (_drop_table, "remove_table"),
    "a type": (_change_type, "modify_type"),
    "nullability": (_change_nullable, "modify_nullable"),
    "a server default": (_change_server_default, "modify_default"),
    "an index": (_drop_index, "remove_index"),
    "a unique constraint": (_drop_unique, "remove_constraint"),
    "on delete cascade": (_no_cascade, "add_fk"),
}


def _kinds(diff: list[Any]) -> set[str]:
    """The operation names of a diff (a modification comes as a list of tuples)."""
    kinds: set[str] = set()
    for change in diff:
        for op in change if isinstance(change, list) else [change]:
            kinds.add(op[0])
    return kinds


@pytest.mark.parametrize("drift", DRIFTS)
async def test_the_comparison_sees_a_drift(engine: AsyncEngine, drift: str) -> None:
    """The check above is not vacuous: a schema module that differs from the migrations in any of these ways
    is reported."""
    mutate, kind = DRIFTS[drift]
    drifted = MetaData(naming_convention=metadata.naming_convention)
    tables = {table.name: table.to_metadata(drifted) for table in metadata.sorted_tables}
    mutate(tables)
    async with engine.connect() as conn:
        diff = await conn.run_sync(differences, drifted)
    assert kind in _kinds(diff), diff


async def test_the_database_is_at_the_newest_revision(engine: AsyncEngine, pg_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(pg_url)).get_current_head()
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all() == [head]


# ---------------------------------------------------------------- the constraints the code relies on


def _token(family_id: str, token_hash: bytes | None = None, user_id: str = "someone") -> dict[str, object]:
    return {
        "token_hash": token_hash or secrets.token_bytes(32),
        "family_id": family_id,
        "user_id": user_id,
        "issued_at": NOW,
        "expires_at": NOW + HOUR,
    }


async def test_a_token_needs_an_existing_family(engine: AsyncEngine) -> None:
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(insert(refresh_tokens).values(**_token(str(uuid.uuid4()))))


async def test_a_token_hash_is_unique(db: Database, engine: AsyncEngine) -> None:
    user = await new_user(db)
    session = await new_session(db, user.id)
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(
                insert(refresh_tokens).values(**_token(session.family.id, session.token_hash, session.family.user_id))
            )
