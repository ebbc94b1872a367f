"""Every SQL statement the issuer runs. Callers own the transaction and pass its connection in."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, exists, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from issuer.keys.ring import KeyRecord
from issuer.storage.schema import families, refresh_tokens, signing_keys, users


@dataclass(frozen=True)
class User:
    id: str
    email: str
    password_hash: str
    role: str
    token_version: int


@dataclass(frozen=True)
class Family:
    id: str
    user_id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    idle_expires_at: datetime
    user_agent: str | None
    ip: str | None
    revoked_at: datetime | None
    revoked_reason: str | None


@dataclass(frozen=True)
class TokenRow:
    token_hash: bytes
    family_id: str
    issued_at: datetime
    expires_at: datetime
    consumed_at: datetime | None


class DuplicateEmail(Exception):
    pass


def _user(row: Row) -> User:
    return User(row.id, row.email, row.password_hash, row.role, row.token_version)


# ---------------------------------------------------------------- users


async def insert_user(conn: AsyncConnection, user: User, now: datetime) -> None:
    try:
        await conn.execute(
            insert(users).values(
                id=user.id,
                email=user.email,
                password_hash=user.password_hash,
                role=user.role,
                token_version=user.token_version,
                created_at=now,
            )
        )
    except IntegrityError as exc:
        raise DuplicateEmail(user.email) from exc


async def user_by_email(conn: AsyncConnection, email: str) -> User | None:
    row = (await conn.execute(select(users).where(users.c.email == email))).first()
    return None if row is None else _user(row)


async def user_by_id(conn: AsyncConnection, user_id: str) -> User | None:
    row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
    return None if row is None else _user(row)


async def user_of_live_family(conn: AsyncConnection, family_id: str, now: datetime) -> User | None:
    """The family's user, if the family is neither revoked nor past its absolute expiry.

    One statement, so one snapshot: a logout-all (which bumps the version and revokes the families in one
    transaction) is seen either entirely or not at all. Reading the family and then the user in two
    statements could pair "not revoked" with the new tokenVersion and mint a token that survives it.
    """
    row = (
        await conn.execute(
            select(users)
            .join(families, families.c.user_id == users.c.id)
            .where(families.c.id == family_id, families.c.revoked_at.is_(None), families.c.expires_at > now)
        )
    ).first()
    return None if row is None else _user(row)


async def users_by_id(conn: AsyncConnection, user_ids: list[str]) -> dict[str, User]:
    rows = await conn.execute(select(users).where(users.c.id.in_(user_ids)))
    return {row.id: _user(row) for row in rows}


async def set_password_hash(conn: AsyncConnection, user_id: str, old_hash: str, new_hash: str) -> None:
    """Replace the hash only if it is still the one we verified (a concurrent change wins)."""
    await conn.execute(
        update(users).where(users.c.id == user_id, users.c.password_hash == old_hash).values(password_hash=new_hash)
    )


async def bump_token_version(conn: AsyncConnection, user_id: str) -> None:
    await conn.execute(update(users).where(users.c.id == user_id).values(token_version=users.c.token_version + 1))


async def delete_user(conn: AsyncConnection, user_id: str) -> None:
    """Delete the user, their families and tokens explicitly (not relying on FK cascade support)."""
    family_ids = select(families.c.id).where(families.c.user_id == user_id).scalar_subquery()
    await conn.execute(delete(refresh_tokens).where(refresh_tokens.c.family_id.in_(family_ids)))
    await conn.execute(delete(families).where(families.c.user_id == user_id))
    await conn.execute(delete(users).where(users.c.id == user_id))


# ---------------------------------------------------------------- families and refresh tokens


async def insert_family(conn: AsyncConnection, family: Family) -> None:
    await conn.execute(
        insert(families).values(
            id=family.id,
            user_id=family.user_id,
            created_at=family.created_at,
            last_used_at=family.last_used_at,
            expires_at=family.expires_at,
            idle_expires_at=family.idle_expires_at,
            user_agent=family.user_agent,
            ip=family.ip,
        )
    )


async def insert_token(
    conn: AsyncConnection, token_hash: bytes, family_id: str, now: datetime, expires_at: datetime
) -> None:
    await conn.execute(
        insert(refresh_tokens).values(
            token_hash=token_hash, family_id=family_id, issued_at=now, expires_at=expires_at, consumed_at=None
        )
    )


async def consume_token(conn: AsyncConnection, token_hash: bytes, now: datetime) -> str | None:
    """Mark a live token of a live family consumed; returns its family id, or None if nothing matched.

    This one conditional UPDATE is the race arbiter: of N concurrent callers with one token, the row lock
    lets exactly one see ``consumed_at IS NULL``; the others re-check after it commits and match nothing.
    """
    family_is_live = exists().where(
        families.c.id == refresh_tokens.c.family_id, families.c.revoked_at.is_(None), families.c.expires_at > now
    )
    result = await conn.execute(
        update(refresh_tokens)
        .where(
            refresh_tokens.c.token_hash == token_hash,
            refresh_tokens.c.consumed_at.is_(None),
            refresh_tokens.c.expires_at > now,
            family_is_live,
        )
        .values(consumed_at=now)
        .returning(refresh_tokens.c.family_id)
    )
    return result.scalar_one_or_none()


async def token_with_family(conn: AsyncConnection, token_hash: bytes) -> tuple[TokenRow, Family] | None:
    row = (
        await conn.execute(
            select(refresh_tokens, families)
            .join(families, families.c.id == refresh_tokens.c.family_id)
            .where(refresh_tokens.c.token_hash == token_hash)
        )
    ).first()
    if row is None:
        return None
    m = row._mapping
    token = TokenRow(
        m[refresh_tokens.c.token_hash],
        m[refresh_tokens.c.family_id],
        m[refresh_tokens.c.issued_at],
        m[refresh_tokens.c.expires_at],
        m[refresh_tokens.c.consumed_at],
    )
    return token, _family_from_mapping(m)


async def token_by_hash(conn: AsyncConnection, token_hash: bytes) -> TokenRow | None:
    row = (await conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == token_hash))).first()
    if row is None:
        return None
    return TokenRow(row.token_hash, row.family_id, row.issued_at, row.expires_at, row.consumed_at)


async def touch_family(conn: AsyncConnection, family_id: str, now: datetime, idle_expires_at: datetime) -> None:
    await conn.execute(
        update(families).where(families.c.id == family_id).values(last_used_at=now, idle_expires_at=idle_expires_at)
    )


async def revoke_family(conn: AsyncConnection, family_id: str, now: datetime, reason: str) -> bool:
    """Revoke a family if it is not already; True when this call did it."""
    result = await conn.execute(
        update(families)
        .where(families.c.id == family_id, families.c.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
    )
    return result.rowcount == 1


async def revoke_user_families(conn: AsyncConnection, user_id: str, now: datetime, reason: str) -> int:
    result = await conn.execute(
        update(families)
        .where(families.c.user_id == user_id, families.c.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
    )
    return result.rowcount


async def family_by_id(conn: AsyncConnection, family_id: str) -> Family | None:
    row = (await conn.execute(select(families).where(families.c.id == family_id))).first()
    return None if row is None else _family_from_mapping(row._mapping)


async def active_families(conn: AsyncConnection, user_id: str, now: datetime) -> Sequence[Family]:
    rows = await conn.execute(
        select(families)
        .where(
            families.c.user_id == user_id,
            families.c.revoked_at.is_(None),
            families.c.expires_at > now,
            families.c.idle_expires_at > now,
        )
        .order_by(families.c.last_used_at.desc(), families.c.id)
    )
    return [_family_from_mapping(row._mapping) for row in rows]


async def live_token_count(conn: AsyncConnection, family_id: str, now: datetime) -> int:
    """Tokens of a family that could still be redeemed (for invariant checks and tests)."""
    return (
        await conn.execute(
            select(func.count())
            .select_from(refresh_tokens)
            .where(
                and_(
                    refresh_tokens.c.family_id == family_id,
                    refresh_tokens.c.consumed_at.is_(None),
                    refresh_tokens.c.expires_at > now,
                )
            )
        )
    ).scalar_one()


def _family_from_mapping(m: object) -> Family:
    get = m.__getitem__  # type: ignore[attr-defined]
    return Family(
        id=get(families.c.id),
        user_id=get(families.c.user_id),
        created_at=get(families.c.created_at),
        last_used_at=get(families.c.last_used_at),
        expires_at=get(families.c.expires_at),
        idle_expires_at=get(families.c.idle_expires_at),
        user_agent=get(families.c.user_agent),
        ip=get(families.c.ip),
        revoked_at=get(families.c.revoked_at),
        revoked_reason=get(families.c.revoked_reason),
    )


# ---------------------------------------------------------------- signing keys


async def insert_key(conn: AsyncConnection, record: KeyRecord) -> None:
    await conn.execute(
        insert(signing_keys).values(
            kid=record.kid,
            public_jwk=json.dumps(record.public_jwk, sort_keys=True),
            private_key_enc=record.private_key_enc,
            created_at=record.created_at,
            publish_at=record.publish_at,
            activate_at=record.activate_at,
            retire_at=record.retire_at,
            revoked_at=record.revoked_at,
            key_bits=record.key_bits,
            generation=record.generation,
        )
    )


async def update_key(conn: AsyncConnection, kid: str, values: dict[str, datetime | None]) -> None:
    allowed = {"activate_at", "retire_at", "revoked_at"}
    if not set(values) <= allowed:
        raise ValueError(f"cannot update {sorted(set(values) - allowed)} of a signing key")
    await conn.execute(update(signing_keys).where(signing_keys.c.kid == kid).values(**values))


async def delete_keys(conn: AsyncConnection, kids: Sequence[str]) -> int:
    if not kids:
        return 0
    result = await conn.execute(delete(signing_keys).where(signing_keys.c.kid.in_(list(kids))))
    return result.rowcount


async def all_keys(conn: AsyncConnection) -> list[KeyRecord]:
    rows = await conn.execute(select(signing_keys).order_by(signing_keys.c.activate_at, signing_keys.c.kid))
    return [
        KeyRecord(
            kid=row.kid,
            public_jwk=json.loads(row.public_jwk),
            private_key_enc=row.private_key_enc,
            created_at=row.created_at,
            publish_at=row.publish_at,
            activate_at=row.activate_at,
            retire_at=row.retire_at,
            revoked_at=row.revoked_at,
            key_bits=row.key_bits,
            generation=row.generation,
        )
        for row in rows
    ]
