"""The refresh trail and REFRESH_BINDING: every use of a session is recorded (no extra round trip: the rotation
statement writes it), and a refresh from another network *and* another browser is caught, while an owner who
moves within a /24 (or a /64) or updates their browser is not."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import text

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.operations import scrape, value

FIREFOX_120 = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
FIREFOX_121 = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
THIEF_AGENT = "curl/8.5.0"
HOME, HOME_NEIGHBOUR, ELSEWHERE = "198.51.100.20", "198.51.100.77", "203.0.113.99"


async def login_from(issuer: IssuerHarness, ip: str, agent: str) -> dict[str, Any]:
    async with issuer.client(ip=ip) as client:
        response = await client.post(
            "/auth/login",
            json={"email": "alice@example.com", "password": PASSWORD, "token_transport": "body"},
            headers={"user-agent": agent},
        )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


async def refresh_from(issuer: IssuerHarness, token: str, ip: str, agent: str) -> httpx.Response:
    async with issuer.client(ip=ip) as client:
        return await client.post("/auth/refresh", json={"refresh_token": token}, headers={"user-agent": agent})


async def trail(issuer: IssuerHarness) -> list[tuple[str, str]]:
    async with issuer.engine.connect() as conn:
        rows = await conn.execute(text("SELECT ip, user_agent FROM session_uses ORDER BY used_at"))
        return [(row.ip, row.user_agent) for row in rows]


async def suspicious_count(issuer: IssuerHarness, action: str) -> float:
    async with issuer.client() as client:
        return value(await scrape(client), "issuer_refresh_suspicious_total", action=action)


@pytest.fixture
async def signed_up(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)


async def test_every_use_is_recorded_and_the_session_list_shows_first_and_latest(
    issuer: IssuerHarness, client: httpx.AsyncClient, signed_up: None, clock: FakeClock
) -> None:
    tokens = await login_from(issuer, HOME, FIREFOX_120)
    clock.advance(60)
    rotated = await refresh_from(issuer, tokens["refresh_token"], HOME_NEIGHBOUR, FIREFOX_120)
    assert rotated.status_code == 200
    clock.advance(60)
    again = await refresh_from(issuer, rotated.json()["refresh_token"], HOME_NEIGHBOUR, FIREFOX_121)
    assert again.status_code == 200
    assert await trail(issuer) == [(HOME, FIREFOX_120), (HOME_NEIGHBOUR, FIREFOX_120), (HOME_NEIGHBOUR, FIREFOX_121)]

    listed = (await client.get("/auth/sessions", headers=bearer(again.json()["access_token"]))).json()["sessions"]
    assert len(listed) == 1
    assert (listed[0]["ip"], listed[0]["user_agent"]) == (HOME, FIREFOX_120)
    assert (listed[0]["last_ip"], listed[0]["last_user_agent"]) == (HOME_NEIGHBOUR, FIREFOX_121)


async def test_the_trail_goes_with_its_session(issuer: IssuerHarness, signed_up: None) -> None:
    tokens = await login_from(issuer, HOME, FIREFOX_120)
    assert (await refresh_from(issuer, tokens["refresh_token"], HOME, FIREFOX_120)).status_code == 200
    async with issuer.engine.begin() as conn:
        await conn.execute(text("DELETE FROM users"))
    assert await trail(issuer) == []


async def test_the_owner_moving_within_a_24_or_updating_the_browser_is_not_suspicious(
    issuer: IssuerHarness, signed_up: None
) -> None:
    tokens = await login_from(issuer, HOME, FIREFOX_120)
    token = tokens["refresh_token"]
    for ip, agent in ((HOME_NEIGHBOUR, FIREFOX_120), (HOME_NEIGHBOUR, FIREFOX_121), (ELSEWHERE, FIREFOX_121)):
        response = await refresh_from(issuer, token, ip, agent)
        assert response.status_code == 200, (ip, agent)
        token = response.json()["refresh_token"]
    assert await suspicious_count(issuer, "audited") == 0


async def test_a_stolen_token_from_another_network_and_browser_is_audited_by_default(
    issuer: IssuerHarness, signed_up: None, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = await login_from(issuer, HOME, FIREFOX_120)
    stolen = await refresh_from(issuer, tokens["refresh_token"], ELSEWHERE, THIEF_AGENT)
    assert stolen.status_code == 200  # audit only: the refresh goes through, and the SIEM hears of it
    assert await suspicious_count(issuer, "audited") == 1
    flagged = [r for r in caplog.records if getattr(r, "event", None) == "refresh_suspicious"]
    assert len(flagged) == 1


async def test_with_reject_a_stolen_token_ends_the_session(settings: Settings, clock: FakeClock) -> None:
    async with running_issuer(with_settings(settings, refresh_binding="reject"), clock) as issuer:
        async with issuer.client() as client:
            await register(client)
        tokens = await login_from(issuer, HOME, FIREFOX_120)
        stolen = await refresh_from(issuer, tokens["refresh_token"], ELSEWHERE, THIEF_AGENT)
        assert_error(stolen, 401, "invalid_grant")
        assert "sign in again" in stolen.json()["error_description"]
        assert await suspicious_count(issuer, "rejected") == 1
        # The session is revoked (with its event): the owner signs in again, nothing of it is usable.
        async with issuer.client(ip=HOME) as owner:
            assert (await refresh_body(owner, tokens["refresh_token"])).status_code == 401
        async with issuer.engine.connect() as conn:
            reasons = (await conn.execute(text("SELECT revoked_reason FROM refresh_families"))).scalars().all()
            kinds = (await conn.execute(text("SELECT kind, reason FROM security_events"))).all()
        assert reasons == ["binding"]
        assert [tuple(k) for k in kinds] == [("session_revoked", "binding")]
        # The owner's ordinary refreshes are untouched by reject.
        fresh = await login_from(issuer, HOME, FIREFOX_120)
        moved = await refresh_from(issuer, fresh["refresh_token"], HOME_NEIGHBOUR, FIREFOX_121)
        assert moved.status_code == 200


@pytest.mark.parametrize(
    ("first", "then", "flagged"),
    [
        ("2001:db8:1:2::10", "2001:db8:1:2:ffff::1", False),  # same /64
        ("2001:db8:1:2::10", "2001:db8:1:3::10", True),  # another /64
        ("198.51.100.20", "::ffff:198.51.100.21", False),  # IPv4-mapped IPv6 is the IPv4 /24
    ],
)
async def test_networks_are_compared_per_24_and_per_64(
    issuer: IssuerHarness, signed_up: None, first: str, then: str, flagged: bool
) -> None:
    tokens = await login_from(issuer, first, FIREFOX_120)
    assert (await refresh_from(issuer, tokens["refresh_token"], then, THIEF_AGENT)).status_code == 200
    assert await suspicious_count(issuer, "audited") == (1 if flagged else 0)


async def test_off_checks_nothing(settings: Settings, clock: FakeClock) -> None:
    async with running_issuer(with_settings(settings, refresh_binding="off"), clock) as issuer:
        async with issuer.client() as client:
            await register(client)
        tokens = await login_from(issuer, HOME, FIREFOX_120)
        assert (await refresh_from(issuer, tokens["refresh_token"], ELSEWHERE, THIEF_AGENT)).status_code == 200
        assert await suspicious_count(issuer, "audited") == 0


async def test_reject_also_catches_a_thief_replaying_inside_the_grace_window(
    settings: Settings, clock: FakeClock
) -> None:
    """The victim rotates; the thief replays the same token a moment later, inside REFRESH_REUSE_GRACE, from
    another network and browser: not the benign second tab the window is for."""
    async with running_issuer(with_settings(settings, refresh_binding="reject"), clock) as issuer:
        async with issuer.client() as client:
            await register(client)
        stolen = (await login_from(issuer, HOME, FIREFOX_120))["refresh_token"]
        assert (await refresh_from(issuer, stolen, HOME, FIREFOX_120)).status_code == 200
        clock.advance(2)
        # The victim's own second tab replaying inside the window is still the same successor.
        assert (await refresh_from(issuer, stolen, HOME, FIREFOX_120)).status_code == 200
        thief = await refresh_from(issuer, stolen, ELSEWHERE, THIEF_AGENT)
        assert_error(thief, 401, "invalid_grant")
        async with issuer.engine.connect() as conn:
            reasons = (await conn.execute(text("SELECT revoked_reason FROM refresh_families"))).scalars().all()
        assert reasons == ["binding"]
