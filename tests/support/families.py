"""Refresh-token families as the tests see them (not collected: no ``test_`` prefix).

- Table oracles: reads of ``refresh_families`` and ``refresh_tokens`` through SQLAlchemy Core on
  :mod:`issuer.storage.schema` (``IssuerHarness.engine``), independent of the production statements.
- The refresh token's transports: the cookie (``Set-Cookie`` parsed, the contract's attributes checked)
  and the token response.
- The client steps every session test takes: log in (start a family), rotate a token.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.expression import ColumnElement

from issuer.storage.schema import families, refresh_tokens
from tests.support.http import PASSWORD, login, refresh_body

ALICE = "alice@example.com"
# A refresh token: the user's route (22 characters) and 256 random bits, base64url without padding (contract
# section 2; issuer.sessions.tokens).
REFRESH_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{22}[A-Za-z0-9_-]{43}")
COOKIE_NAME = "refresh_token"


def sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


# ---------------------------------------------------------------- table oracles


@dataclass(frozen=True)
class TokenRow:
    token_hash: bytes
    family_id: str
    user_id: str
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
    return await row_count(engine, refresh_tokens, refresh_tokens.c.family_id == family_id)


async def row_count(engine: AsyncEngine, table: Table, *where: ColumnElement[bool]) -> int:
    """Rows of ``table`` (matching every ``where`` clause, if any)."""
    query = select(func.count()).select_from(table)
    if where:
        query = query.where(*where)
    async with engine.connect() as conn:
        return (await conn.execute(query)).scalar_one()


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


# ---------------------------------------------------------------- the cookie


def parse_set_cookies(response: httpx.Response) -> dict[str, tuple[str, dict[str, str | None]]]:
    """Set-Cookie headers by cookie name: (value, attributes by lower-cased name; None for a flag)."""
    parsed: dict[str, tuple[str, dict[str, str | None]]] = {}
    for header in response.headers.get_list("set-cookie"):
        first, *rest = (part.strip() for part in header.split(";"))
        name, _, value = first.partition("=")
        attributes: dict[str, str | None] = {}
        for item in rest:
            key, eq, attr_value = item.partition("=")
            attributes[key.strip().lower()] = attr_value.strip() if eq else None
        assert name not in parsed, f"two Set-Cookie headers for {name}"
        parsed[name] = (value, attributes)
    return parsed


def set_cookie_attributes(response: httpx.Response) -> dict[str, str]:
    """The refresh_token Set-Cookie header as {attribute-lower: value ('' for a flag)}; the cookie value under
    'refresh_token'."""
    cookies = parse_set_cookies(response)
    assert COOKIE_NAME in cookies, response.headers
    value, attributes = cookies[COOKIE_NAME]
    return {COOKIE_NAME: value, **{name: attribute or "" for name, attribute in attributes.items()}}


def assert_refresh_cookie(response: httpx.Response, max_age: int) -> str:
    """The response sets exactly the contract's refresh cookie, and nothing else; returns its value."""
    cookies = parse_set_cookies(response)
    assert set(cookies) == {COOKIE_NAME}, response.headers.get_list("set-cookie")
    value, attributes = cookies[COOKIE_NAME]
    assert set(attributes) == {"httponly", "secure", "samesite", "path", "max-age"}, attributes
    assert attributes["httponly"] is None
    assert attributes["secure"] is None
    assert (attributes["samesite"] or "").lower() == "strict"
    assert attributes["path"] == "/auth"
    assert attributes["max-age"] == str(max_age)
    assert REFRESH_TOKEN_SHAPE.fullmatch(value), value
    return value


def assert_cookie_cleared(response: httpx.Response) -> None:
    cookies = parse_set_cookies(response)
    assert set(cookies) == {COOKIE_NAME}
    value, attributes = cookies[COOKIE_NAME]
    assert value in {"", '""'}
    assert attributes["max-age"] == "0"
    # The clearing cookie must match the original's path, or the browser keeps the original.
    assert attributes["path"] == "/auth"
    assert attributes["httponly"] is None
    assert attributes["secure"] is None


def refresh_cookie_request(client: httpx.AsyncClient, token: str) -> dict[str, str]:
    """Headers for a cookie refresh, with the client's own jar emptied so only this token is sent."""
    client.cookies.clear()
    return {"Cookie": f"{COOKIE_NAME}={token}"}


async def refresh_cookie(
    client: httpx.AsyncClient, token: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST /auth/refresh carrying ``token`` as the only cookie."""
    return await client.post("/auth/refresh", headers={**refresh_cookie_request(client, token), **(headers or {})})


# ---------------------------------------------------------------- token responses and client steps


def assert_token_response(
    response: httpx.Response, user: dict[str, Any], *, transport: str, access_ttl: int = 900, max_age: int = 604800
) -> tuple[str, str]:
    """Checks a login/refresh answer against the contract; returns (access token, refresh token)."""
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    expected_keys = {"access_token", "token_type", "expires_in", "user"}
    if transport == "body":
        expected_keys.add("refresh_token")
    assert set(body) == expected_keys, body
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == access_ttl
    assert body["user"] == user
    assert body["access_token"].count(".") == 2
    if transport == "body":
        assert "set-cookie" not in response.headers, response.headers
        assert REFRESH_TOKEN_SHAPE.fullmatch(body["refresh_token"]), body["refresh_token"]
        return body["access_token"], body["refresh_token"]
    token = assert_refresh_cookie(response, max_age)
    assert token not in response.text
    return body["access_token"], token


async def login_response(
    client: httpx.AsyncClient,
    email: str = ALICE,
    password: str = PASSWORD,
    transport: str | None = "body",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /auth/login, unchecked; ``transport=None`` leaves ``token_transport`` out (the cookie default)."""
    body: dict[str, Any] = {"email": email, "password": password}
    if transport is not None:
        body["token_transport"] = transport
    return await client.post("/auth/login", json=body, headers=headers)


async def start_session(client: httpx.AsyncClient, email: str = ALICE) -> dict[str, Any]:
    """Register (if needed) and log in with body transport: a new family."""
    response = await client.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code in {201, 409}, response.text
    return await login(client, email)


async def rotate_ok(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    """A body refresh that must succeed; its token response."""
    response = await refresh_body(client, token)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
