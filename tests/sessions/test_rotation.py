"""Rotation (contract sections 2 and 4): a refresh consumes the presented token and returns its successor in
the same family. What it hands out (256-bit opaque tokens), what it stores (their SHA-256 only), and what it
refuses (anything that is not a live token of ours) without touching the real session."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.errors import InvalidGrant
from issuer.sessions import tokens
from issuer.storage.schema import families, refresh_tokens, signing_keys, users
from tests.sessions.conftest import db_error_count, reuse_count
from tests.support.families import (
    REFRESH_TOKEN_SHAPE,
    assert_token_response,
    family_of,
    family_row,
    login_response,
    refresh_cookie,
    rotate_ok,
    sha256,
    start_session,
    token_count,
)
from tests.support.http import assert_error, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims


async def test_refresh_rotates_the_token_within_its_family(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login_response(client, transport="body")
    access, first = assert_token_response(response, user, transport="body")
    assert (await client.get("/auth/me", headers=bearer(access))).json() == {**user, "tokenVersion": 0}

    issuer.clock.advance(30)
    rotated = await refresh_body(client, first)
    access2, second = assert_token_response(rotated, user, transport="body")
    assert second != first
    assert jwt_claims(access2)["sid"] == jwt_claims(access)["sid"]
    assert (await client.get("/auth/me", headers=bearer(access2))).status_code == 200


# ---------------------------------------------------------------- what is handed out, what is stored


async def all_rows(engine: AsyncEngine) -> list[tuple[str, str, object]]:
    cells: list[tuple[str, str, object]] = []
    async with engine.connect() as conn:
        for table in (refresh_tokens, families, users, signing_keys):
            for row in (await conn.execute(select(table))).mappings():
                cells.extend((table.name, column, value) for column, value in row.items())
    return cells


def _random_part(token: str) -> bytes:
    """The 256 random bits after the user's route (issuer.sessions.tokens)."""
    return base64.urlsafe_b64decode(token[tokens.ROUTE_LENGTH :] + "=")


def _forms(token: str) -> tuple[list[str], list[bytes]]:
    raw = _random_part(token)
    texts = [token, raw.hex(), base64.b64encode(raw).decode().rstrip("=")]
    return texts, [token.encode(), raw, raw.hex().encode()]


async def test_tokens_are_stored_only_as_sha256(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    engine, clock = issuer.engine, issuer.clock
    issued = [(await start_session(client))["refresh_token"], (await login(client))["refresh_token"]]
    current = issued[0]
    for _ in range(3):
        current = (await rotate_ok(client, current))["refresh_token"]
        issued.append(current)
    clock.advance(1)
    assert (await rotate_ok(client, issued[-2]))["refresh_token"] == current  # a replay stores nothing new
    upcoming = issuer.services.families.successor_of(current)  # derivable, so must not be stored either

    cells = await all_rows(engine)
    assert cells
    for token in [*issued, upcoming]:
        texts, blobs = _forms(token)
        for table, column, value in cells:
            if isinstance(value, str):
                assert not any(t in value for t in texts), f"{table}.{column} holds a refresh token"
            elif isinstance(value, bytes | bytearray | memoryview):
                data = bytes(value)
                assert not any(b in data for b in blobs), f"{table}.{column} holds a refresh token"
            else:
                assert not any(t in str(value) for t in texts), f"{table}.{column} holds a refresh token"

    async with engine.connect() as conn:
        hashes = set((await conn.execute(select(refresh_tokens.c.token_hash))).scalars())
    assert {bytes(h) for h in hashes} == {sha256(t) for t in issued}
    assert all(len(bytes(h)) == 32 for h in hashes)


async def test_refresh_tokens_are_256_bit_base64url_and_not_jwts(client: httpx.AsyncClient) -> None:
    issued = [(await start_session(client))["refresh_token"]]
    issued += [(await login(client))["refresh_token"] for _ in range(20)]
    issued.append((await rotate_ok(client, issued[-1]))["refresh_token"])  # a successor has the same shape
    for token in issued:
        assert REFRESH_TOKEN_SHAPE.fullmatch(token), token
        assert "." not in token
        assert len(_random_part(token)) == 32
    assert len(set(issued)) == len(issued)
    # 21 logins' worth of random bits: no byte position is constant (a weak or counter-based generator).
    raws = [_random_part(t) for t in issued[:-1]]
    assert all(len({raw[i] for raw in raws}) > 1 for i in range(32))


# ---------------------------------------------------------------- what is not a live token of ours


def _malformed(valid: str, jwt: str) -> list[str]:
    return [
        valid[:-1],  # 42 characters
        valid + "A",  # 44 characters
        valid + "=",  # padded
        valid + "\n",
        " " + valid[1:],
        valid[:-1] + "+",
        valid[:-1] + "/",
        valid[:-1] + ".",
        valid[:-1] + "é",
        valid[:-1] + "\x00",
        valid[:-1] + "\ud800",
        "٣" * 43,  # non-ASCII digits
        jwt,  # an access token is not a refresh token
        jwt.split(".")[0][:43],
        "x" * 15000,
        "null",
    ]


async def test_malformed_tokens_are_invalid_grant_without_database_errors(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    engine, clock = issuer.engine, issuer.clock
    first = await start_session(client)
    valid = first["refresh_token"]
    family_id = await family_of(engine, valid)
    for bad in _malformed(valid, first["access_token"]):
        # ASCII-escaped JSON, so that a lone surrogate can be sent at all.
        body = json.dumps({"refresh_token": bad}).encode()
        headers = {"Content-Type": "application/json"}
        assert_error(await client.post("/auth/refresh", content=body, headers=headers), 401, "invalid_grant")
        with pytest.raises(InvalidGrant):
            await issuer.services.families.rotate(bad, now=clock())
        assert (await client.post("/auth/logout", content=body, headers=headers)).status_code == 204
    for bad in [valid[:-1], valid + "A", first["access_token"]]:
        assert_error(await refresh_cookie(client, bad), 401, "invalid_grant")
    assert_error(await refresh_body(client, ""), 401, "invalid_grant")
    assert db_error_count(issuer) == 0
    assert reuse_count(issuer) == 0
    # None of it touched the real session.
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await token_count(engine, family_id) == 1
    await rotate_ok(client, valid)


async def test_unknown_well_formed_token_is_invalid_grant(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    engine = issuer.engine
    valid = (await start_session(client))["refresh_token"]
    forged = ("A" if valid[0] != "A" else "B") + valid[1:]
    assert_error(await refresh_body(client, forged), 401, "invalid_grant")
    # Guessing the successor without the server secret is just an unknown token.
    assert_error(await refresh_body(client, valid[::-1]), 401, "invalid_grant")
    assert (await family_row(engine, await family_of(engine, valid))).revoked_at is None
    await rotate_ok(client, valid)


async def test_unknown_and_garbage_refresh_tokens(client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    for presented in ("A" * 43, tokens["refresh_token"] + "x", tokens["refresh_token"][:-1], "not-a-token", ""):
        assert_error(await refresh_body(client, presented), 401, "invalid_grant")
    client.cookies.clear()
    assert_error(await client.post("/auth/refresh"), 401, "invalid_grant")
    assert_error(await client.post("/auth/refresh", json={}), 401, "invalid_grant")
    # None of that disturbed the real token.
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200
