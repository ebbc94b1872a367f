"""The reuse-grace window (contract section 4): within REFRESH_REUSE_GRACE seconds of a rotation, the token
just rotated, presented again while its successor is unused, gets that same successor back (and a fresh
access token); the family stays one chain with one live token."""

from __future__ import annotations

import httpx

from issuer.sessions.families import Rotation
from tests.sessions.conftest import GRACE, reuse_count
from tests.support.families import (
    assert_single_chain,
    assert_token_response,
    family_of,
    family_row,
    live_tokens,
    login_response,
    rotate_ok,
    start_session,
    token_count,
)
from tests.support.http import assert_error, refresh_body, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims


async def test_repeat_inside_grace_returns_same_successor_and_fresh_access_token(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    assert issuer.services.settings.refresh_reuse_grace == GRACE
    engine, clock = issuer.engine, issuer.clock
    first = await start_session(client)
    token = first["refresh_token"]
    family_id = await family_of(engine, token)
    rotated = await rotate_ok(client, token)
    successor = rotated["refresh_token"]

    clock.advance(GRACE - 1)
    replayed = await rotate_ok(client, token)

    assert replayed["refresh_token"] == successor
    assert replayed["access_token"] != rotated["access_token"]
    claims, earlier = jwt_claims(replayed["access_token"]), jwt_claims(rotated["access_token"])
    assert claims["jti"] != earlier["jti"]
    assert claims["iat"] == earlier["iat"] + GRACE - 1  # freshly minted now, not a cached response
    assert claims["sid"] == family_id
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await live_tokens(engine, family_id, clock()) == 1
    assert await token_count(engine, family_id) == 2  # the replay minted no token
    assert reuse_count(issuer) == 0

    # The family is still one chain: the successor rotates normally afterwards.
    newest = await rotate_ok(client, successor)
    assert newest["refresh_token"] not in {token, successor}
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


async def test_repeat_at_the_end_of_the_window_returns_the_same_successor(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    """Exactly REFRESH_REUSE_GRACE seconds after the rotation is still inside the window."""
    user = await register(client)
    _, t0 = assert_token_response(await login_response(client), user, transport="body")
    _, t1 = assert_token_response(await refresh_body(client, t0), user, transport="body")
    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace)
    _, again = assert_token_response(await refresh_body(client, t0), user, transport="body")
    assert again == t1
    # Still one chain: t1 works once, then t0 is outside its window and is theft.
    _, t2 = assert_token_response(await refresh_body(client, t1), user, transport="body")
    assert_error(await refresh_body(client, t0), 401, "invalid_grant")
    assert_error(await refresh_body(client, t2), 401, "invalid_grant")


async def test_replay_is_flagged_as_replayed_at_service_level(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    token = (await start_session(client))["refresh_token"]
    families_service, clock = issuer.services.families, issuer.clock
    first: Rotation = await families_service.rotate(token, now=clock())
    assert first.replayed is False
    clock.advance(1)
    again = await families_service.rotate(token, now=clock())
    assert again.replayed is True
    assert again.refresh == first.refresh  # same token, family and expiry
    assert again.user == first.user


async def test_replays_do_not_extend_the_window(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    engine, clock = issuer.engine, issuer.clock
    token = (await start_session(client))["refresh_token"]
    successor = (await rotate_ok(client, token))["refresh_token"]
    for _ in range(3):
        clock.advance(3)
        assert (await rotate_ok(client, token))["refresh_token"] == successor  # t = 3, 6, 9
    clock.advance(3)  # t = 12: past the window measured from the rotation, not from the last replay
    assert_error(await refresh_body(client, token), 401, "invalid_grant")
    assert (await family_row(engine, await family_of(engine, token))).revoked_reason == "reuse"
