"""Per-client-IP token buckets (issuer.http.throttle), attacked through the HTTP API, and who the client is.

Refresh is limited in this process's memory (on the monotonic clock); login, register and account deletion
share one bucket per address kept in the database, so the limit holds across replicas. IPv6 clients are
limited per /64; X-Forwarded-For is believed only from trusted proxies. The account lock-out is off here (see
tests/accounts/test_lockout.py), so only the IP limit answers 429. Both clocks are the one FakeClock
(``monotonic=clock.monotonic``): ``clock.advance`` moves them together, and nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from issuer.http import throttle
from issuer.http.throttle import IpRateLimiter
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, assert_throttled, bearer, delete_account, login, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.operations import sample

ALICE = "alice@example.com"
WRONG = "not the right password"


@pytest.fixture
async def limited(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    """5 requests per minute per IP; no account lock-out, so only the IP limit answers 429."""
    configured = with_settings(settings, rate_limit_per_ip=5)
    async with running_issuer(configured, clock, monotonic=clock.monotonic) as harness:
        yield harness


async def _send(client: httpx.AsyncClient, endpoint: str, index: int) -> httpx.Response:
    if endpoint == "login":
        return await client.post("/auth/login", json={"email": ALICE, "password": WRONG})
    if endpoint == "register":
        return await client.post("/auth/register", json={"email": f"user{index}@example.com", "password": PASSWORD})
    return await client.post("/auth/refresh", json={"refresh_token": "A" * 43})


EXPECTED_OK = {"login": 401, "register": 201, "refresh": 401}


@pytest.mark.parametrize("endpoint", ["login", "register", "refresh"])
async def test_ip_limit_on_each_endpoint(limited: IssuerHarness, clock: FakeClock, endpoint: str) -> None:
    async with limited.client(ip="192.0.2.10") as client, limited.client(ip="192.0.2.11") as other:
        for i in range(5):
            assert (await _send(client, endpoint, i)).status_code == EXPECTED_OK[endpoint]
        sixth = await _send(client, endpoint, 5)
        wait = assert_throttled(sixth)
        assert wait == 12  # 5 per minute: one token every 12 seconds
        assert sample(limited.services, "issuer_throttled_requests_total", {"route": endpoint, "reason": "ip"}) == 1

        # Another address has its own bucket.
        assert (await _send(other, endpoint, 100)).status_code == EXPECTED_OK[endpoint]

        # Refill: not yet after 11 s, one token after 12 s, and only one.
        clock.advance(11)
        # 1 s left (the limiter may round a float hair up to 2; it never announces less than the true wait).
        assert assert_throttled(await _send(client, endpoint, 6)) in (1, 2)
        clock.advance(1)
        assert (await _send(client, endpoint, 7)).status_code == EXPECTED_OK[endpoint]
        assert_throttled(await _send(client, endpoint, 8))
        # A full minute refills the whole burst, no more.
        clock.advance(3600)
        for i in range(5):
            assert (await _send(client, endpoint, 20 + i)).status_code == EXPECTED_OK[endpoint]
        assert_throttled(await _send(client, endpoint, 30))


async def test_login_and_register_ip_limit_holds_across_replicas(settings: Settings, clock: FakeClock) -> None:
    """The login/register bucket is in the database: spreading requests over replicas does not multiply it."""
    configured = with_settings(settings, rate_limit_per_ip=4)
    async with (
        running_issuer(configured, clock) as first,
        running_issuer(configured, clock) as second,
        first.client(ip="192.0.2.30") as a,
        second.client(ip="192.0.2.30") as b,
    ):
        statuses = []
        for i in range(3):
            statuses.append((await _send(a, "login", i)).status_code)
            statuses.append((await _send(b, "register", i)).status_code)
        assert statuses[:4] == [401, 201, 401, 201]
        assert statuses[4:] == [429, 429]
        # The refresh bucket is per process and separate: still open on both.
        assert (await _send(a, "refresh", 0)).status_code == 401
        assert (await _send(b, "refresh", 0)).status_code == 401


async def test_parallel_logins_from_one_address_take_exactly_the_bucket(limited: IssuerHarness) -> None:
    """20 logins at once from one address: exactly the 5 tokens of its bucket are given out, no more.

    A limiter that read the bucket and wrote it back in two steps would let most of the burst through."""
    async with limited.client(ip="192.0.2.40") as client:
        responses = await asyncio.gather(*(_send(client, "login", i) for i in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [401] * 5 + [429] * 15, statuses


async def test_throttled_register_writes_nothing(limited: IssuerHarness) -> None:
    async with limited.client(ip="192.0.2.20") as client:
        for i in range(5):
            await register(client, email=f"u{i}@example.com")
        refused = await client.post("/auth/register", json={"email": "late@example.com", "password": PASSWORD})
        assert_throttled(refused)
    async with limited.client(ip="192.0.2.21") as other:
        # The email was not taken by the refused request.
        unknown = await other.post("/auth/login", json={"email": "late@example.com", "password": PASSWORD})
        assert_error(unknown, 401, "invalid_credentials")
        retry = await other.post("/auth/register", json={"email": "late@example.com", "password": PASSWORD})
        assert retry.status_code == 201, retry.text


async def test_login_and_register_share_a_bucket_refresh_has_its_own(limited: IssuerHarness) -> None:
    async with limited.client(ip="192.0.2.30") as client:
        assert (await _send(client, "register", 1)).status_code == 201
        assert (await _send(client, "login", 2)).status_code == 401
        assert (await _send(client, "register", 3)).status_code == 201
        assert (await _send(client, "login", 4)).status_code == 401
        assert (await _send(client, "register", 5)).status_code == 201
        for endpoint in ("login", "register"):
            assert_throttled(await _send(client, endpoint, 6))
        for i in range(5):
            assert (await _send(client, "refresh", 10 + i)).status_code == 401
        assert_throttled(await _send(client, "refresh", 20))


async def test_account_deletion_takes_from_the_login_bucket(limited: IssuerHarness) -> None:
    async with limited.client(ip="192.0.2.60") as setup:
        await register(setup)
        access = (await login(setup))["access_token"]
    async with limited.client(ip="192.0.2.61") as client:
        for _ in range(5):
            assert_error(await delete_account(client, access, WRONG), 403, "invalid_credentials")
        assert_throttled(await delete_account(client, access, PASSWORD))
        assert sample(limited.services, "issuer_throttled_requests_total", {"route": "account", "reason": "ip"}) == 1
        assert_throttled(await _send(client, "login", 1))  # one bucket for every password check
        assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200


async def test_ip_limit_leaves_other_endpoints_alone(limited: IssuerHarness) -> None:
    async with limited.client(ip="192.0.2.40") as client:
        await register(client)
        tokens = await login(client)
        for i in range(3):
            await _send(client, "login", i)
        assert_throttled(await _send(client, "login", 9))
        # Verification material, bearer endpoints and logout keep working for a throttled address.
        for _ in range(10):
            assert (await client.get("/.well-known/jwks.json")).status_code == 200
            assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200
        logout = await client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]})
        assert logout.status_code == 204


async def test_ip_limit_zero_disables_it(settings: Settings, clock: FakeClock) -> None:
    async with running_issuer(settings, clock, monotonic=clock.monotonic) as harness, harness.client() as client:
        assert harness.services.settings.rate_limit_per_ip == 0
        for i in range(40):
            assert (await _send(client, "login", i)).status_code == 401
            assert (await _send(client, "refresh", i)).status_code == 401
        assert sample(harness.services, "issuer_throttled_requests_total", {"route": "login", "reason": "ip"}) == 0


def test_ip_rate_limiter_unit() -> None:
    clock = FakeClock()
    limiter = IpRateLimiter(15, clock.monotonic)  # 15 per minute: one token every 4 s (exact in binary floating point)
    assert limiter.enabled
    assert [limiter.acquire("a") for _ in range(15)] == [0.0] * 15
    assert limiter.acquire("a") == 4
    assert limiter.acquire("b") == 0.0
    clock.advance(1)
    assert limiter.acquire("a") == 3  # 0.25 tokens: 3 more seconds for the next one
    clock.advance(3)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == 4
    # Refusals do not consume: waiting exactly the announced time always succeeds.
    for _ in range(5):
        wait = limiter.acquire("a")
        assert wait > 0
        clock.advance(wait)
        assert limiter.acquire("a") == 0.0
    # The bucket never holds more than a burst, however long the address was idle.
    clock.advance(10**6)
    assert [limiter.acquire("a") for _ in range(16)] == [0.0] * 15 + [4]
    # No address (no socket peer) and a disabled limiter never refuse.
    assert all(limiter.acquire(None) == 0.0 for _ in range(20))
    disabled = IpRateLimiter(0, clock.monotonic)
    assert not disabled.enabled
    assert all(disabled.acquire("a") == 0.0 for _ in range(100))


def test_ip_rate_limiter_small_rates_round_up() -> None:
    clock = FakeClock()
    limiter = IpRateLimiter(1, clock.monotonic)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == 60
    clock.advance(59.5)
    assert limiter.acquire("a") == 1  # never 0 while refusing
    clock.advance(0.5)
    assert limiter.acquire("a") == 0.0


def test_ip_rate_limiter_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle, "MAX_TRACKED_ADDRESSES", 3)
    clock = FakeClock()
    limiter = IpRateLimiter(1, clock.monotonic)
    for address in ("a", "b", "c"):
        assert limiter.acquire(address) == 0.0
    assert limiter.acquire("a") > 0  # "a" is now the most recently seen
    assert limiter.acquire("d") == 0.0  # evicts the least recently seen: "b"
    assert len(limiter._buckets) == 3
    assert limiter.acquire("a") > 0
    assert limiter.acquire("c") > 0
    assert limiter.acquire("b") == 0.0  # forgotten, so a fresh bucket


# ---------------------------------------------------------------- who the client is (X-Forwarded-For)


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(limited: IssuerHarness) -> None:
    async with limited.client(ip="192.0.2.50") as client:
        for i in range(5):
            response = await client.post(
                "/auth/login",
                json={"email": ALICE, "password": WRONG},
                headers={"X-Forwarded-For": f"203.0.113.{100 + i}"},
            )
            assert response.status_code == 401
        refused = await client.post(
            "/auth/login", json={"email": ALICE, "password": WRONG}, headers={"X-Forwarded-For": "203.0.113.200"}
        )
        assert_throttled(refused)


@pytest.fixture
async def behind_proxy(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    configured = with_settings(settings, rate_limit_per_ip=5, trusted_proxies=("10.0.0.0/8", "127.0.0.1"))
    async with running_issuer(configured, clock, monotonic=clock.monotonic) as harness:
        yield harness


async def _login_via(client: httpx.AsyncClient, forwarded: str | list[str]) -> httpx.Response:
    values = forwarded if isinstance(forwarded, list) else [forwarded]
    headers = [("X-Forwarded-For", value) for value in values]
    return await client.post("/auth/login", json={"email": ALICE, "password": WRONG}, headers=headers)


async def test_trusted_proxy_clients_are_limited_separately(behind_proxy: IssuerHarness) -> None:
    async with behind_proxy.client(ip="10.1.2.3") as proxy:
        for _ in range(5):
            assert (await _login_via(proxy, "198.51.100.1")).status_code == 401
        assert_throttled(await _login_via(proxy, "198.51.100.1"))
        # Another client behind the same proxy is not punished for the first one.
        for _ in range(5):
            assert (await _login_via(proxy, "198.51.100.2")).status_code == 401
        assert_throttled(await _login_via(proxy, "198.51.100.2"))
        # A chain through two trusted proxies: the client is the nearest untrusted hop.
        assert_throttled(await _login_via(proxy, "198.51.100.1, 10.9.9.9"))


async def test_client_cannot_dodge_the_limit_by_prepending_forwarded_for(behind_proxy: IssuerHarness) -> None:
    """The proxy appends the real client; whatever the client put in front is not believed."""
    async with behind_proxy.client(ip="10.1.2.3") as proxy:
        for i in range(5):
            assert (await _login_via(proxy, f"1.2.3.{i}, 198.51.100.7")).status_code == 401
        assert_throttled(await _login_via(proxy, "1.2.3.99, 198.51.100.7"))
        assert_throttled(await _login_via(proxy, "198.51.100.7"))


async def test_client_cannot_dodge_the_limit_with_its_own_forwarded_for_header_line(
    behind_proxy: IssuerHarness,
) -> None:
    """Some proxies (HAProxy's ``option forwardfor``) add their own header line after the client's.

    The header lines form one list (RFC 9110 section 5.3); the nearest untrusted hop is in the last line.
    """
    async with behind_proxy.client(ip="10.1.2.3") as proxy:
        for i in range(5):
            assert (await _login_via(proxy, [f"1.2.3.{i}", "198.51.100.8"])).status_code == 401
        assert_throttled(await _login_via(proxy, ["1.2.3.77", "198.51.100.8"]))


async def test_forwarded_for_oddities_fall_back_to_the_proxy(behind_proxy: IssuerHarness) -> None:
    async with behind_proxy.client(ip="10.1.2.3") as proxy:
        # Garbage or a missing header: the peer (the proxy) is the client; they share its bucket.
        responses = [await _login_via(proxy, value) for value in ("not-an-ip", "", "999.1.1.1", "   ")]
        responses.append(await proxy.post("/auth/login", json={"email": ALICE, "password": WRONG}))
        assert [r.status_code for r in responses] == [401] * 5
        assert_throttled(await _login_via(proxy, "still-not-an-ip"))


async def _session_ip(harness: IssuerHarness, peer: str, headers: list[tuple[str, str]]) -> str | None:
    async with harness.client(ip=peer) as client:
        response = await client.post(
            "/auth/login", json={"email": ALICE, "password": PASSWORD, "token_transport": "body"}, headers=headers
        )
        assert response.status_code == 200, response.text
        sessions = await client.get("/auth/sessions", headers=bearer(response.json()["access_token"]))
        assert sessions.status_code == 200
        current = [s for s in sessions.json()["sessions"] if s["current"]]
    assert len(current) == 1
    ip: str | None = current[0]["ip"]
    return ip


async def test_session_ip_is_the_derived_client_address(behind_proxy: IssuerHarness) -> None:
    async with behind_proxy.client() as client:
        await register(client)
    xff = "X-Forwarded-For"
    assert await _session_ip(behind_proxy, "192.0.2.60", [(xff, "198.51.100.9")]) == "192.0.2.60"
    assert await _session_ip(behind_proxy, "10.1.2.3", [(xff, "198.51.100.9")]) == "198.51.100.9"
    assert await _session_ip(behind_proxy, "10.1.2.3", [(xff, "6.6.6.6, 198.51.100.10, 10.0.0.5")]) == "198.51.100.10"
    assert await _session_ip(behind_proxy, "10.1.2.3", [(xff, "6.6.6.6"), (xff, "198.51.100.11")]) == "198.51.100.11"
    assert await _session_ip(behind_proxy, "10.1.2.3", []) == "10.1.2.3"
    assert await _session_ip(behind_proxy, "127.0.0.1", [(xff, "2001:db8::1")]) == "2001:db8::1"


@pytest.mark.parametrize("endpoint", ["login", "register", "refresh"])
async def test_ipv6_clients_of_one_64_share_a_bucket_at_every_endpoint(limited: IssuerHarness, endpoint: str) -> None:
    """Through the app, for the database's buckets and for the in-memory one alike."""
    subscriber = [f"2001:db8:1:2::{index + 1:x}" for index in range(5)] + ["2001:db8:1:2:ffff:ffff:ffff:ffff"]
    for index, address in enumerate(subscriber):
        async with limited.client(ip=address) as client:
            response = await _send(client, endpoint, index)
        if index < 5:
            assert response.status_code == EXPECTED_OK[endpoint], response.text
        else:
            assert_throttled(response)
    async with limited.client(ip="2001:db8:1:3::1") as neighbour:
        assert (await _send(neighbour, endpoint, 10)).status_code == EXPECTED_OK[endpoint]


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    """One subscriber holds a whole /64: per-address buckets would hand an attacker endless fresh ones."""
    limiter = IpRateLimiter(2, FakeClock().monotonic)
    assert limiter.acquire("2001:db8:1:2::1") == 0
    assert limiter.acquire("2001:db8:1:2:ffff::9") == 0
    assert limiter.acquire("2001:db8:1:2::abcd") > 0
    assert limiter.acquire("2001:db8:1:3::1") == 0  # the neighbouring /64 is someone else
    assert limiter.acquire("::ffff:192.0.2.1") == 0  # IPv4-mapped is the IPv4 address
    assert limiter.acquire("192.0.2.1") == 0
    assert limiter.acquire("192.0.2.1") > 0
