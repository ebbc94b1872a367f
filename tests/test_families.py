"""Refresh-token families (contract section 4) on both backends, driven by the FakeClock.

Grace-window replays, theft detection, revocation, sliding and absolute expiry, hashed storage, token
shape, malformed tokens, logout and logout-all.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.errors import InvalidGrant, RefreshTokenReused
from issuer.sessions.families import Rotation
from issuer.settings import Settings
from issuer.storage import store
from issuer.storage.schema import families, refresh_tokens, signing_keys, users
from tests.support.clock import FakeClock
from tests.support.families import (
    assert_single_chain,
    family_of,
    family_row,
    jwt_claims,
    live_tokens,
    refresh_cookie_request,
    set_cookie_attributes,
    sha256,
    token_count,
    token_row,
)
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings

GRACE = 10
BASE64URL_256 = re.compile(r"[A-Za-z0-9_-]{43}")

MakeIssuer = Callable[..., contextlib.AbstractAsyncContextManager[IssuerHarness]]


@pytest.fixture
def make_issuer(settings: Settings, clock: FakeClock, pg_url: str) -> MakeIssuer:
    """An issuer on the parametrized backend, with optional setting changes."""

    def make(**changes: Any) -> contextlib.AbstractAsyncContextManager[IssuerHarness]:
        return running_issuer(with_settings(settings, database_url=pg_url, **changes), clock)

    return make


@pytest.fixture
async def app(make_issuer: MakeIssuer) -> AsyncIterator[IssuerHarness]:
    async with make_issuer() as harness:
        yield harness


@pytest.fixture
async def http(app: IssuerHarness) -> AsyncIterator[httpx.AsyncClient]:
    async with app.client() as client:
        yield client


async def start(client: httpx.AsyncClient, email: str = "alice@example.com") -> dict[str, Any]:
    """Register (if needed) and log in with body transport."""
    response = await client.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code in {201, 409}, response.text
    return await login(client, email)


async def rotate_ok(client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    response = await refresh_body(client, token)
    assert response.status_code == 200, response.text
    return response.json()


def engine_of(app: IssuerHarness) -> AsyncEngine:
    return app.engine


def reuse_count(app: IssuerHarness) -> float:
    return app.services.metrics.reuse_detections._value.get()


def db_error_count(app: IssuerHarness) -> float:
    return app.services.metrics.db_errors._value.get()


# ---------------------------------------------------------------- the grace window


async def test_repeat_inside_grace_returns_same_successor_and_fresh_access_token(
    app: IssuerHarness, http: httpx.AsyncClient
) -> None:
    engine, clock = engine_of(app), app.clock
    first = await start(http)
    token = first["refresh_token"]
    family_id = await family_of(engine, token)
    rotated = await rotate_ok(http, token)
    successor = rotated["refresh_token"]

    clock.advance(GRACE - 1)
    replayed = await rotate_ok(http, token)

    assert replayed["refresh_token"] == successor
    assert replayed["access_token"] != rotated["access_token"]
    claims, earlier = jwt_claims(replayed["access_token"]), jwt_claims(rotated["access_token"])
    assert claims["jti"] != earlier["jti"]
    assert claims["iat"] == earlier["iat"] + GRACE - 1  # freshly minted now, not a cached response
    assert claims["sid"] == family_id
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await live_tokens(engine, family_id, clock()) == 1
    assert await token_count(engine, family_id) == 2  # the replay minted no token
    assert reuse_count(app) == 0

    # The family is still one chain: the successor rotates normally afterwards.
    newest = await rotate_ok(http, successor)
    assert newest["refresh_token"] not in {token, successor}
    assert await live_tokens(engine, family_id, clock()) == 1
    await assert_single_chain(engine, clock())


async def test_replay_is_flagged_as_replayed_at_service_level(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    token = (await start(http))["refresh_token"]
    families_service, clock = app.services.families, app.clock
    first: Rotation = await families_service.rotate(token, now=clock())
    assert first.replayed is False
    clock.advance(1)
    again = await families_service.rotate(token, now=clock())
    assert again.replayed is True
    assert again.refresh == first.refresh  # same token, family and expiry
    assert again.user == first.user


async def _logout_all(app: IssuerHarness, user_id: str, successor: str) -> None:
    await app.services.accounts.logout_all(user_id, now=app.clock())


async def _logout(app: IssuerHarness, user_id: str, successor: str) -> None:
    await app.services.families.revoke_by_token(successor, now=app.clock())


async def _delete_account(app: IssuerHarness, user_id: str, successor: str) -> None:
    async with engine_of(app).begin() as conn:
        await store.delete_user(conn, user_id)


@pytest.mark.parametrize("interloper", [_logout_all, _logout, _delete_account])
async def test_a_replay_racing_a_revocation_yields_nothing(
    app: IssuerHarness,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    interloper: Callable[[IssuerHarness, str, str], Any],
) -> None:
    """The replay path reads the family, then (no lock held) decides and reads the user. A revocation that
    commits in between must win: with logout-all, a token carrying the new tokenVersion for a revoked
    family would survive the logout-all at every issuer endpoint until it expires."""
    first = await start(http)
    token, user_id = first["refresh_token"], jwt_claims(first["access_token"])["sub"]
    successor = (await rotate_ok(http, token))["refresh_token"]
    app.clock.advance(1)

    read_family = store.token_with_family
    raced: list[bool] = []

    async def then_revoke(conn: Any, token_hash: bytes) -> Any:
        found = await read_family(conn, token_hash)
        if not raced:  # once: right after the replay path has seen the family alive
            raced.append(True)
            await interloper(app, user_id, successor)
        return found

    monkeypatch.setattr(store, "token_with_family", then_revoke)
    assert_error(await refresh_body(http, token), 401, "invalid_grant")
    assert raced == [True]
    monkeypatch.undo()
    assert_error(await refresh_body(http, successor), 401, "invalid_grant")
    assert_error(await refresh_body(http, token), 401, "invalid_grant")


@pytest.mark.parametrize("late_by", [1, 60, 86400])
async def test_repeat_after_grace_revokes_family(app: IssuerHarness, http: httpx.AsyncClient, late_by: int) -> None:
    engine, clock = engine_of(app), app.clock
    token = (await start(http))["refresh_token"]
    family_id = await family_of(engine, token)
    successor = (await rotate_ok(http, token))["refresh_token"]

    clock.advance(GRACE + late_by)
    assert_error(await refresh_body(http, token), 401, "invalid_grant")

    family = await family_row(engine, family_id)
    assert family.revoked_at == clock()
    assert family.revoked_reason == "reuse"
    assert reuse_count(app) == 1
    # The victim's current token dies with the thief's.
    assert_error(await refresh_body(http, successor), 401, "invalid_grant")
    # A second reuse is refused and counted as neither a new revocation nor a success.
    assert_error(await refresh_body(http, token), 401, "invalid_grant")
    assert (await family_row(engine, family_id)).revoked_at == family.revoked_at
    await assert_single_chain(engine, clock())


async def test_replays_do_not_extend_the_window(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine, clock = engine_of(app), app.clock
    token = (await start(http))["refresh_token"]
    successor = (await rotate_ok(http, token))["refresh_token"]
    for _ in range(3):
        clock.advance(3)
        assert (await rotate_ok(http, token))["refresh_token"] == successor  # t = 3, 6, 9
    clock.advance(3)  # t = 12: past the window measured from the rotation, not from the last replay
    assert_error(await refresh_body(http, token), 401, "invalid_grant")
    assert (await family_row(engine, await family_of(engine, token))).revoked_reason == "reuse"


async def test_repeat_inside_grace_after_successor_was_used_revokes_family(
    app: IssuerHarness, http: httpx.AsyncClient
) -> None:
    engine, clock = engine_of(app), app.clock
    token = (await start(http))["refresh_token"]
    family_id = await family_of(engine, token)
    successor = (await rotate_ok(http, token))["refresh_token"]
    clock.advance(1)
    newest = (await rotate_ok(http, successor))["refresh_token"]
    clock.advance(1)

    # Still inside the window of the first rotation, but the successor is spent: this is theft.
    assert_error(await refresh_body(http, token), 401, "invalid_grant")
    family = await family_row(engine, family_id)
    assert family.revoked_reason == "reuse"
    assert_error(await refresh_body(http, newest), 401, "invalid_grant")
    assert_error(await refresh_body(http, successor), 401, "invalid_grant")
    assert reuse_count(app) == 1


async def test_grace_zero_makes_every_repeat_theft(make_issuer: MakeIssuer) -> None:
    async with make_issuer(refresh_reuse_grace=0) as harness, harness.client() as client:
        engine = engine_of(harness)
        token = (await start(client))["refresh_token"]
        successor = (await rotate_ok(client, token))["refresh_token"]
        # No time passes at all: still theft.
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await family_row(engine, await family_of(engine, token))).revoked_reason == "reuse"
        assert_error(await refresh_body(client, successor), 401, "invalid_grant")


# ---------------------------------------------------------------- concurrency on both backends


@pytest.mark.parametrize("grace", [0, GRACE])
async def test_concurrent_rotations_at_service_level(make_issuer: MakeIssuer, grace: int) -> None:
    async with make_issuer(refresh_reuse_grace=grace) as harness, harness.client() as client:
        engine, clock = engine_of(harness), harness.clock
        token = (await start(client))["refresh_token"]
        family_id = await family_of(engine, token)
        service = harness.services.families

        results = await asyncio.gather(*(service.rotate(token, now=clock()) for _ in range(12)), return_exceptions=True)

        wins = [r for r in results if isinstance(r, Rotation)]
        losses = [r for r in results if not isinstance(r, Rotation)]
        assert all(isinstance(r, InvalidGrant) for r in losses), losses
        if grace == 0:
            assert len(wins) == 1
            # The first loser detects the reuse; later ones may already find the family revoked.
            assert any(isinstance(r, RefreshTokenReused) for r in losses)
            assert (await family_row(engine, family_id)).revoked_reason == "reuse"
        else:
            assert len(wins) == 12
            assert len({w.refresh.token for w in wins}) == 1
            assert sum(not w.replayed for w in wins) == 1
            assert (await family_row(engine, family_id)).revoked_at is None
            assert await live_tokens(engine, family_id, clock()) == 1
        await assert_single_chain(engine, clock())


# ---------------------------------------------------------------- revocation


async def _revoke_by_logout_current(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    assert (await client.post("/auth/logout", json={"refresh_token": tokens["current"]})).status_code == 204


async def _revoke_by_logout_old(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    # Logging out with an already-rotated token still ends that session.
    assert (await client.post("/auth/logout", json={"refresh_token": tokens["old"]})).status_code == 204


async def _revoke_by_session_delete(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    sid = jwt_claims(tokens["access"])["sid"]
    response = await client.delete(f"/auth/sessions/{sid}", headers=bearer(tokens["access"]))
    assert response.status_code == 204, response.text


async def _revoke_by_logout_all(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    response = await client.post("/auth/logout-all", headers=bearer(tokens["access"]))
    assert response.status_code == 204, response.text


@pytest.mark.parametrize(
    ("revoke", "reason"),
    [
        (_revoke_by_logout_current, "logout"),
        (_revoke_by_logout_old, "logout"),
        (_revoke_by_session_delete, "session_revoked"),
        (_revoke_by_logout_all, "logout_all"),
    ],
)
async def test_revoked_family_never_yields_a_token(
    app: IssuerHarness, http: httpx.AsyncClient, revoke: Callable[..., Any], reason: str
) -> None:
    engine, clock = engine_of(app), app.clock
    old = (await start(http))["refresh_token"]
    family_id = await family_of(engine, old)
    rotated = await rotate_ok(http, old)
    current = rotated["refresh_token"]

    await revoke(http, {"old": old, "current": current, "access": rotated["access_token"]})

    family = await family_row(engine, family_id)
    assert family.revoked_at is not None
    assert family.revoked_reason == reason
    clock.advance(1)
    # Not the current token, and not an in-window replay of the old one (whose successor is unused).
    assert_error(await refresh_body(http, current), 401, "invalid_grant")
    assert_error(await refresh_body(http, old), 401, "invalid_grant")
    with pytest.raises(InvalidGrant):
        await app.services.families.rotate(current, now=clock())
    # Nothing was consumed or minted after the revocation, and the reason was not overwritten.
    assert (await token_row(engine, current)).consumed_at is None  # type: ignore[union-attr]
    assert await token_count(engine, family_id) == 2
    assert (await family_row(engine, family_id)).revoked_reason == reason
    await assert_single_chain(engine, clock())


async def test_deleted_family_never_yields_a_token(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine = engine_of(app)
    tokens = await start(http)
    old = tokens["refresh_token"]
    rotated = await rotate_ok(http, old)
    family_id = await family_of(engine, old)
    response = await http.request(
        "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(rotated["access_token"])
    )
    assert response.status_code == 204, response.text
    assert await token_count(engine, family_id) == 0
    assert_error(await refresh_body(http, rotated["refresh_token"]), 401, "invalid_grant")
    assert_error(await refresh_body(http, old), 401, "invalid_grant")


async def test_logout_revokes_only_that_family(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine = engine_of(app)
    mine = (await start(http))["refresh_token"]
    other = (await login(http))["refresh_token"]
    response = await http.post("/auth/logout", json={"refresh_token": mine})
    assert response.status_code == 204
    assert set_cookie_attributes(response)["max-age"] == "0"
    family = await family_row(engine, await family_of(engine, mine))
    assert family.revoked_reason == "logout"
    assert_error(await refresh_body(http, mine), 401, "invalid_grant")
    # Idempotent, and not a theft signal.
    assert (await http.post("/auth/logout", json={"refresh_token": mine})).status_code == 204
    assert reuse_count(app) == 0
    assert (await family_row(engine, await family_of(engine, other))).revoked_at is None
    await rotate_ok(http, other)


async def test_logout_with_cookie_revokes_family(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine = engine_of(app)
    token = (await start(http))["refresh_token"]
    response = await http.post("/auth/logout", headers=refresh_cookie_request(http, token))
    assert response.status_code == 204
    assert (await family_row(engine, await family_of(engine, token))).revoked_reason == "logout"
    refused = await http.post("/auth/refresh", headers=refresh_cookie_request(http, token))
    assert_error(refused, 401, "invalid_grant")


async def test_logout_all_revokes_every_family_and_bumps_token_version(
    app: IssuerHarness, http: httpx.AsyncClient
) -> None:
    engine, clock = engine_of(app), app.clock
    sessions = [await start(http) for _ in range(3)]
    bystander = (await start(http, "bob@example.com"))["refresh_token"]
    rotated = await rotate_ok(http, sessions[0]["refresh_token"])
    old_access = rotated["access_token"]
    assert jwt_claims(old_access)["tokenVersion"] == 0

    response = await http.post("/auth/logout-all", headers=bearer(old_access))
    assert response.status_code == 204, response.text

    user_id = jwt_claims(old_access)["sub"]
    async with engine.connect() as conn:
        assert await store.active_families(conn, user_id, clock()) == []
        user = await store.user_by_id(conn, user_id)
    assert user is not None
    assert user.token_version == 1
    for token in [rotated["refresh_token"], *(s["refresh_token"] for s in sessions[1:])]:
        family = await family_row(engine, await family_of(engine, token))
        assert family.revoked_reason == "logout_all"
        assert_error(await refresh_body(http, token), 401, "invalid_grant")
    # Access tokens issued before are refused at the issuer at once.
    me = await http.get("/auth/me", headers=bearer(old_access))
    assert_error(me, 401, "invalid_token")
    # A fresh login works and carries the new version.
    fresh = await login(http)
    assert jwt_claims(fresh["access_token"])["tokenVersion"] == 1
    me = await http.get("/auth/me", headers=bearer(fresh["access_token"]))
    assert me.status_code == 200
    assert me.json()["tokenVersion"] == 1
    # Another user is untouched.
    assert (await family_row(engine, await family_of(engine, bystander))).revoked_at is None
    await rotate_ok(http, bystander)


# ---------------------------------------------------------------- expiry


async def test_expired_token_is_refused_without_revoking_the_family(make_issuer: MakeIssuer) -> None:
    async with make_issuer(access_token_ttl=60, refresh_token_ttl=120) as harness, harness.client() as client:
        engine, clock = engine_of(harness), harness.clock
        token = (await start(client))["refresh_token"]
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
        async with engine.connect() as conn:
            assert await store.active_families(conn, family.user_id, clock()) == []
        await assert_single_chain(engine, clock())


async def test_token_one_second_before_expiry_still_rotates(make_issuer: MakeIssuer) -> None:
    async with make_issuer(access_token_ttl=60, refresh_token_ttl=120) as harness, harness.client() as client:
        token = (await start(client))["refresh_token"]
        harness.clock.advance(119)
        await rotate_ok(client, token)


async def test_sliding_expiry_is_capped_by_the_session_max_age(make_issuer: MakeIssuer) -> None:
    """Each rotation's token lives min(now + REFRESH_TOKEN_TTL, family expiry); past SESSION_MAX_AGE: refused."""
    changes = {"access_token_ttl": 60, "refresh_token_ttl": 100, "session_max_age": 250}
    async with make_issuer(**changes) as harness, harness.client() as client:
        engine, clock = engine_of(harness), harness.clock
        t0 = clock()
        await register(client)
        client.cookies.clear()
        response = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
        assert response.status_code == 200, response.text
        cookie = set_cookie_attributes(response)
        token = cookie["refresh_token"]
        assert cookie["max-age"] == "100"
        assert {"httponly", "secure"} <= cookie.keys()
        assert cookie["samesite"].lower() == "strict"
        assert cookie["path"] == "/auth"
        family_id = await family_of(engine, token)
        family = await family_row(engine, family_id)
        assert family.expires_at == t0 + timedelta(seconds=250)
        assert family.idle_expires_at == t0 + timedelta(seconds=100)

        # (seconds since login, expected token lifetime left in the cookie, expected absolute expiry)
        steps = [(90, 100, 190), (180, 70, 250), (240, 10, 250), (249, 1, 250)]
        for at, max_age, expires in steps:
            clock.advance(at - int((clock() - t0).total_seconds()))
            response = await client.post("/auth/refresh", headers=refresh_cookie_request(client, token))
            assert response.status_code == 200, (at, response.text)
            assert "refresh_token" not in response.json()
            cookie = set_cookie_attributes(response)
            previous, token = token, cookie["refresh_token"]
            assert cookie["max-age"] == str(max_age), at
            row = await token_row(engine, token)
            assert row is not None
            assert row.expires_at == t0 + timedelta(seconds=expires), at
            assert row.issued_at == clock()
            family = await family_row(engine, family_id)
            assert family.last_used_at == clock()
            assert family.idle_expires_at == row.expires_at
            assert family.expires_at == t0 + timedelta(seconds=250)  # never extended

        # A grace replay answers with the successor's own remaining lifetime.
        response = await client.post("/auth/refresh", headers=refresh_cookie_request(client, previous))
        assert response.status_code == 200, response.text
        assert set_cookie_attributes(response) == {**cookie}
        assert set_cookie_attributes(response)["refresh_token"] == token

        clock.advance(1)  # t0 + 250: the session is over
        refused = await client.post("/auth/refresh", headers=refresh_cookie_request(client, token))
        assert_error(refused, 401, "invalid_grant")
        # Even a replay inside the grace window is refused once the family has expired.
        assert_error(await refresh_body(client, previous), 401, "invalid_grant")
        with pytest.raises(InvalidGrant):
            await harness.services.families.rotate(token, now=clock())
        clock.advance(86400)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await token_row(engine, token)).consumed_at is None  # type: ignore[union-attr]
        await assert_single_chain(engine, clock())


async def test_family_past_session_max_age_is_refused_even_with_a_fresh_token(make_issuer: MakeIssuer) -> None:
    """Forge the worst case in the database: a token whose own expiry outlives its family."""
    async with make_issuer() as harness, harness.client() as client:
        engine, clock = engine_of(harness), harness.clock
        token = (await start(client))["refresh_token"]
        family_id = await family_of(engine, token)
        async with engine.begin() as conn:
            await conn.execute(
                families.update().where(families.c.id == family_id).values(expires_at=clock() + timedelta(seconds=5))
            )
        clock.advance(5)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await token_row(engine, token)).consumed_at is None  # type: ignore[union-attr]


# ---------------------------------------------------------------- storage and shape


async def all_rows(engine: AsyncEngine) -> list[tuple[str, str, object]]:
    cells: list[tuple[str, str, object]] = []
    async with engine.connect() as conn:
        for table in (refresh_tokens, families, users, signing_keys):
            for row in (await conn.execute(select(table))).mappings():
                cells.extend((table.name, column, value) for column, value in row.items())
    return cells


def _forms(token: str) -> tuple[list[str], list[bytes]]:
    raw = base64.urlsafe_b64decode(token + "=")
    texts = [token, raw.hex(), base64.b64encode(raw).decode().rstrip("=")]
    return texts, [token.encode(), raw, raw.hex().encode()]


async def test_tokens_are_stored_only_as_sha256(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine, clock = engine_of(app), app.clock
    issued = [(await start(http))["refresh_token"], (await login(http))["refresh_token"]]
    current = issued[0]
    for _ in range(3):
        current = (await rotate_ok(http, current))["refresh_token"]
        issued.append(current)
    clock.advance(1)
    assert (await rotate_ok(http, issued[-2]))["refresh_token"] == current  # a replay stores nothing new
    upcoming = app.services.families.successor_of(current)  # derivable, so must not be stored either

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


async def test_refresh_tokens_are_256_bit_base64url_and_not_jwts(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    tokens = [(await start(http))["refresh_token"]]
    tokens += [(await login(http))["refresh_token"] for _ in range(20)]
    tokens.append((await rotate_ok(http, tokens[-1]))["refresh_token"])  # a successor has the same shape
    for token in tokens:
        assert BASE64URL_256.fullmatch(token), token
        assert "." not in token
        assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert len(set(tokens)) == len(tokens)
    # 21 logins' worth of random bits: no byte position is constant (a weak or counter-based generator).
    raws = [base64.urlsafe_b64decode(t + "=") for t in tokens[:-1]]
    assert all(len({raw[i] for raw in raws}) > 1 for i in range(32))


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
    app: IssuerHarness, http: httpx.AsyncClient
) -> None:
    engine, clock = engine_of(app), app.clock
    first = await start(http)
    valid = first["refresh_token"]
    family_id = await family_of(engine, valid)
    for bad in _malformed(valid, first["access_token"]):
        # ASCII-escaped JSON, so that a lone surrogate can be sent at all.
        body = json.dumps({"refresh_token": bad}).encode()
        headers = {"Content-Type": "application/json"}
        assert_error(await http.post("/auth/refresh", content=body, headers=headers), 401, "invalid_grant")
        with pytest.raises(InvalidGrant):
            await app.services.families.rotate(bad, now=clock())
        assert (await http.post("/auth/logout", content=body, headers=headers)).status_code == 204
    for bad in [valid[:-1], valid + "A", first["access_token"]]:
        refused = await http.post("/auth/refresh", headers=refresh_cookie_request(http, bad))
        assert_error(refused, 401, "invalid_grant")
    assert_error(await refresh_body(http, ""), 401, "invalid_grant")
    assert db_error_count(app) == 0
    assert reuse_count(app) == 0
    # None of it touched the real session.
    assert (await family_row(engine, family_id)).revoked_at is None
    assert await token_count(engine, family_id) == 1
    await rotate_ok(http, valid)


async def test_unknown_well_formed_token_is_invalid_grant(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine = engine_of(app)
    valid = (await start(http))["refresh_token"]
    forged = ("A" if valid[0] != "A" else "B") + valid[1:]
    assert_error(await refresh_body(http, forged), 401, "invalid_grant")
    # Guessing the successor without the server secret is just an unknown token.
    assert_error(await refresh_body(http, valid[::-1]), 401, "invalid_grant")
    assert (await family_row(engine, await family_of(engine, valid))).revoked_at is None
    await rotate_ok(http, valid)


@pytest.mark.parametrize("session_id", ["%00", "abc%00def", "x" * 300, "%C3%A9", "not-a-uuid"])
async def test_revoking_a_malformed_session_id_is_not_found(
    app: IssuerHarness, http: httpx.AsyncClient, session_id: str
) -> None:
    """A bad id in DELETE /auth/sessions/{id} is a client error (404), never a database error (503)."""
    tokens = await start(http)
    response = await http.delete(f"/auth/sessions/{session_id}", headers=bearer(tokens["access_token"]))
    assert_error(response, 404, "not_found")
    assert db_error_count(app) == 0
    assert (
        await family_row(engine_of(app), await family_of(engine_of(app), tokens["refresh_token"]))
    ).revoked_at is None


async def test_revoking_someone_elses_session_is_not_found(app: IssuerHarness, http: httpx.AsyncClient) -> None:
    engine = engine_of(app)
    mine = await start(http)
    theirs = await start(http, "bob@example.com")
    their_family = await family_of(engine, theirs["refresh_token"])
    response = await http.delete(f"/auth/sessions/{their_family}", headers=bearer(mine["access_token"]))
    assert_error(response, 404, "not_found")
    assert (await family_row(engine, their_family)).revoked_at is None
    await rotate_ok(http, theirs["refresh_token"])
