"""End-to-end flows over HTTP, each step checked against the contract (sections 2-4)."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from issuer.settings import Argon2Params, Settings
from issuer.storage import store
from issuer.storage.schema import families, refresh_tokens, users
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import CLIENT_IP, ISSUER_URL, IssuerHarness, running_issuer, with_settings

ALICE = "alice@example.com"
BOB = "bob@example.com"
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43,}")


# ---------------------------------------------------------------- helpers


def parse_set_cookies(response: httpx.Response) -> dict[str, tuple[str, dict[str, str | None]]]:
    """Set-Cookie headers by cookie name: (value, attributes with lower-cased names)."""
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


def assert_refresh_cookie(response: httpx.Response, max_age: int) -> str:
    """The response sets exactly the contract's refresh cookie; returns its value."""
    cookies = parse_set_cookies(response)
    assert set(cookies) == {"refresh_token"}, response.headers.get_list("set-cookie")
    value, attributes = cookies["refresh_token"]
    assert set(attributes) == {"httponly", "secure", "samesite", "path", "max-age"}, attributes
    assert attributes["httponly"] is None
    assert attributes["secure"] is None
    assert (attributes["samesite"] or "").lower() == "strict"
    assert attributes["path"] == "/auth"
    assert attributes["max-age"] == str(max_age)
    assert TOKEN_SHAPE.fullmatch(value), value
    return value


def assert_cookie_cleared(response: httpx.Response) -> None:
    cookies = parse_set_cookies(response)
    assert set(cookies) == {"refresh_token"}
    value, attributes = cookies["refresh_token"]
    assert value in {"", '""'}
    assert attributes["max-age"] == "0"
    # The clearing cookie must match the original's path, or the browser keeps the original.
    assert attributes["path"] == "/auth"
    assert attributes["httponly"] is None
    assert attributes["secure"] is None


def assert_token_response(
    response: httpx.Response, user: dict[str, Any], *, transport: str, access_ttl: int = 900, max_age: int = 604800
) -> tuple[str, str]:
    """Checks a login/refresh answer; returns (access token, refresh token)."""
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
        assert TOKEN_SHAPE.fullmatch(body["refresh_token"])
        return body["access_token"], body["refresh_token"]
    token = assert_refresh_cookie(response, max_age)
    assert token not in response.text
    return body["access_token"], token


def claims(access_token: str) -> dict[str, Any]:
    payload = access_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def cookie_header(token: str) -> dict[str, str]:
    return {"Cookie": f"refresh_token={token}"}


async def login_raw(
    client: httpx.AsyncClient,
    email: str = ALICE,
    password: str = PASSWORD,
    transport: str | None = "body",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"email": email, "password": password}
    if transport is not None:
        body["token_transport"] = transport
    return await client.post("/auth/login", json=body, headers=headers)


async def refresh_cookie(
    client: httpx.AsyncClient, token: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    client.cookies.clear()
    return await client.post("/auth/refresh", headers={**cookie_header(token), **(headers or {})})


async def me(client: httpx.AsyncClient, access: str) -> httpx.Response:
    return await client.get("/auth/me", headers=bearer(access))


def assert_invalid_token(response: httpx.Response) -> None:
    assert_error(response, 401, "invalid_token")
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="invalid_token"'), challenge
    assert 'error_description="' in challenge


async def count_rows(issuer: IssuerHarness, table: Any, *where: Any) -> int:
    async with issuer.engine.connect() as conn:
        query = select(func.count()).select_from(table)
        if where:
            query = query.where(*where)
        return (await conn.execute(query)).scalar_one()


def iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------- register, login, me


async def test_register_returns_201_and_user(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/register", json={"email": "  Alice@Example.COM ", "password": PASSWORD})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"user"}
    user = body["user"]
    assert set(user) == {"id", "email", "role"}
    assert user["email"] == ALICE
    assert user["role"] == "user"
    assert isinstance(user["id"], str)
    assert user["id"]
    assert PASSWORD not in response.text


async def test_cookie_flow_like_a_browser(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """The client's cookie jar plays the browser: the cookie's Path/Secure must make it come back."""
    user = await register(client)
    response = await login_raw(client, transport=None)
    access, first = assert_token_response(response, user, transport="cookie")
    assert "refresh_token" not in response.json()

    who = await me(client, access)
    assert who.status_code == 200
    assert who.headers["cache-control"] == "no-store"
    assert who.json() == {**user, "tokenVersion": 0}

    issuer.clock.advance(120)
    # No body at all: the jar sends the cookie because Path=/auth covers /auth/refresh.
    rotated = await client.post("/auth/refresh")
    access2, second = assert_token_response(rotated, user, transport="cookie")
    assert second != first
    assert access2 != access
    assert (await me(client, access2)).status_code == 200

    issuer.clock.advance(60)
    out = await client.post("/auth/logout")
    assert out.status_code == 204
    assert out.content == b""
    assert_cookie_cleared(out)
    assert "refresh_token" not in client.cookies
    assert_error(await refresh_cookie(client, second), 401, "invalid_grant")


async def test_login_with_explicit_cookie_transport(client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login_raw(client, transport="cookie")
    assert_token_response(response, user, transport="cookie")


async def test_body_flow_sets_no_cookie(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login_raw(client, transport="body")
    access, first = assert_token_response(response, user, transport="body")
    assert (await me(client, access)).json() == {**user, "tokenVersion": 0}

    issuer.clock.advance(30)
    rotated = await refresh_body(client, first)
    access2, second = assert_token_response(rotated, user, transport="body")
    assert second != first
    assert claims(access2)["sid"] == claims(access)["sid"]
    assert (await me(client, access2)).status_code == 200


async def test_refresh_answers_in_the_transport_the_token_came_in(client: httpx.AsyncClient) -> None:
    user = await register(client)
    # A cookie-issued token presented in the body is answered in the body.
    _, from_cookie = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
    client.cookies.clear()
    answered = await refresh_body(client, from_cookie)
    assert_token_response(answered, user, transport="body")

    # A body-issued token presented as a cookie is answered with a cookie.
    _, from_body = assert_token_response(await login_raw(client, transport="body"), user, transport="body")
    answered = await refresh_cookie(client, from_body)
    _, next_token = assert_token_response(answered, user, transport="cookie")
    assert next_token not in answered.text

    # The body wins when both are present; the cookie's token is left untouched.
    _, other = assert_token_response(await login_raw(client, transport="body"), user, transport="body")
    both = await client.post("/auth/refresh", json={"refresh_token": other}, headers=cookie_header(next_token))
    assert_token_response(both, user, transport="body")
    assert_token_response(await refresh_cookie(client, next_token), user, transport="cookie")


async def test_login_wrong_password_and_unknown_email_are_indistinguishable(client: httpx.AsyncClient) -> None:
    await register(client)
    wrong = await login_raw(client, password="not the password")
    unknown = await login_raw(client, email="nobody@example.com")
    assert_error(wrong, 401, "invalid_credentials")
    assert wrong.status_code == unknown.status_code
    assert wrong.content == unknown.content
    assert dict(wrong.headers) == dict(unknown.headers)
    assert "set-cookie" not in wrong.headers


@pytest.mark.parametrize("lockout", [0, 5])
async def test_account_deleted_during_the_password_check_is_401_not_503(
    settings: Settings, clock: FakeClock, pg_url: str, monkeypatch: pytest.MonkeyPatch, lockout: int
) -> None:
    """The account is read before the hash and the session written after it; a deletion in between is the
    client's race, not a fault: the login answers like an unknown email and writes nothing."""
    configured = with_settings(settings, database_url=pg_url, login_lockout_threshold=lockout)
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        user = await register(client)
        svc = harness.services
        check = svc.passwords.verify

        async def check_then_delete(stored_hash: str | None, password: str) -> bool:
            ok = await check(stored_hash, password)
            async with svc.engine.begin() as conn:
                await store.delete_user(conn, user["id"])
            return ok

        monkeypatch.setattr(svc.passwords, "verify", check_then_delete)
        assert_error(await login_raw(client), 401, "invalid_credentials")
        async with svc.engine.connect() as conn:
            assert (await conn.execute(select(func.count()).select_from(families))).scalar_one() == 0
        assert svc.metrics.db_errors._value.get() == 0


async def test_login_normalizes_the_email(client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login_raw(client, email="  ALICE@example.COM\t")
    assert_token_response(response, user, transport="body")


async def test_login_password_is_exact(client: httpx.AsyncClient) -> None:
    await register(client)
    for variant in (PASSWORD.upper(), PASSWORD + " ", " " + PASSWORD, PASSWORD[:-1]):
        assert_error(await login_raw(client, password=variant), 401, "invalid_credentials")


async def test_register_duplicate_email_case_insensitive_and_trimmed(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    for email in (ALICE, "ALICE@EXAMPLE.COM", "  Alice@Example.com  ", "alice@EXAMPLE.com\n"):
        response = await client.post("/auth/register", json={"email": email, "password": "another password"})
        assert_error(response, 409, "email_taken")
    assert await count_rows(issuer, users) == 1
    # The original password still works; the duplicate attempts changed nothing.
    await login(client)
    assert_error(await login_raw(client, password="another password"), 401, "invalid_credentials")


# ---------------------------------------------------------------- rotation, grace, reuse


async def test_rotated_token_is_rejected_after_grace_and_reuse_kills_newest(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    _, t0 = assert_token_response(await login_raw(client), user, transport="body")
    _, t1 = assert_token_response(await refresh_body(client, t0), user, transport="body")
    issuer.clock.advance(5)
    access2, t2 = assert_token_response(await refresh_body(client, t1), user, transport="body")
    sid = claims(access2)["sid"]

    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace + 1)
    # The thief replays an old token: refused, and the whole family dies with it.
    assert_error(await refresh_body(client, t1), 401, "invalid_grant")
    assert_error(await refresh_body(client, t2), 401, "invalid_grant")
    assert_error(await refresh_body(client, t0), 401, "invalid_grant")
    sessions = await client.get("/auth/sessions", headers=bearer(access2))
    assert sid not in {s["id"] for s in sessions.json()["sessions"]}
    async with issuer.engine.connect() as conn:
        reason = (await conn.execute(select(families.c.revoked_reason).where(families.c.id == sid))).scalar_one()
    assert reason is not None


async def test_reuse_of_a_cookie_token_kills_the_cookie_holder_too(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    user = await register(client)
    _, t0 = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
    _, t1 = assert_token_response(await refresh_cookie(client, t0), user, transport="cookie")
    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace + 1)
    assert_error(await refresh_cookie(client, t0), 401, "invalid_grant")
    assert_error(await refresh_cookie(client, t1), 401, "invalid_grant")


async def test_repeat_inside_grace_returns_the_same_successor(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, t0 = assert_token_response(await login_raw(client), user, transport="body")
    _, t1 = assert_token_response(await refresh_body(client, t0), user, transport="body")
    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace)
    _, again = assert_token_response(await refresh_body(client, t0), user, transport="body")
    assert again == t1
    # Still one chain: t1 works once, then t0 is outside its window and is theft.
    _, t2 = assert_token_response(await refresh_body(client, t1), user, transport="body")
    assert_error(await refresh_body(client, t0), 401, "invalid_grant")
    assert_error(await refresh_body(client, t2), 401, "invalid_grant")


async def test_no_grace_makes_every_repeat_theft(settings: Settings, clock: FakeClock) -> None:
    no_grace = with_settings(settings, refresh_reuse_grace=0)
    async with running_issuer(no_grace, clock) as harness, harness.client() as client:
        user = await register(client)
        _, t0 = assert_token_response(await login_raw(client), user, transport="body")
        _, t1 = assert_token_response(await refresh_body(client, t0), user, transport="body")
        assert_error(await refresh_body(client, t0), 401, "invalid_grant")
        assert_error(await refresh_body(client, t1), 401, "invalid_grant")


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


# ---------------------------------------------------------------- logout, logout-all


async def test_logout_revokes_only_that_family_and_is_idempotent(client: httpx.AsyncClient) -> None:
    await register(client)
    first = await login(client)
    second = await login(client)

    out = await client.post("/auth/logout", json={"refresh_token": first["refresh_token"]})
    assert out.status_code == 204
    assert out.content == b""
    assert_cookie_cleared(out)
    assert_error(await refresh_body(client, first["refresh_token"]), 401, "invalid_grant")
    assert (await refresh_body(client, second["refresh_token"])).status_code == 200

    # Idempotent: the same (now dead) token, no token at all, an unknown token, a cookie-less empty body.
    again = await client.post("/auth/logout", json={"refresh_token": first["refresh_token"]})
    assert again.status_code == 204
    assert_cookie_cleared(again)
    client.cookies.clear()
    assert (await client.post("/auth/logout")).status_code == 204
    assert (await client.post("/auth/logout", json={})).status_code == 204
    assert (await client.post("/auth/logout", json={"refresh_token": "B" * 43})).status_code == 204
    assert (await client.post("/auth/logout", json={"refresh_token": "junk"})).status_code == 204
    assert (await client.post("/auth/logout", headers=cookie_header("C" * 43))).status_code == 204


async def test_logout_with_an_old_rotated_token_ends_the_session(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    tokens = await login(client)
    rotated = (await refresh_body(client, tokens["refresh_token"])).json()
    assert (await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})).status_code == 204
    assert_error(await refresh_body(client, rotated["refresh_token"]), 401, "invalid_grant")


async def test_logout_is_not_undone_by_a_replay_inside_the_grace_window(client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    rotated = (await refresh_body(client, tokens["refresh_token"])).json()
    assert (await client.post("/auth/logout", json={"refresh_token": rotated["refresh_token"]})).status_code == 204
    assert_error(await refresh_body(client, tokens["refresh_token"]), 401, "invalid_grant")
    assert_error(await refresh_body(client, rotated["refresh_token"]), 401, "invalid_grant")


async def test_logout_by_cookie(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
    client.cookies.clear()
    out = await client.post("/auth/logout", headers=cookie_header(token))
    assert out.status_code == 204
    assert_cookie_cleared(out)
    assert_error(await refresh_cookie(client, token), 401, "invalid_grant")


async def test_logout_all_revokes_every_access_and_refresh_token(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    await register(client, BOB)
    a = await login(client)
    b = await login(client)
    b2 = (await refresh_body(client, b["refresh_token"])).json()
    bob = await login(client, BOB)

    response = await client.post("/auth/logout-all", headers=bearer(a["access_token"]))
    assert response.status_code == 204
    assert response.content == b""

    for access in (a["access_token"], b["access_token"], b2["access_token"]):
        assert_invalid_token(await me(client, access))
        assert_invalid_token(await client.get("/auth/sessions", headers=bearer(access)))
        assert_invalid_token(await client.post("/auth/logout-all", headers=bearer(access)))
    # b was rotated moments ago, inside the reuse grace: even the benign-replay path must see the revocation.
    for refresh in (a["refresh_token"], b2["refresh_token"], b["refresh_token"]):
        assert_error(await refresh_body(client, refresh), 401, "invalid_grant")

    # Bob is untouched; Alice can log in again, now at tokenVersion 1.
    assert (await me(client, bob["access_token"])).json()["tokenVersion"] == 0
    assert (await refresh_body(client, bob["refresh_token"])).status_code == 200
    fresh = await login(client)
    assert claims(fresh["access_token"])["tokenVersion"] == 1
    assert (await me(client, fresh["access_token"])).json()["tokenVersion"] == 1
    assert (await client.get("/auth/sessions", headers=bearer(fresh["access_token"]))).json()["sessions"][0][
        "id"
    ] == claims(fresh["access_token"])["sid"]


async def test_logout_all_needs_a_bearer(client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    response = await client.post("/auth/logout-all")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    # A refresh token is not an access token.
    assert_invalid_token(await client.post("/auth/logout-all", headers=bearer(tokens["refresh_token"])))
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200


async def test_bearer_challenges(client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    bare = await client.get("/auth/me")
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == "Bearer"
    body = bare.json()
    assert set(body) == {"error", "error_description"}
    assert "invalid_token" not in bare.headers["www-authenticate"]

    for header in ("Bearer", "Bearer ", "Bearer not.a.jwt", f"Bearer {tokens['access_token']}x"):
        assert_invalid_token(await client.get("/auth/me", headers={"Authorization": header}))
    # Another scheme is no Bearer credential at all (RFC 6750 section 3.1): the bare challenge, and no access.
    basic = await client.get("/auth/me", headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert basic.status_code == 401
    assert basic.headers["www-authenticate"] == "Bearer"
    # A tampered payload (role escalated) is refused.
    head, _payload, signature = tokens["access_token"].split(".")
    forged = claims(tokens["access_token"]) | {"role": "admin"}
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    assert_invalid_token(await me(client, f"{head}.{forged_payload}.{signature}"))


async def test_access_token_expires_at_the_issuer(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    tokens = await login(client)
    settings = issuer.services.settings
    issuer.clock.advance(settings.access_token_ttl + settings.clock_leeway + 1)
    assert_invalid_token(await me(client, tokens["access_token"]))


# ---------------------------------------------------------------- sessions


async def test_sessions_list_only_active_families_and_marks_current(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    await register(client, BOB)
    a = (await login_raw(client, headers={"User-Agent": "agent-a"})).json()
    issuer.clock.advance(10)
    b = (await login_raw(client, headers={"User-Agent": "agent-b"})).json()
    c = (await login_raw(client, headers={"User-Agent": "agent-c"})).json()
    bob = await login(client, BOB)
    sid_a, sid_b, sid_c = (claims(t["access_token"])["sid"] for t in (a, b, c))
    assert len({sid_a, sid_b, sid_c}) == 3

    assert (await client.post("/auth/logout", json={"refresh_token": c["refresh_token"]})).status_code == 204
    issuer.clock.advance(20)
    refreshed_b = await refresh_body(client, b["refresh_token"])
    assert refreshed_b.status_code == 200

    response = await client.get("/auth/sessions", headers=bearer(a["access_token"]))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    sessions = response.json()["sessions"]
    by_id = {s["id"]: s for s in sessions}
    assert set(by_id) == {sid_a, sid_b}
    for session in sessions:
        assert set(session) == {"id", "created_at", "last_used_at", "user_agent", "ip", "current"}
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
    assert [s["id"] for s in bob_view] == [claims(bob["access_token"])["sid"]]
    assert bob_view[0]["current"] is True

    no_auth = await client.get("/auth/sessions")
    assert no_auth.status_code == 401
    assert no_auth.headers["www-authenticate"] == "Bearer"


async def test_delete_own_session(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    a = await login(client)
    b = await login(client)
    sid_b = claims(b["access_token"])["sid"]

    b_rotated = (await refresh_body(client, b["refresh_token"])).json()
    response = await client.delete(f"/auth/sessions/{sid_b}", headers=bearer(a["access_token"]))
    assert response.status_code == 204
    assert response.content == b""
    assert_error(await refresh_body(client, b_rotated["refresh_token"]), 401, "invalid_grant")
    # Inside the reuse grace, the pre-rotation token must not resurrect the session either.
    assert_error(await refresh_body(client, b["refresh_token"]), 401, "invalid_grant")
    listed = (await client.get("/auth/sessions", headers=bearer(a["access_token"]))).json()["sessions"]
    assert [s["id"] for s in listed] == [claims(a["access_token"])["sid"]]
    assert (await refresh_body(client, a["refresh_token"])).status_code == 200


async def test_delete_someone_elses_or_unknown_session_is_404(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    await register(client, BOB)
    alice = await login(client)
    bob = await login(client, BOB)
    alice_sid = claims(alice["access_token"])["sid"]

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


# ---------------------------------------------------------------- account deletion


async def test_delete_account_with_wrong_password_deletes_nothing(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    tokens = await login(client)
    before = [await count_rows(issuer, table) for table in (users, families, refresh_tokens)]
    response = await client.request(
        "DELETE", "/auth/account", json={"password": "wrong password"}, headers=bearer(tokens["access_token"])
    )
    assert_error(response, 403, "invalid_credentials")
    assert [await count_rows(issuer, table) for table in (users, families, refresh_tokens)] == before
    assert (await me(client, tokens["access_token"])).status_code == 200
    assert (await refresh_body(client, tokens["refresh_token"])).status_code == 200


async def test_delete_account_removes_everything(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    await register(client, BOB)
    first = await login(client)
    second = await login(client)
    rotated = (await refresh_body(client, second["refresh_token"])).json()
    bob = await login(client, BOB)

    unauthenticated = await client.request("DELETE", "/auth/account", json={"password": PASSWORD})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["www-authenticate"] == "Bearer"

    response = await client.request(
        "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(first["access_token"])
    )
    assert response.status_code == 204
    assert response.content == b""

    for access in (first["access_token"], rotated["access_token"]):
        assert_invalid_token(await me(client, access))
    # second was rotated moments ago (inside the reuse grace); it must not come back either.
    for refresh in (first["refresh_token"], rotated["refresh_token"], second["refresh_token"]):
        assert_error(await refresh_body(client, refresh), 401, "invalid_grant")
    assert_error(await login_raw(client), 401, "invalid_credentials")
    assert await count_rows(issuer, users, users.c.id == user["id"]) == 0
    assert await count_rows(issuer, families, families.c.user_id == user["id"]) == 0
    assert await count_rows(issuer, users) == 1
    assert await count_rows(issuer, families) == 1
    assert await count_rows(issuer, refresh_tokens) == 1

    # Bob is untouched.
    assert (await me(client, bob["access_token"])).status_code == 200
    assert (await refresh_body(client, bob["refresh_token"])).status_code == 200

    # The email is free again, and the old token does not open the new account.
    again = await register(client)
    assert again["id"] != user["id"]
    assert again["email"] == ALICE
    assert_invalid_token(await me(client, first["access_token"]))
    assert_error(await refresh_body(client, rotated["refresh_token"]), 401, "invalid_grant")
    fresh = await login(client)
    assert (await me(client, fresh["access_token"])).json()["id"] == again["id"]


# ---------------------------------------------------------------- expiry with the fake clock


async def test_refresh_token_expires_after_its_ttl(settings: Settings, clock: FakeClock) -> None:
    short = with_settings(settings, access_token_ttl=60, refresh_token_ttl=600, session_max_age=1000)
    async with running_issuer(short, clock) as harness, harness.client() as client:
        user = await register(client)
        kept = assert_token_response(await login_raw(client), user, transport="body", access_ttl=60, max_age=600)
        _, idle = assert_token_response(
            await login_raw(client, transport=None), user, transport="cookie", access_ttl=60, max_age=600
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
        assert [s["id"] for s in listed] == [claims(access)["sid"]]
        assert (await refresh_body(client, refreshed)).status_code == 200


async def test_session_max_age_is_absolute(settings: Settings, clock: FakeClock) -> None:
    short = with_settings(settings, access_token_ttl=60, refresh_token_ttl=600, session_max_age=1000)
    async with running_issuer(short, clock) as harness, harness.client() as client:
        user = await register(client)
        _, token = assert_token_response(
            await login_raw(client, transport=None), user, transport="cookie", access_ttl=60, max_age=600
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
        assert (await client.get("/auth/sessions", headers=bearer(relogin["access_token"]))).json()["sessions"][0][
            "id"
        ] == claims(relogin["access_token"])["sid"]
        sessions = (await client.get("/auth/sessions", headers=bearer(relogin["access_token"]))).json()["sessions"]
        assert len(sessions) == 1


async def test_grace_replay_cannot_outlive_the_session(settings: Settings, clock: FakeClock) -> None:
    short = with_settings(settings, access_token_ttl=60, refresh_token_ttl=600, session_max_age=1000)
    async with running_issuer(short, clock) as harness, harness.client() as client:
        await register(client)
        tokens = await login(client)
        clock.advance(500)
        middle = (await refresh_body(client, tokens["refresh_token"])).json()["refresh_token"]
        clock.advance(495)
        assert (await refresh_body(client, middle)).status_code == 200
        clock.advance(4)
        assert (await refresh_body(client, middle)).status_code == 200
        clock.advance(1)
        # Inside the reuse grace, but the family is over.
        assert_error(await refresh_body(client, middle), 401, "invalid_grant")


# ---------------------------------------------------------------- origin check on cookie endpoints


async def test_cookie_refresh_from_a_foreign_origin_is_forbidden(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
    for origin in (
        "https://evil.example",
        "null",
        "http://issuer.test",
        "https://issuer.test.evil.example",
        "https://issuer.test:8443",
        "https://evil.example/https://issuer.test",
        "https://issuer",
        "https://issuer.tes",
        "HTTPS://EVIL.EXAMPLE",
    ):
        response = await refresh_cookie(client, token, headers={"Origin": origin})
        assert_error(response, 403, "forbidden")
        assert "set-cookie" not in response.headers
    # The refused requests did not consume the token.
    _, token = assert_token_response(
        await refresh_cookie(client, token, headers={"Origin": ISSUER_URL}), user, transport="cookie"
    )
    assert_token_response(await refresh_cookie(client, token), user, transport="cookie")


async def test_cookie_logout_from_a_foreign_origin_is_forbidden(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
    client.cookies.clear()
    response = await client.post("/auth/logout", headers={**cookie_header(token), "Origin": "https://evil.example"})
    assert_error(response, 403, "forbidden")
    assert_token_response(await refresh_cookie(client, token), user, transport="cookie")


async def test_allowed_origins_may_use_the_cookie(settings: Settings, clock: FakeClock) -> None:
    configured = with_settings(settings, allowed_origins=("https://app.example", "http://localhost:3000"))
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        user = await register(client)
        _, token = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
        for origin in ("https://app.example", "http://localhost:3000", ISSUER_URL):
            _, token = assert_token_response(
                await refresh_cookie(client, token, headers={"Origin": origin}), user, transport="cookie"
            )
        for origin in ("https://evil.example", "https://app.example.evil", "http://app.example", "null"):
            refused = await refresh_cookie(client, token, headers={"Origin": origin})
            assert_error(refused, 403, "forbidden")
            # Without a matching Allow-Origin the browser shows the page nothing (Allow-Credentials alone is inert).
            assert "access-control-allow-origin" not in refused.headers
        response = await refresh_cookie(client, token, headers={"Origin": "https://app.example"})
        _, token = assert_token_response(response, user, transport="cookie")
        # CORS with credentials, for exactly the configured origin (never a wildcard).
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert response.headers["access-control-allow-credentials"] == "true"
        preflight = await client.options(
            "/auth/refresh",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        evil_preflight = await client.options(
            "/auth/refresh",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert evil_preflight.headers.get("access-control-allow-origin") in (None, "")
        assert_token_response(await refresh_cookie(client, token), user, transport="cookie")


async def test_no_cors_headers_without_allowed_origins(client: httpx.AsyncClient) -> None:
    user = await register(client)
    _, token = assert_token_response(await login_raw(client, transport=None), user, transport="cookie")
    refused = await refresh_cookie(client, token, headers={"Origin": "https://evil.example"})
    assert_error(refused, 403, "forbidden")
    assert "access-control-allow-origin" not in refused.headers
    own = await refresh_cookie(client, token, headers={"Origin": ISSUER_URL})
    assert own.status_code == 200
    assert own.headers.get("access-control-allow-origin") in (None, ISSUER_URL)


# ---------------------------------------------------------------- well-known, health, routing


async def test_jwks(client: httpx.AsyncClient, settings: Settings) -> None:
    await register(client)
    tokens = await login(client)
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    etag = response.headers["etag"]
    assert re.fullmatch(r'(W/)?"[^"]+"', etag), etag
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert set(key) == {"kty", "kid", "use", "alg", "n", "e"}, key
        assert key["kty"] == "RSA"
        assert key["use"] == "sig"
        assert key["alg"] == "RS256"
    header = json.loads(base64.urlsafe_b64decode(tokens["access_token"].split(".")[0] + "=="))
    assert header["kid"] in {key["kid"] for key in keys}

    cached = await client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    assert cached.headers["etag"] == etag
    assert cached.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    listed = await client.get("/.well-known/jwks.json", headers={"If-None-Match": f'"other", {etag}'})
    assert listed.status_code == 304
    stale = await client.get("/.well-known/jwks.json", headers={"If-None-Match": '"not-the-etag"'})
    assert stale.status_code == 200
    assert stale.json() == response.json()


async def test_metadata_documents(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    route_paths = {getattr(route, "path", None) for route in issuer.app.routes}
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        document = response.json()
        assert document["issuer"] == ISSUER_URL
        assert document["jwks_uri"] == f"{ISSUER_URL}/.well-known/jwks.json"
        assert document["access_token_signing_alg_values_supported"] == ["RS256"]
        for name in ("login_endpoint", "refresh_endpoint", "logout_endpoint"):
            assert name in document
        for name, value in document.items():
            if name.endswith("_endpoint"):
                assert value.startswith(ISSUER_URL + "/"), (name, value)
                assert value.removeprefix(ISSUER_URL) in route_paths, (name, value)
    assert (await client.get(f"{ISSUER_URL}/.well-known/jwks.json")).status_code == 200


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200


async def test_unknown_route_and_wrong_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    missing = await client.get("/no/such/route")
    assert_error(missing, 404, "not_found")
    assert set(missing.json()) == {"error", "error_description"}
    assert missing.headers["content-type"].startswith("application/json")
    for method, path in (("GET", "/auth/login"), ("PUT", "/auth/refresh"), ("POST", "/auth/me")):
        wrong = await client.request(method, path)
        assert wrong.status_code == 405, (method, path, wrong.text)
        body = wrong.json()
        assert set(body) == {"error", "error_description"}
        assert isinstance(body["error"], str)
        assert body["error"]
        assert wrong.headers["content-type"].startswith("application/json")
        allowed = {m.strip() for m in wrong.headers["allow"].split(",")}
        assert method not in allowed
        assert allowed & {"GET", "POST"}


async def test_raised_argon2_parameters_rehash_at_the_next_login(settings: Settings, clock: FakeClock) -> None:
    """Operators who raise ARGON2_* get every account upgraded at its next successful login, not never."""
    async with running_issuer(settings, clock) as old, old.client() as client:
        await register(client, email="rehash@example.com")
    stronger = with_settings(settings, argon2=Argon2Params(memory_cost_kib=2048, time_cost=2, parallelism=1))
    async with running_issuer(stronger, clock) as new, new.client() as client:
        engine = new.engine
        async with engine.connect() as conn:
            before = (await conn.execute(select(users.c.password_hash))).scalar_one()
        assert "m=1024,t=1" in before
        wrong = await client.post("/auth/login", json={"email": "rehash@example.com", "password": "wrong password"})
        assert wrong.status_code == 401
        async with engine.connect() as conn:
            assert (await conn.execute(select(users.c.password_hash))).scalar_one() == before  # no upgrade on failure
        await login(client, email="rehash@example.com")
        async with engine.connect() as conn:
            after = (await conn.execute(select(users.c.password_hash))).scalar_one()
        assert "m=2048,t=2" in after
        await login(client, email="rehash@example.com")  # the new hash verifies
