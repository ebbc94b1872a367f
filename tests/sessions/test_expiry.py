"""Expiry, driven by the FakeClock: a refresh token lives REFRESH_TOKEN_TTL after it is issued (sliding), never
past its family's SESSION_MAX_AGE (absolute); an expired token is refused without being taken for a reused
one, and an ended session yields nothing, not even a grace replay."""

from __future__ import annotations

from datetime import timedelta

import pytest

from issuer.errors import InvalidGrant
from issuer.storage import sessions
from issuer.storage.schema import families
from tests.sessions.conftest import MakeIssuer, db_error_count, reuse_count
from tests.support.families import (
    assert_single_chain,
    assert_token_response,
    family_of,
    family_row,
    login_response,
    refresh_cookie,
    rotate_ok,
    set_cookie_attributes,
    start_session,
    token_count,
    token_row,
)
from tests.support.http import assert_error, bearer, login, refresh_body, register
from tests.support.jwt import jwt_claims

# Short lifetimes for the flows below: (access token, refresh token, session), in seconds.
SHORT = {"access_token_ttl": 60, "refresh_token_ttl": 600, "session_max_age": 1000}


async def test_expired_token_is_refused_without_revoking_the_family(make_issuer: MakeIssuer) -> None:
    async with make_issuer(access_token_ttl=60, refresh_token_ttl=120) as harness, harness.client() as client:
        engine, clock = harness.engine, harness.clock
        token = (await start_session(client))["refresh_token"]
        family_id = await family_of(engine, token)
        successor = (await rotate_ok(client, token))["refresh_token"]

        clock.advance(119)
        successor = (await rotate_ok(client, successor))["refresh_token"]  # sliding: good for 120 s more
        clock.advance(121)

        assert_error(await refresh_body(client, successor), 401, "invalid_grant")
        family = await family_row(engine, family_id)
        assert family.revoked_at is None
        assert family.revoked_reason is None
        row = await token_row(engine, successor)
        assert row is not None
        assert row.consumed_at is None  # refused, not consumed
        assert await token_count(engine, family_id) == 3  # and nothing minted
        assert reuse_count(harness) == 0
        assert db_error_count(harness) == 0
        # Asking again changes nothing: an expired token is never mistaken for a reused one.
        assert_error(await refresh_body(client, successor), 401, "invalid_grant")
        assert (await family_row(engine, family_id)).revoked_at is None
        assert await sessions.active(harness.services.db, family.user_id, clock()) == []
        await assert_single_chain(engine, clock())


async def test_token_one_second_before_expiry_still_rotates(make_issuer: MakeIssuer) -> None:
    async with make_issuer(access_token_ttl=60, refresh_token_ttl=120) as harness, harness.client() as client:
        token = (await start_session(client))["refresh_token"]
        harness.clock.advance(119)
        await rotate_ok(client, token)


async def test_refresh_token_expires_after_its_ttl(make_issuer: MakeIssuer) -> None:
    async with make_issuer(**SHORT) as harness, harness.client() as client:
        clock = harness.clock
        user = await register(client)
        kept = assert_token_response(await login_response(client), user, transport="body", access_ttl=60, max_age=600)
        _, idle = assert_token_response(
            await login_response(client, transport=None), user, transport="cookie", access_ttl=60, max_age=600
        )

        clock.advance(599)
        access, refreshed = assert_token_response(
            await refresh_body(client, kept[1]), user, transport="body", access_ttl=60
        )
        clock.advance(1)
        # Exactly REFRESH_TOKEN_TTL old: dead, via either transport.
        assert_error(await refresh_cookie(client, idle), 401, "invalid_grant")
        assert_error(await refresh_body(client, idle), 401, "invalid_grant")
        # The sliding one lives on, and idle sessions are no longer listed.
        listed = (await client.get("/auth/sessions", headers=bearer(access))).json()["sessions"]
        assert [s["id"] for s in listed] == [jwt_claims(access)["sid"]]
        assert (await refresh_body(client, refreshed)).status_code == 200


async def test_sliding_expiry_is_capped_by_the_session_max_age(make_issuer: MakeIssuer) -> None:
    """Each rotation's token lives min(now + REFRESH_TOKEN_TTL, family expiry); past SESSION_MAX_AGE: refused."""
    changes = {"access_token_ttl": 60, "refresh_token_ttl": 100, "session_max_age": 250}
    async with make_issuer(**changes) as harness, harness.client() as client:
        engine, clock = harness.engine, harness.clock
        t0 = clock()
        user = await register(client)
        response = await login_response(client, transport=None)
        _, token = assert_token_response(response, user, transport="cookie", access_ttl=60, max_age=100)
        family_id = await family_of(engine, token)
        family = await family_row(engine, family_id)
        assert family.expires_at == t0 + timedelta(seconds=250)
        assert family.idle_expires_at == t0 + timedelta(seconds=100)

        # (seconds since login, expected token lifetime left in the cookie, expected absolute expiry)
        steps = [(90, 100, 190), (180, 70, 250), (240, 10, 250), (249, 1, 250)]
        for at, max_age, expires in steps:
            clock.advance(at - int((clock() - t0).total_seconds()))
            response = await refresh_cookie(client, token)
            previous = token
            _, token = assert_token_response(response, user, transport="cookie", access_ttl=60, max_age=max_age)
            cookie = set_cookie_attributes(response)
            row = await token_row(engine, token)
            assert row is not None
            assert row.expires_at == t0 + timedelta(seconds=expires), at
            assert row.issued_at == clock()
            family = await family_row(engine, family_id)
            assert family.last_used_at == clock()
            assert family.idle_expires_at == row.expires_at
            assert family.expires_at == t0 + timedelta(seconds=250)  # never extended

        # A grace replay answers with the successor's own remaining lifetime.
        response = await refresh_cookie(client, previous)
        assert response.status_code == 200, response.text
        assert set_cookie_attributes(response) == cookie
        assert set_cookie_attributes(response)["refresh_token"] == token

        clock.advance(1)  # t0 + 250: the session is over
        assert_error(await refresh_cookie(client, token), 401, "invalid_grant")
        # Even a replay inside the grace window is refused once the family has expired.
        assert_error(await refresh_body(client, previous), 401, "invalid_grant")
        with pytest.raises(InvalidGrant):
            await harness.services.families.rotate(token, now=clock())
        clock.advance(86400)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await token_row(engine, token)).consumed_at is None  # type: ignore[union-attr]
        await assert_single_chain(engine, clock())


async def test_session_max_age_is_absolute(make_issuer: MakeIssuer) -> None:
    async with make_issuer(**SHORT) as harness, harness.client() as client:
        clock = harness.clock
        user = await register(client)
        _, token = assert_token_response(
            await login_response(client, transport=None), user, transport="cookie", access_ttl=60, max_age=600
        )
        clock.advance(500)
        _, token = assert_token_response(
            await refresh_cookie(client, token), user, transport="cookie", access_ttl=60, max_age=500
        )
        clock.advance(490)
        # Issued at 990: the cookie may live only until the family's end at 1000.
        access, token = assert_token_response(
            await refresh_cookie(client, token), user, transport="cookie", access_ttl=60, max_age=10
        )
        clock.advance(9)
        listed = (await client.get("/auth/sessions", headers=bearer(access))).json()["sessions"]
        assert len(listed) == 1
        clock.advance(1)
        # The latest token is only 10 seconds old, but the session has ended.
        assert_error(await refresh_cookie(client, token), 401, "invalid_grant")
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        relogin = await login(client)
        relisted = (await client.get("/auth/sessions", headers=bearer(relogin["access_token"]))).json()["sessions"]
        assert [s["id"] for s in relisted] == [jwt_claims(relogin["access_token"])["sid"]]


async def test_grace_replay_cannot_outlive_the_session(make_issuer: MakeIssuer) -> None:
    async with make_issuer(**SHORT) as harness, harness.client() as client:
        clock = harness.clock
        await register(client)
        tokens = await login(client)
        clock.advance(500)
        middle = (await rotate_ok(client, tokens["refresh_token"]))["refresh_token"]
        clock.advance(495)
        await rotate_ok(client, middle)
        clock.advance(4)
        await rotate_ok(client, middle)  # a replay, inside the grace window
        clock.advance(1)
        # Inside the reuse grace, but the family is over.
        assert_error(await refresh_body(client, middle), 401, "invalid_grant")


async def test_family_past_session_max_age_is_refused_even_with_a_fresh_token(make_issuer: MakeIssuer) -> None:
    """Forge the worst case in the database: a token whose own expiry outlives its family."""
    async with make_issuer() as harness, harness.client() as client:
        engine, clock = harness.engine, harness.clock
        token = (await start_session(client))["refresh_token"]
        family_id = await family_of(engine, token)
        async with engine.begin() as conn:
            await conn.execute(
                families.update().where(families.c.id == family_id).values(expires_at=clock() + timedelta(seconds=5))
            )
        clock.advance(5)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await token_row(engine, token)).consumed_at is None  # type: ignore[union-attr]
