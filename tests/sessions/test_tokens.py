"""The refresh token's text: the user's route ahead of 256 random bits, so every statement that finds a token
by its hash also names the user a distributed PostgreSQL routes by; tokens from before routes still work."""

from __future__ import annotations

import base64
import uuid

import httpx
from sqlalchemy import insert

from issuer.sessions import tokens
from issuer.storage import sessions
from issuer.storage.schema import refresh_tokens
from tests.support.families import family_of, family_row, sha256
from tests.support.http import bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness

BASE64URL = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


async def test_a_refresh_token_names_its_user_ahead_of_256_random_bits(client: httpx.AsyncClient) -> None:
    user = await register(client)
    token = (await login(client))["refresh_token"]
    assert len(token) == tokens.ROUTE_LENGTH + 43
    assert set(token) <= BASE64URL  # opaque, base64url, not a JWT
    assert str(uuid.UUID(bytes=base64.urlsafe_b64decode(token[: tokens.ROUTE_LENGTH] + "=="))) == user["id"]
    assert len(base64.urlsafe_b64decode(token[tokens.ROUTE_LENGTH :] + "=")) == 32
    successor = (await refresh_body(client, token)).json()["refresh_token"]
    assert successor[: tokens.ROUTE_LENGTH] == token[: tokens.ROUTE_LENGTH]  # the successor keeps the route


async def test_another_route_on_a_real_token_matches_nothing(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    mallory = await register(client, email="mallory@example.com")
    token = (await login(client))["refresh_token"]
    rerouted = tokens.parse(tokens.new(mallory["id"]).text[: tokens.ROUTE_LENGTH] + token[tokens.ROUTE_LENGTH :])
    assert rerouted is not None
    assert (await refresh_body(client, rerouted.text)).status_code == 401
    # And at the statement: the right hash under another user's route is no row.
    presented = tokens.parse(token)
    assert presented is not None
    db = issuer.services.db
    now = issuer.clock()
    assert await sessions.live_token_owner(db, presented.hash, now, route=mallory["id"]) is None
    assert await sessions.live_token_owner(db, presented.hash, now, route=presented.user_id) is not None
    assert (await refresh_body(client, token)).status_code == 200


async def test_a_token_from_before_routes_still_refreshes(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """A session started before the upgrade holds a 43-character token: it keeps working, unrouted."""
    await register(client)
    current = (await login(client))["refresh_token"]
    family_id = await family_of(issuer.engine, current)
    legacy = tokens.parse(base64.urlsafe_b64encode(uuid.uuid4().bytes * 2).rstrip(b"=").decode())
    assert legacy is not None
    assert legacy.user_id is None
    async with issuer.engine.begin() as conn:  # the family's live token, as the old code stored it
        await conn.execute(refresh_tokens.update().values(consumed_at=issuer.clock()))
        await conn.execute(
            insert(refresh_tokens).values(
                token_hash=sha256(legacy.text),
                family_id=family_id,
                user_id=(await family_row(issuer.engine, family_id)).user_id,
                issued_at=issuer.clock(),
                expires_at=issuer.clock().replace(year=2100),
            )
        )
    rotated = await refresh_body(client, legacy.text)
    assert rotated.status_code == 200, rotated.text
    assert len(rotated.json()["refresh_token"]) == 43
    me = await client.get("/auth/me", headers=bearer(rotated.json()["access_token"]))
    assert me.status_code == 200
