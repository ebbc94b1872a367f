"""Database-level checks shared by the refresh-family test modules (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from issuer.storage.schema import families, refresh_tokens


def sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified (the access-token tests check signatures)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass(frozen=True)
class TokenRow:
    token_hash: bytes
    family_id: str
    issued_at: datetime
    expires_at: datetime
    consumed_at: datetime | None


async def family_of(engine: AsyncEngine, token: str) -> str:
    row = await token_row(engine, token)
    assert row is not None, "the token is not in the database"
    return row.family_id


async def family_row(engine: AsyncEngine, family_id: str) -> Any:
    """The family's row (columns as attributes)."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(families).where(families.c.id == family_id))).one_or_none()
    assert row is not None
    return row


async def token_row(engine: AsyncEngine, token: str) -> TokenRow | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(select(refresh_tokens).where(refresh_tokens.c.token_hash == sha256(token)))
        ).one_or_none()
    return None if row is None else TokenRow(*row)


async def live_tokens(engine: AsyncEngine, family_id: str, now: datetime) -> int:
    async with engine.connect() as conn:
        return await _live_token_count(conn, family_id, now)


async def _live_token_count(conn: AsyncConnection, family_id: str, now: datetime) -> int:
    """Unconsumed, unexpired tokens of the family (whatever the family's own state)."""
    return (
        await conn.execute(
            select(func.count())
            .select_from(refresh_tokens)
            .where(
                refresh_tokens.c.family_id == family_id,
                refresh_tokens.c.consumed_at.is_(None),
                refresh_tokens.c.expires_at > now,
            )
        )
    ).scalar_one()


async def token_count(engine: AsyncEngine, family_id: str) -> int:
    async with engine.connect() as conn:
        return (
            await conn.execute(
                select(func.count()).select_from(refresh_tokens).where(refresh_tokens.c.family_id == family_id)
            )
        ).scalar_one()


async def assert_single_chain(engine: AsyncEngine, now: datetime) -> None:
    """The family invariant: no family ever holds two unconsumed tokens (expired or not).

    Login inserts one unconsumed token and every rotation consumes one and inserts one, so more than one
    unconsumed row in a family means two live successors were minted. Also, every family that is neither
    revoked nor past any expiry has exactly one redeemable token (never zero: a half-done rotation).
    """
    async with engine.connect() as conn:
        doubled = (
            await conn.execute(
                select(refresh_tokens.c.family_id, func.count())
                .where(refresh_tokens.c.consumed_at.is_(None))
                .group_by(refresh_tokens.c.family_id)
                .having(func.count() > 1)
            )
        ).all()
        assert doubled == [], f"families with more than one unconsumed token: {doubled}"
        live_families = (
            await conn.execute(
                select(families.c.id).where(
                    families.c.revoked_at.is_(None), families.c.expires_at > now, families.c.idle_expires_at > now
                )
            )
        ).scalars()
        for family_id in live_families:
            count = await _live_token_count(conn, family_id, now)
            assert count == 1, f"live family {family_id} has {count} redeemable tokens"


def refresh_cookie_request(client: httpx.AsyncClient, token: str) -> dict[str, str]:
    """Headers for a cookie refresh, with the client's own jar emptied so only this token is sent."""
    client.cookies.clear()
    return {"Cookie": f"refresh_token={token}"}


def set_cookie_attributes(response: httpx.Response) -> dict[str, str]:
    """The refresh_token Set-Cookie header as {attribute-lower: value}; the cookie value under 'refresh_token'."""
    headers = [h for h in response.headers.get_list("set-cookie") if h.startswith("refresh_token=")]
    assert len(headers) == 1, response.headers
    parts = [p.strip() for p in headers[0].split(";")]
    name, _, value = parts[0].partition("=")
    attributes = {name: value}
    for part in parts[1:]:
        key, _, val = part.partition("=")
        attributes[key.lower()] = val
    return attributes
