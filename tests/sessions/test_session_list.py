"""The user's sessions: ``GET /auth/sessions`` (active families only, the caller's marked current) and
``DELETE /auth/sessions/{id}`` (only the caller's own; anyone else's id is 404 like a missing one)."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest
from sqlalchemy import select

from issuer.storage.schema import families
from tests.sessions.conftest import db_error_count
from tests.support.families import family_of, family_row, login_response, rotate_ok, start_session
from tests.support.http import assert_error, bearer, login, refresh_body, register
from tests.support.issuer import CLIENT_IP, IssuerHarness
from tests.support.jwt import jwt_claims

BOB = "bob@example.com"


def iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_sessions_list_only_active_families_and_marks_current(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    await register(client, BOB)
    a = (await login_response(client, headers={"User-Agent": "agent-a"})).json()
    issuer.clock.advance(10)
    b = (await login_response(client, headers={"User-Agent": "agent-b"})).json()
    c = (await login_response(client, headers={"User-Agent": "agent-c"})).json()
    bob = await login(client, BOB)
    sid_a, sid_b, sid_c = (jwt_claims(t["access_token"])["sid"] for t in (a, b, c))
    assert len({sid_a, sid_b, sid_c}) == 3

    assert (await client.post("/auth/logout", json={"refresh_token": c["refresh_token"]})).status_code == 204
    issuer.clock.advance(20)
    refreshed_b = await refresh_body(client, b["refresh_token"])
    assert refreshed_b.status_code == 200

    response = await client.get("/auth/sessions", headers=bearer(a["access_token"]))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    listed = response.json()["sessions"]
    by_id = {s["id"]: s for s in listed}
    assert set(by_id) == {sid_a, sid_b}
    for session in listed:
        assert set(session) == {
            "id",
            "created_at",
            "last_used_at",
            "user_agent",
            "ip",
            "last_user_agent",
            "last_ip",
            "current",
        }
        assert session["ip"] == CLIENT_IP
    assert by_id[sid_a]["current"] is True
    assert by_id[sid_b]["current"] is False
    assert by_id[sid_a]["user_agent"] == "agent-a"
    assert by_id[sid_b]["user_agent"] == "agent-b"
    assert iso(by_id[sid_b]["last_used_at"]) == issuer.clock.now
    assert (iso(by_id[sid_b]["created_at"]) - iso(by_id[sid_a]["created_at"])).total_seconds() == 10
    assert iso(by_id[sid_a]["last_used_at"]) == iso(by_id[sid_a]["created_at"])

    # Same list seen from B: now B is current. The refreshed access token carries the same sid.
    from_b = await client.get("/auth/sessions", headers=bearer(refreshed_b.json()["access_token"]))
    assert {s["id"]: s["current"] for s in from_b.json()["sessions"]} == {sid_a: False, sid_b: True}

    # Bob sees only his own.
    bob_view = (await client.get("/auth/sessions", headers=bearer(bob["access_token"]))).json()["sessions"]
    assert [s["id"] for s in bob_view] == [jwt_claims(bob["access_token"])["sid"]]
    assert bob_view[0]["current"] is True

    no_auth = await client.get("/auth/sessions")
    assert no_auth.status_code == 401
    assert no_auth.headers["www-authenticate"] == "Bearer"


async def test_delete_own_session(client: httpx.AsyncClient) -> None:
    await register(client)
    a = await login(client)
    b = await login(client)
    sid_b = jwt_claims(b["access_token"])["sid"]

    b_rotated = await rotate_ok(client, b["refresh_token"])
    response = await client.delete(f"/auth/sessions/{sid_b}", headers=bearer(a["access_token"]))
    assert response.status_code == 204
    assert response.content == b""
    assert_error(await refresh_body(client, b_rotated["refresh_token"]), 401, "invalid_grant")
    # Inside the reuse grace, the pre-rotation token must not resurrect the session either.
    assert_error(await refresh_body(client, b["refresh_token"]), 401, "invalid_grant")
    listed = (await client.get("/auth/sessions", headers=bearer(a["access_token"]))).json()["sessions"]
    assert [s["id"] for s in listed] == [jwt_claims(a["access_token"])["sid"]]
    assert (await refresh_body(client, a["refresh_token"])).status_code == 200


async def test_delete_someone_elses_or_unknown_session_is_404(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    await register(client, BOB)
    alice = await login(client)
    bob = await login(client, BOB)
    alice_sid = jwt_claims(alice["access_token"])["sid"]

    stolen = await client.delete(f"/auth/sessions/{alice_sid}", headers=bearer(bob["access_token"]))
    assert_error(stolen, 404, "not_found")
    unknown = await client.delete(
        "/auth/sessions/00000000-0000-4000-8000-000000000000", headers=bearer(bob["access_token"])
    )
    assert_error(unknown, 404, "not_found")
    # Someone else's id and an unknown id answer identically.
    assert stolen.content == unknown.content
    for odd in ("not-a-uuid", "x" * 300, "%27%20OR%201%3D1%20--", "%C3%BC"):
        assert_error(
            await client.delete(f"/auth/sessions/{odd}", headers=bearer(bob["access_token"])), 404, "not_found"
        )

    # Alice's session survived Bob's attempt.
    assert (await refresh_body(client, alice["refresh_token"])).status_code == 200
    async with issuer.engine.connect() as conn:
        revoked = (await conn.execute(select(families.c.revoked_at).where(families.c.id == alice_sid))).scalar_one()
    assert revoked is None

    no_auth = await client.delete(f"/auth/sessions/{alice_sid}")
    assert no_auth.status_code == 401
    assert (await refresh_body(client, (await login(client))["refresh_token"])).status_code == 200


async def test_revoking_someone_elses_session_leaves_it_alive(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    engine = issuer.engine
    mine = await start_session(client)
    theirs = await start_session(client, BOB)
    their_family = await family_of(engine, theirs["refresh_token"])
    response = await client.delete(f"/auth/sessions/{their_family}", headers=bearer(mine["access_token"]))
    assert_error(response, 404, "not_found")
    assert (await family_row(engine, their_family)).revoked_at is None
    await rotate_ok(client, theirs["refresh_token"])


@pytest.mark.parametrize("session_id", ["%00", "abc%00def", "x" * 300, "%C3%A9", "not-a-uuid"])
async def test_revoking_a_malformed_session_id_is_not_found(
    issuer: IssuerHarness, client: httpx.AsyncClient, session_id: str
) -> None:
    """A bad id in DELETE /auth/sessions/{id} is a client error (404), never a database error (503)."""
    tokens = await start_session(client)
    response = await client.delete(f"/auth/sessions/{session_id}", headers=bearer(tokens["access_token"]))
    assert_error(response, 404, "not_found")
    assert db_error_count(issuer) == 0
    assert (await family_row(issuer.engine, await family_of(issuer.engine, tokens["refresh_token"]))).revoked_at is None
