"""The security-event feed (RFC 8936 poll, with our non-destructive cursor): what it serves, in what order,
to whom, and what it refuses."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text as sa_text

from issuer.events import feed as feed_module
from issuer.storage import events
from issuer.storage.cleanup import cleanup
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, delete_account, login, register
from tests.support.issuer import ISSUER_URL, IssuerHarness
from tests.support.jwt import jwt_claims, segments
from tests.support.keys import fetch_jwks
from tests.support.oauth import Credentials, decode_set, new_client, poll, poll_all

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
ACCOUNT_PURGED = "https://schemas.openid.net/secevent/risc/event-type/account-purged"


async def decoded(client: httpx.AsyncClient, who: Credentials, sets: list[str]) -> list[dict[str, Any]]:
    jwks = await fetch_jwks(client)
    return [decode_set(jwks, token, audience=who.client_id, issuer=ISSUER_URL) for token in sets]


async def test_each_revocation_is_served_as_a_standard_set(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    first, second = await login(client), await login(client)
    sid = jwt_claims(first["access_token"])["sid"]
    await client.post("/auth/logout", json={"refresh_token": first["refresh_token"]})
    await client.post("/auth/logout-all", headers=bearer(second["access_token"]))
    third = await login(client)
    await delete_account(client, third["access_token"], PASSWORD)

    gateway = await new_client(issuer, "events")
    sets, _ = await poll_all(client, gateway)
    assert len(sets) == 3
    for token in sets:
        header, claims = segments(token)
        assert header == {"alg": "RS256", "typ": "secevent+jwt", "kid": header["kid"]}
        # RFC 8417 section 2.2: a SET is not an access token: no exp, no sub.
        assert "exp" not in claims
        assert "sub" not in claims
    session, everything, purged = await decoded(client, gateway, sets)
    user_subject = {"format": "iss_sub", "iss": ISSUER_URL, "sub": user["id"]}
    assert session["sub_id"] == {
        "format": "complex",
        "user": user_subject,
        "session": {"format": "opaque", "id": sid},
    }
    assert list(session["events"]) == [SESSION_REVOKED]
    assert isinstance(session["events"][SESSION_REVOKED]["event_timestamp"], int)
    assert everything["sub_id"] == user_subject
    assert everything["events"][SESSION_REVOKED]["token_version"] == 1
    assert purged["sub_id"] == user_subject
    assert list(purged["events"]) == [ACCOUNT_PURGED]
    for claims in (session, everything, purged):
        assert claims["aud"] == gateway.client_id
        uuid.UUID(claims["txn"])  # the event's own id, the same for every client
    assert len({c["jti"] for c in (session, everything, purged)}) == 3


async def test_the_feed_is_non_destructive_and_each_client_gets_its_own_sets(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    await client.post("/auth/logout", json={"refresh_token": (await login(client))["refresh_token"]})
    one, two = await new_client(issuer, "events", name="one"), await new_client(issuer, "events", name="two")
    first = await decoded(client, one, (await poll_all(client, one))[0])
    again = await decoded(client, one, (await poll_all(client, one))[0])  # no cursor: from the start again
    other = await decoded(client, two, (await poll_all(client, two))[0])
    assert first == again
    assert [c["txn"] for c in first] == [c["txn"] for c in other]
    assert first[0]["jti"] != other[0]["jti"]
    assert other[0]["aud"] == two.client_id


async def test_paging_follows_commit_order_and_the_cursor_moves_on(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    sessions = [await login(client) for _ in range(5)]
    for tokens in sessions:
        await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    gateway = await new_client(issuer, "events")
    seen: list[str] = []
    cursor = None
    pages = []
    while True:
        body: dict[str, Any] = {"maxEvents": 2} if cursor is None else {"maxEvents": 2, "cursor": cursor}
        answer = (await poll(client, gateway, **body)).json()
        pages.append((len(answer["sets"]), answer["moreAvailable"]))
        seen.extend(answer["sets"].values())
        cursor = answer["cursor"]
        if not answer["moreAvailable"]:
            break
    assert pages == [(2, True), (2, True), (1, False)]
    sids = [c["sub_id"]["session"]["id"] for c in await decoded(client, gateway, seen)]
    assert sids == [jwt_claims(t["access_token"])["sid"] for t in sessions]
    # Caught up: the same cursor comes back with nothing.
    answer = (await poll(client, gateway, cursor=cursor)).json()
    assert answer == {"sets": {}, "moreAvailable": False, "cursor": cursor}
    # maxEvents 0 (RFC 8936: only acknowledging) returns nothing and tells whether more exists.
    answer = (await poll(client, gateway, maxEvents=0)).json()
    assert answer["sets"] == {}
    assert answer["moreAvailable"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"maxEvents": -1},
        {"maxEvents": 1001},
        {"maxEvents": "10"},
        {"maxEvents": 1.5},
        {"maxEvents": True},
        {"returnImmediately": "yes"},
        {"cursor": 12},
        {"cursor": "not-a-cursor"},
        {"cursor": "12"},
        {"cursor": "99999999999999999999999.abc"},
        {"cursor": "١٢.abc"},
    ],
)
async def test_bad_poll_requests_get_400(
    issuer: IssuerHarness, client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    gateway = await new_client(issuer, "events")
    assert_error(await client.post("/events/poll", json=body, headers=gateway.headers), 400, "invalid_request")


async def test_a_cursor_replayed_by_another_client_or_tampered_with_is_refused(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    await client.post("/auth/logout", json={"refresh_token": (await login(client))["refresh_token"]})
    mine, theirs = await new_client(issuer, "events", name="mine"), await new_client(issuer, "events", name="theirs")
    _, cursor = await poll_all(client, mine)
    assert_error(await poll(client, theirs, cursor=cursor), 400, "invalid_request")
    seq, mac = cursor.split(".")
    assert_error(await poll(client, mine, cursor=f"{int(seq) - 1}.{mac}"), 400, "invalid_request")
    assert (await poll(client, mine, cursor=cursor)).status_code == 200


async def test_a_cursor_older_than_the_kept_window_expires_and_a_restart_is_complete(
    issuer: IssuerHarness, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await register(client)
    gateway = await new_client(issuer, "events")
    very_first = (await poll(client, gateway, maxEvents=0)).json()["cursor"]  # before any event
    old = await login(client)
    await client.post("/auth/logout", json={"refresh_token": old["refresh_token"]})
    _, early_cursor = await poll_all(client, gateway)  # after the event that will be pruned

    clock.advance(3600)
    recent = await login(client)
    await client.post("/auth/logout", json={"refresh_token": recent["refresh_token"]})
    settings = issuer.services.settings
    report = await cleanup(
        issuer.services.db,
        now=clock(),
        retention=timedelta(days=7),
        failure_window=timedelta(hours=1),
        event_retention=feed_module.event_retention(settings),
    )
    assert report.events == 1

    assert_error(await poll(client, gateway, cursor=very_first), 400, "cursor_expired")
    # The cursor taken after the pruned event is still good; and a restart without a cursor gets the window.
    assert len((await poll_all(client, gateway, early_cursor))[0]) == 1
    sets, _ = await poll_all(client, gateway)
    [claims] = await decoded(client, gateway, sets)
    assert claims["sub_id"]["session"]["id"] == jwt_claims(recent["access_token"])["sid"]


async def test_an_event_that_commits_late_is_never_skipped(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """The sequence number is taken under the counter's lock, held to commit: a revocation that starts later
    waits for an earlier open one, so a reader never sees N+1 before N has committed."""
    await register(client)
    tokens = await login(client)
    gateway = await new_client(issuer, "events")
    early = events.Event(str(uuid.uuid4()), issuer.clock(), events.USER_REVOKED, "someone", None, 7, "logout_all")
    async with issuer.services.db.transaction() as tx:
        await events.append(tx, early)
        logout = asyncio.create_task(client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]}))
        await asyncio.sleep(0.3)
        assert not logout.done()  # waiting for the counter row
        answer = (await poll(client, gateway)).json()
        assert answer["sets"] == {}
        cursor = answer["cursor"]
    assert (await logout).status_code == 204
    sets, _ = await poll_all(client, gateway, cursor)
    assert [c["txn"] for c in await decoded(client, gateway, sets)][:1] == [early.id]
    assert len(sets) == 2


async def test_a_long_poll_wakes_on_the_notification_of_a_commit(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the periodic re-read pushed out of reach, only the LISTEN notification can end the wait."""
    monkeypatch.setattr(feed_module, "POLL_WHILE_LISTENING", 1000.0)
    issuer.services.feed.long_poll = 1000.0
    async with asyncio.timeout(10):
        await issuer.services.listener.wait_connected()
    await register(client)
    tokens = await login(client)
    gateway = await new_client(issuer, "events")
    _, cursor = await poll_all(client, gateway)
    waiting = asyncio.create_task(
        client.post("/events/poll", json={"cursor": cursor}, headers=gateway.headers, timeout=30)
    )
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    async with asyncio.timeout(10):
        answer = (await waiting).json()
    assert len(answer["sets"]) == 1


async def test_a_long_poll_with_nothing_new_ends_empty(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    issuer.services.feed.long_poll = 0.2
    gateway = await new_client(issuer, "events")
    response = await client.post("/events/poll", json={}, headers=gateway.headers)
    assert response.status_code == 200
    assert response.json()["sets"] == {}
    assert response.json()["moreAvailable"] is False
    assert response.headers["cache-control"] == "no-store"


async def test_after_a_key_revoke_sets_are_signed_by_a_published_key(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    await register(client)
    await client.post("/auth/logout", json={"refresh_token": (await login(client))["refresh_token"]})
    gateway = await new_client(issuer, "events")
    before, _ = await poll_all(client, gateway)
    old_kid = segments(before[0])[0]["kid"]
    await issuer.services.keys.revoke(old_kid)
    after, _ = await poll_all(client, gateway)
    assert segments(after[0])[0]["kid"] != old_kid
    await decoded(client, gateway, after)  # verifies against the JWKS, which no longer has the old key


async def test_a_backlog_is_signed_a_bounded_page_at_a_time(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new client reading a long backlog must not hold the worker's only thread for a second of RSA: each
    answer signs at most SIGNATURES_PER_ANSWER new SETs and says moreAvailable; signed ones come back free."""
    monkeypatch.setattr(feed_module, "SIGNATURES_PER_ANSWER", 3)
    for _ in range(7):
        await events.append(
            issuer.services.db,
            events.Event(str(uuid.uuid4()), issuer.clock(), events.ACCOUNT_PURGED, str(uuid.uuid4()), None, None, "x"),
        )
    gateway = await new_client(issuer, "events")
    first = (await poll(client, gateway, maxEvents=1000)).json()
    assert (len(first["sets"]), first["moreAvailable"]) == (3, True)
    second = (await poll(client, gateway, maxEvents=1000, cursor=first["cursor"])).json()
    assert (len(second["sets"]), second["moreAvailable"]) == (3, True)
    # From the start again: the six already signed cost nothing, the seventh is new.
    again = (await poll(client, gateway, maxEvents=1000)).json()
    assert (len(again["sets"]), again["moreAvailable"]) == (7, False)
    assert set(first["sets"]) | set(second["sets"]) < set(again["sets"])


async def test_a_sequence_number_handed_out_again_serves_its_new_event(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    """After a restore (or a failover that lost commits) numbers are handed out again: the signed-SET cache
    must not serve the lost event for the new one."""
    await register(client)
    gateway = await new_client(issuer, "events")
    first, second = await login(client), await login(client)
    await client.post("/auth/logout", json={"refresh_token": first["refresh_token"]})
    await poll_all(client, gateway)  # signed and kept
    async with issuer.engine.begin() as conn:
        await conn.execute(sa_text("DELETE FROM security_events"))
        await conn.execute(sa_text("UPDATE security_event_counter SET last_seq = 0, pruned_through = 0"))
    await client.post("/auth/logout", json={"refresh_token": second["refresh_token"]})
    sets, _ = await poll_all(client, gateway)
    [claims] = await decoded(client, gateway, sets)
    assert claims["sub_id"]["session"]["id"] == jwt_claims(second["access_token"])["sid"]
