"""Every revocation writes its event in its own transaction: one event per revocation that commits, none for
one that rolls back or changes nothing, none for a session that merely expires."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.families import family_row
from tests.support.http import PASSWORD, bearer, delete_account, login, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import jwt_claims
from tests.support.oauth import new_client, revoke


async def recorded(issuer: IssuerHarness) -> list[dict[str, Any]]:
    async with issuer.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT seq, kind, user_id, session_id, token_version, reason FROM security_events ORDER BY seq")
        )
        return [dict(row) for row in rows.mappings()]


def event(
    kind: str, user_id: str, reason: str, session_id: str | None = None, version: int | None = None
) -> dict[str, Any]:
    return {"kind": kind, "user_id": user_id, "session_id": session_id, "token_version": version, "reason": reason}


def without_seq(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seq"} for row in rows]


async def signed_in(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    user = await register(client)
    tokens = await login(client)
    return user["id"], tokens


async def test_logout_records_one_session_revoked_event_and_a_repeat_records_none(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    user_id, tokens = await signed_in(client)
    sid = jwt_claims(tokens["access_token"])["sid"]
    for _ in range(2):
        assert (await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})).status_code == 204
    assert without_seq(await recorded(issuer)) == [event("session_revoked", user_id, "logout", sid)]


async def test_deleting_a_session_records_its_event(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user_id, first = await signed_in(client)
    second = await login(client)
    sid = jwt_claims(second["access_token"])["sid"]
    for _ in range(2):  # the second time it is already revoked: 204, and no second event
        response = await client.delete(f"/auth/sessions/{sid}", headers=bearer(first["access_token"]))
        assert response.status_code == 204
    assert without_seq(await recorded(issuer)) == [event("session_revoked", user_id, "session_revoked", sid)]


async def test_logout_all_records_the_new_token_version(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user_id, tokens = await signed_in(client)
    await login(client)
    assert (await client.post("/auth/logout-all", headers=bearer(tokens["access_token"]))).status_code == 204
    fresh = await login(client)
    assert (await client.post("/auth/logout-all", headers=bearer(fresh["access_token"]))).status_code == 204
    assert without_seq(await recorded(issuer)) == [
        event("user_revoked", user_id, "logout_all", version=1),
        event("user_revoked", user_id, "logout_all", version=2),
    ]


async def test_account_deletion_records_account_purged(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user_id, tokens = await signed_in(client)
    assert (await delete_account(client, tokens["access_token"], PASSWORD)).status_code == 204
    # The event outlives its user: verifiers must still learn of it.
    assert without_seq(await recorded(issuer)) == [event("account_purged", user_id, "account_deleted")]


async def test_reuse_detection_records_one_event_however_many_thieves(settings: Settings, clock: FakeClock) -> None:
    async with (
        running_issuer(with_settings(settings, refresh_reuse_grace=0), clock) as issuer,
        issuer.client() as client,
    ):
        user_id, tokens = await signed_in(client)
        sid = jwt_claims(tokens["access_token"])["sid"]
        assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200
        replays = await asyncio.gather(*(refresh_body(client, tokens["refresh_token"]) for _ in range(10)))
        assert {r.status_code for r in replays} == {401}
        assert without_seq(await recorded(issuer)) == [event("session_revoked", user_id, "reuse", sid)]


async def test_reuse_revokes_every_session_and_the_version_with_reuse_revokes_user(
    settings: Settings, clock: FakeClock
) -> None:
    changed = with_settings(settings, refresh_reuse_grace=0, reuse_revokes="user")
    async with running_issuer(changed, clock) as issuer, issuer.client() as client:
        user_id, stolen = await signed_in(client)
        other = await login(client)  # another device of the same user
        assert (await refresh_body(client, stolen["refresh_token"])).status_code == 200
        assert (await refresh_body(client, stolen["refresh_token"])).status_code == 401
        assert without_seq(await recorded(issuer)) == [event("user_revoked", user_id, "reuse", version=1)]
        # Every session of the user is gone, and their tokens' version is below the user's.
        assert (await refresh_body(client, other["refresh_token"])).status_code == 401
        assert (await client.get("/auth/me", headers=bearer(other["access_token"]))).status_code == 401


async def test_rfc7009_revocation_records_its_event(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user_id, tokens = await signed_in(client)
    second = await login(client)
    gateway = await new_client(issuer, "revoke")
    assert (await revoke(client, gateway, tokens["refresh_token"])).status_code == 200
    assert (await revoke(client, gateway, second["access_token"])).status_code == 200
    first_sid, second_sid = (jwt_claims(t["access_token"])["sid"] for t in (tokens, second))
    assert without_seq(await recorded(issuer)) == [
        event("session_revoked", user_id, "revocation", first_sid),
        event("session_revoked", user_id, "revocation", second_sid),
    ]


async def test_sequence_numbers_have_no_gaps(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await signed_in(client)
    sessions = [await login(client) for _ in range(5)]
    await asyncio.gather(*(client.post("/auth/logout", json={"refresh_token": s["refresh_token"]}) for s in sessions))
    assert [row["seq"] for row in await recorded(issuer)] == [1, 2, 3, 4, 5]


async def test_session_expiry_is_not_an_event(
    issuer: IssuerHarness, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await signed_in(client)
    clock.advance(issuer.services.settings.session_max_age + 1)
    await issuer.services.families.active_sessions("nobody", now=clock())
    assert await recorded(issuer) == []


@pytest.fixture
async def events_refused(issuer: IssuerHarness) -> AsyncIterator[None]:
    """Every attempt to append an event fails in the database (as a full disk or a bug would)."""
    async with issuer.engine.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'events refused by the test'; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER refuse_event BEFORE INSERT ON security_events "
                "FOR EACH ROW EXECUTE FUNCTION refuse_event()"
            )
        )
    yield
    async with issuer.engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER refuse_event ON security_events"))
        await conn.execute(text("DROP FUNCTION refuse_event()"))


async def test_a_revocation_whose_event_fails_is_rolled_back_whole(
    issuer: IssuerHarness, client: httpx.AsyncClient, events_refused: None
) -> None:
    """No revocation without its event: the client gets a retryable 503 and nothing was revoked, so a
    verifier following the feed is never told less than the issuer enforces."""
    user_id, tokens = await signed_in(client)
    sid = jwt_claims(tokens["access_token"])["sid"]
    attempts = [
        await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]}),
        await client.delete(f"/auth/sessions/{sid}", headers=bearer(tokens["access_token"])),
        await client.post("/auth/logout-all", headers=bearer(tokens["access_token"])),
        await delete_account(client, tokens["access_token"], PASSWORD),
    ]
    assert [r.status_code for r in attempts] == [503, 503, 503, 503]
    assert (await family_row(issuer.engine, sid)).revoked_at is None
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200
    assert await recorded(issuer) == []
    assert user_id
