"""Reuse detection (contract section 4): a consumed refresh token presented again, outside the grace window
or after its successor was used, is theft: the whole family is revoked, so the thief's and the victim's
current tokens both die, and the event is counted."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from issuer.storage.schema import families
from tests.sessions.conftest import GRACE, MakeIssuer, reuse_count
from tests.support.families import (
    assert_single_chain,
    assert_token_response,
    family_of,
    family_row,
    login_response,
    refresh_cookie,
    rotate_ok,
    start_session,
)
from tests.support.http import assert_error, bearer, refresh_body, refused_soon, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims


@pytest.mark.parametrize("late_by", [1, 60, 86400])
async def test_repeat_after_grace_revokes_family(
    issuer: IssuerHarness, client: httpx.AsyncClient, late_by: int
) -> None:
    engine, clock = issuer.engine, issuer.clock
    token = (await start_session(client))["refresh_token"]
    family_id = await family_of(engine, token)
    successor = (await rotate_ok(client, token))["refresh_token"]

    clock.advance(GRACE + late_by)
    assert_error(await refresh_body(client, token), 401, "invalid_grant")

    family = await family_row(engine, family_id)
    assert family.revoked_at == clock()
    assert family.revoked_reason == "reuse"
    assert reuse_count(issuer) == 1
    # The victim's current token dies with the thief's.
    assert_error(await refresh_body(client, successor), 401, "invalid_grant")
    # A second reuse is refused and counted as neither a new revocation nor a success.
    assert_error(await refresh_body(client, token), 401, "invalid_grant")
    assert (await family_row(engine, family_id)).revoked_at == family.revoked_at
    assert reuse_count(issuer) == 1
    await assert_single_chain(engine, clock())


async def test_reuse_of_an_older_token_kills_the_newest_and_ends_the_session(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    _, t0 = assert_token_response(await login_response(client), user, transport="body")
    _, t1 = assert_token_response(await refresh_body(client, t0), user, transport="body")
    issuer.clock.advance(5)
    access2, t2 = assert_token_response(await refresh_body(client, t1), user, transport="body")
    sid = jwt_claims(access2)["sid"]

    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace + 1)
    # The thief replays an old token: refused, and the whole family dies with it.
    assert_error(await refresh_body(client, t1), 401, "invalid_grant")
    assert_error(await refresh_body(client, t2), 401, "invalid_grant")
    assert_error(await refresh_body(client, t0), 401, "invalid_grant")
    # The session's access token dies with it, at the issuer too (once the revocation's event is read).
    assert_error(await refused_soon(client, access2), 401, "invalid_token")
    other = (await login_response(client)).json()["access_token"]
    sessions = await client.get("/auth/sessions", headers=bearer(other))
    assert sessions.status_code == 200, sessions.text
    assert sid not in {s["id"] for s in sessions.json()["sessions"]}
    async with issuer.engine.connect() as conn:
        reason = (await conn.execute(select(families.c.revoked_reason).where(families.c.id == sid))).scalar_one()
    assert reason == "reuse"


async def test_reuse_of_a_cookie_token_kills_the_cookie_holder_too(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    _, t0 = assert_token_response(await login_response(client, transport=None), user, transport="cookie")
    _, t1 = assert_token_response(await refresh_cookie(client, t0), user, transport="cookie")
    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace + 1)
    assert_error(await refresh_cookie(client, t0), 401, "invalid_grant")
    assert_error(await refresh_cookie(client, t1), 401, "invalid_grant")


async def test_repeat_inside_grace_after_successor_was_used_revokes_family(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    engine, clock = issuer.engine, issuer.clock
    token = (await start_session(client))["refresh_token"]
    family_id = await family_of(engine, token)
    successor = (await rotate_ok(client, token))["refresh_token"]
    clock.advance(1)
    newest = (await rotate_ok(client, successor))["refresh_token"]
    clock.advance(1)

    # Still inside the window of the first rotation, but the successor is spent: this is theft.
    assert_error(await refresh_body(client, token), 401, "invalid_grant")
    family = await family_row(engine, family_id)
    assert family.revoked_reason == "reuse"
    assert_error(await refresh_body(client, newest), 401, "invalid_grant")
    assert_error(await refresh_body(client, successor), 401, "invalid_grant")
    assert reuse_count(issuer) == 1


async def test_grace_zero_makes_every_repeat_theft(make_issuer: MakeIssuer) -> None:
    async with make_issuer(refresh_reuse_grace=0) as harness, harness.client() as client:
        engine = harness.engine
        user = await register(client)
        _, token = assert_token_response(await login_response(client), user, transport="body")
        _, successor = assert_token_response(await refresh_body(client, token), user, transport="body")
        # No time passes at all: still theft.
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await family_row(engine, await family_of(engine, token))).revoked_reason == "reuse"
        assert reuse_count(harness) == 1
        assert_error(await refresh_body(client, successor), 401, "invalid_grant")
