"""Abuse resistance: per-account lock-out in the database, per-IP token bucket, and who the client is.

Throttling is off in the default test settings; every test here turns it on and attacks it. The lock-out
runs on the FakeClock, the IP bucket on a fake monotonic clock: nothing sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from issuer.accounts.lockout import LockoutPolicy
from issuer.http import throttle
from issuer.http.throttle import IpRateLimiter
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, login, register
from tests.support.issuer import CLIENT_IP, IssuerHarness, running_issuer, with_settings
from tests.support.operations import (
    FakeMonotonic,
    failure_row,
    retry_after,
    running_issuer_with_monotonic,
    sample,
)

THRESHOLD = 5
ALICE = "alice@example.com"
NOBODY = "nobody@example.com"
WRONG = "not the right password"


@pytest.fixture
async def locking(settings: Settings, clock: FakeClock, pg_url: str) -> AsyncIterator[IssuerHarness]:
    """Lock-out on (threshold 5), IP limit off so that only the account lock-out is under test; both backends."""
    configured = with_settings(settings, login_lockout_threshold=THRESHOLD, database_url=pg_url)
    async with running_issuer(configured, clock) as harness:
        yield harness


def attacker_ip(index: int) -> str:
    """A different documentation address per attempt (the attack comes from many addresses)."""
    return f"198.51.{100 + index // 250}.{1 + index % 250}"


async def attempt(harness: IssuerHarness, email: str, password: str, ip: str) -> httpx.Response:
    async with harness.client(ip=ip) as client:
        return await client.post("/auth/login", json={"email": email, "password": password, "token_transport": "body"})


def shape(response: httpx.Response) -> tuple[int, Any, str | None]:
    """What an attacker sees: status, body, Retry-After."""
    return response.status_code, response.json(), response.headers.get("retry-after")


def assert_throttled(response: httpx.Response) -> int:
    assert_error(response, 429, "too_many_requests")
    assert set(response.json()) == {"error", "error_description"}
    assert response.headers["cache-control"] == "no-store"
    assert "refresh_token" not in response.text
    return retry_after(response)


# ---------------------------------------------------------------- per-account lock-out


async def test_brute_force_from_many_addresses_is_locked_out(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)

    responses = [await attempt(locking, ALICE, WRONG, attacker_ip(i)) for i in range(20)]

    statuses = [r.status_code for r in responses]
    assert statuses == [401] * THRESHOLD + [429] * (20 - THRESHOLD), statuses
    for response in responses[:THRESHOLD]:
        assert_error(response, 401, "invalid_credentials")
        assert "retry-after" not in response.headers
    waits = {assert_throttled(response) for response in responses[THRESHOLD:]}
    assert len(waits) == 1, waits
    wait = waits.pop()

    # The right password is refused too while the account is locked: guessing it right earns nothing.
    right = await attempt(locking, ALICE, PASSWORD, attacker_ip(99))
    assert assert_throttled(right) == wait
    assert "access_token" not in right.text

    # Just before the lock ends it still holds (Retry-After counts down on the server's clock).
    if wait > 1:
        locking.clock.advance(wait - 1)
        assert assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(98))) == 1
        locking.clock.advance(1)
    else:
        locking.clock.advance(wait)

    ok = await attempt(locking, ALICE, PASSWORD, attacker_ip(97))
    assert ok.status_code == 200, ok.text
    assert ok.json()["refresh_token"]
    assert await failure_row(locking.engine, ALICE) is None, "a successful login must reset the count"

    # The count started over: THRESHOLD more failures before the next lock, not one.
    again = [await attempt(locking, ALICE, WRONG, attacker_ip(50 + i)) for i in range(THRESHOLD + 1)]
    assert [r.status_code for r in again] == [401] * THRESHOLD + [429]


async def delete_account(client: httpx.AsyncClient, access: str, password: str) -> httpx.Response:
    return await client.request("DELETE", "/auth/account", json={"password": password}, headers=bearer(access))


async def test_account_deletion_guesses_count_with_the_logins(locking: IssuerHarness) -> None:
    """DELETE /auth/account checks the password: a stolen access token must not buy unlimited guesses."""
    async with locking.client() as client:
        await register(client)
        access = (await login(client))["access_token"]
        # Guesses through the deletion endpoint: 403 up to the threshold, then the account is locked.
        guesses = [await delete_account(client, access, WRONG) for _ in range(THRESHOLD + 3)]
        assert [r.status_code for r in guesses] == [403] * THRESHOLD + [429] * 3
        wait = assert_throttled(guesses[-1])
        # While locked, the right password is refused here and at login alike, and nothing is deleted.
        assert assert_throttled(await delete_account(client, access, PASSWORD)) == wait
        assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(1)))
        assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200
        assert sample(locking.services, "issuer_throttled_requests_total", {"route": "account", "reason": "account"})

        locking.clock.advance(wait)
        deleted = await delete_account(client, access, PASSWORD)
        assert deleted.status_code == 204, deleted.text
        assert await failure_row(locking.engine, ALICE) is None


async def test_login_failures_lock_account_deletion_too(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
        access = (await login(client))["access_token"]
    for i in range(THRESHOLD):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(i))).status_code == 401
    async with locking.client() as client:
        assert (await delete_account(client, access, WRONG)).status_code == 429


async def test_unknown_accounts_get_exactly_the_same_treatment(
    locking: IssuerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side by side: a registered email and an unregistered one, attacked identically, look identical."""
    async with locking.client() as client:
        await register(client)
    hashes_checked: list[str] = []
    passwords = locking.services.passwords
    original_verify = passwords._verify

    def counting_verify(stored_hash: str, password: str) -> bool:
        hashes_checked.append(stored_hash)
        return original_verify(stored_hash, password)

    monkeypatch.setattr(passwords, "_verify", counting_verify)

    real: list[tuple[int, Any, str | None]] = []
    unknown: list[tuple[int, Any, str | None]] = []
    verifications: dict[str, list[int]] = {ALICE: [], NOBODY: []}

    async def round_(index: int) -> None:
        for email, sink in ((ALICE, real), (NOBODY, unknown)):
            before = len(hashes_checked)
            sink.append(shape(await attempt(locking, email, WRONG, attacker_ip(index))))
            verifications[email].append(len(hashes_checked) - before)

    for i in range(12):
        await round_(i)
    # Through the lock expiry and into the next, longer lock.
    locking.clock.advance(1)
    for i in range(12, 16):
        await round_(i)
    locking.clock.advance(2)
    for i in range(16, 20):
        await round_(i)

    assert real == unknown
    statuses = [status for status, _, _ in real]
    assert statuses.count(429) > 0
    assert statuses[:THRESHOLD] == [401] * THRESHOLD
    # Same work per attempt (the timing proxy we can assert without a stopwatch): one argon2 verification for
    # every attempt that reached the password check, none for a locked one, for both emails.
    assert verifications[ALICE] == verifications[NOBODY]
    assert verifications[ALICE] == [1 if status == 401 else 0 for status in statuses]
    real_row = await failure_row(locking.engine, ALICE)
    unknown_row = await failure_row(locking.engine, NOBODY)
    assert real_row == unknown_row
    assert real_row is not None


async def test_back_off_doubles_and_is_capped(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
    policy = locking.services.lockout.policy
    cap = int(policy.max_lock.total_seconds())
    for i in range(THRESHOLD):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(i))).status_code == 401
    waits: list[int] = []
    for i in range(25):  # bounded: reaches the cap (900 s) after about ten doublings
        wait = assert_throttled(await attempt(locking, ALICE, WRONG, attacker_ip(100 + i)))
        waits.append(wait)
        if waits.count(cap) >= 3:
            break
        # Wait out the lock exactly, then fail once more: the next lock is longer.
        locking.clock.advance(wait)
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(200 + i))).status_code == 401
    assert waits[0] == 1
    capped_from = waits.index(cap)
    for previous, current in itertools.pairwise(waits[: capped_from + 1]):
        assert current == min(cap, 2 * previous), waits
    assert waits[capped_from:] == [cap] * (len(waits) - capped_from), waits
    assert len(waits) - capped_from >= 3, "never stayed at the cap"
    # Even at the cap, the right password is refused while locked.
    assert assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(250))) == cap


async def test_partial_wait_counts_down(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
    for i in range(THRESHOLD):
        await attempt(locking, ALICE, WRONG, attacker_ip(i))
    locking.clock.advance(1)
    await attempt(locking, ALICE, WRONG, attacker_ip(10))  # lock 2 s
    locking.clock.advance(1)
    await attempt(locking, ALICE, WRONG, attacker_ip(11))  # still locked: refused, not counted
    locking.clock.advance(1)
    assert (await attempt(locking, ALICE, WRONG, attacker_ip(12))).status_code == 401  # lock 4 s
    locking.clock.advance(3)
    assert assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(13))) == 1
    locking.clock.advance(1)
    assert (await attempt(locking, ALICE, PASSWORD, attacker_ip(14))).status_code == 200


async def test_failures_older_than_the_window_are_forgotten(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
    window = locking.services.lockout.policy.window.total_seconds()
    for i in range(THRESHOLD - 1):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(i))).status_code == 401
    locking.clock.advance(window + 1)
    for i in range(THRESHOLD - 1):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(10 + i))).status_code == 401
    row = await failure_row(locking.engine, ALICE)
    assert row is not None
    assert row[0] == THRESHOLD - 1
    assert (await attempt(locking, ALICE, PASSWORD, attacker_ip(20))).status_code == 200


async def test_failures_inside_the_window_accumulate(locking: IssuerHarness) -> None:
    """Spreading guesses out (but within the window) does not dodge the count."""
    async with locking.client() as client:
        await register(client)
    window = locking.services.lockout.policy.window.total_seconds()
    step = window / (THRESHOLD + 1)
    for i in range(THRESHOLD):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(i))).status_code == 401
        locking.clock.advance(step)
    # The lock from the last failure (1 s) has passed, but the count is at the threshold: the next failure locks.
    assert (await attempt(locking, ALICE, WRONG, attacker_ip(50))).status_code == 401
    assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(51)))


async def test_email_normalization_does_not_split_the_count(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
    variants = [
        "alice@example.com",
        "ALICE@example.com",
        " Alice@Example.COM ",
        "alice@EXAMPLE.com",
        "aLiCe@example.com",
    ]
    for i, email in enumerate(variants):
        assert (await attempt(locking, email, WRONG, attacker_ip(i))).status_code == 401
    assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(10)))


async def test_lock_out_is_per_account(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
        await register(client, email="bob@example.com")
    for i in range(THRESHOLD + 3):
        await attempt(locking, ALICE, WRONG, attacker_ip(i))
    assert_throttled(await attempt(locking, ALICE, PASSWORD, CLIENT_IP))
    ok = await attempt(locking, "bob@example.com", PASSWORD, CLIENT_IP)
    assert ok.status_code == 200, ok.text


async def test_two_instances_share_the_lock_out(settings: Settings, clock: FakeClock) -> None:
    configured = with_settings(settings, login_lockout_threshold=THRESHOLD)
    async with running_issuer(configured, clock) as a, running_issuer(configured, clock) as b:
        async with a.client() as client:
            await register(client)
        # Failures alternate between the replicas; together they reach the threshold.
        for i in range(THRESHOLD):
            harness = a if i % 2 == 0 else b
            assert (await attempt(harness, ALICE, WRONG, attacker_ip(i))).status_code == 401
        wait_on_b = assert_throttled(await attempt(b, ALICE, PASSWORD, attacker_ip(20)))
        wait_on_a = assert_throttled(await attempt(a, ALICE, PASSWORD, attacker_ip(21)))
        assert wait_on_a == wait_on_b
        clock.advance(wait_on_b)
        assert (await attempt(b, ALICE, PASSWORD, attacker_ip(22))).status_code == 200
        # The success on B reset the count that A sees.
        for i in range(THRESHOLD):
            assert (await attempt(a, ALICE, WRONG, attacker_ip(30 + i))).status_code == 401


async def test_concurrent_failures_are_all_counted(settings: Settings, clock: FakeClock) -> None:
    """20 simultaneous wrong guesses: no lost update in the counter (threshold high enough never to lock)."""
    configured = with_settings(settings, login_lockout_threshold=1000)
    async with running_issuer(configured, clock) as harness:
        async with harness.client() as client:
            await register(client)
        responses = await asyncio.gather(*(attempt(harness, ALICE, WRONG, attacker_ip(i)) for i in range(20)))
        assert [r.status_code for r in responses] == [401] * 20
        row = await failure_row(harness.engine, ALICE)
        assert row is not None
        assert row[0] == 20, f"{20 - row[0]} concurrent failures were lost"


async def test_parallel_burst_gets_no_more_guesses_than_the_threshold(
    locking: IssuerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 guesses at once from 50 addresses (a botnet): only THRESHOLD passwords are ever checked.

    If the lock were checked and the failure counted in separate steps, every guess of the burst would pass
    the check before the first failure was counted, and the right password anywhere in it would log in.
    """
    async with locking.client() as client:
        await register(client)
    checked: list[str] = []
    passwords = locking.services.passwords
    original_verify = passwords._verify

    def counting_verify(stored_hash: str, password: str) -> bool:
        checked.append(password)
        return original_verify(stored_hash, password)

    monkeypatch.setattr(passwords, "_verify", counting_verify)
    for email in (ALICE, NOBODY):
        checked.clear()
        responses = await asyncio.gather(
            *(attempt(locking, email, f"guess number {i}", attacker_ip(i)) for i in range(50))
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(401) == THRESHOLD, statuses
        assert statuses.count(429) == 50 - THRESHOLD, statuses
        assert len(checked) == THRESHOLD
        row = await failure_row(locking.engine, email)
        assert row is not None
        failures, locked_until = row
        assert failures == THRESHOLD
        expected = locking.services.lockout.policy.lock_for(failures)
        assert expected is not None
        assert locked_until == locking.clock() + expected
    assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(99)))


async def test_right_password_late_in_a_parallel_burst_is_refused(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
    guesses = [f"guess number {i}" for i in range(29)] + [PASSWORD]
    responses = await asyncio.gather(*(attempt(locking, ALICE, g, attacker_ip(i)) for i, g in enumerate(guesses)))
    statuses = [r.status_code for r in responses]
    # At most THRESHOLD attempts were evaluated (the right password only wins if it was among them).
    assert statuses.count(401) + statuses.count(200) <= THRESHOLD, statuses
    assert statuses.count(429) >= len(guesses) - THRESHOLD


async def test_lock_out_metrics(locking: IssuerHarness) -> None:
    async with locking.client() as client:
        await register(client)
    for i in range(THRESHOLD + 2):
        await attempt(locking, ALICE, WRONG, attacker_ip(i))
    services = locking.services
    assert sample(services, "issuer_logins_total", {"outcome": "invalid_credentials"}) == THRESHOLD
    assert sample(services, "issuer_logins_total", {"outcome": "locked"}) == 2
    assert sample(services, "issuer_throttled_requests_total", {"route": "login", "reason": "account"}) == 2


def test_lockout_policy_unit() -> None:
    policy = LockoutPolicy(threshold=3, base_lock=timedelta(seconds=1), max_lock=timedelta(seconds=60))
    assert [policy.lock_for(n) for n in range(3)] == [None, None, None]
    assert [policy.lock_for(n).total_seconds() for n in range(3, 11)] == [1, 2, 4, 8, 16, 32, 60, 60]  # type: ignore[union-attr]
    assert policy.lock_for(10**6) == timedelta(seconds=60)  # no overflow on absurd counts
    assert LockoutPolicy(threshold=0).lock_for(100) is None
    assert not LockoutPolicy(threshold=0).enabled


@pytest.mark.parametrize(("base", "cap"), [(1, 60), (1, 900), (3, 7), (5, 5), (1, 10**12)])
def test_lock_table_for_sql_is_lock_for(base: int, cap: int) -> None:
    """PostgreSQL reads the lock lengths from this table; its last entry stands for every count beyond."""
    policy = LockoutPolicy(threshold=4, base_lock=timedelta(seconds=base), max_lock=timedelta(seconds=cap))
    table = policy.lock_seconds()
    for failures in range(4, 4 + 80):
        expected = policy.lock_for(failures)
        assert expected is not None
        assert table[min(failures - 4, len(table) - 1)] == expected.total_seconds()
    assert LockoutPolicy(threshold=0).lock_seconds() == []


async def test_lockout_disabled_never_locks(client: httpx.AsyncClient, issuer: IssuerHarness) -> None:
    await register(client)
    for i in range(30):
        assert (await attempt(issuer, ALICE, WRONG, attacker_ip(i))).status_code == 401
    assert await failure_row(issuer.engine, ALICE) is None
    assert (await attempt(issuer, ALICE, PASSWORD, CLIENT_IP)).status_code == 200


# ---------------------------------------------------------------- per-IP token bucket


@pytest.fixture
def monotonic() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
async def limited(settings: Settings, clock: FakeClock, monotonic: FakeMonotonic) -> AsyncIterator[IssuerHarness]:
    """5 requests per minute per IP; no account lock-out, so only the IP limit answers 429."""
    configured = with_settings(settings, rate_limit_per_ip=5)
    async with running_issuer_with_monotonic(configured, clock, monotonic) as harness:
        yield harness


async def _send(client: httpx.AsyncClient, endpoint: str, index: int) -> httpx.Response:
    if endpoint == "login":
        return await client.post("/auth/login", json={"email": ALICE, "password": WRONG})
    if endpoint == "register":
        return await client.post("/auth/register", json={"email": f"user{index}@example.com", "password": PASSWORD})
    return await client.post("/auth/refresh", json={"refresh_token": "A" * 43})


EXPECTED_OK = {"login": 401, "register": 201, "refresh": 401}


def _advance(harness: IssuerHarness, monotonic: FakeMonotonic, seconds: float) -> None:
    """Login and register buckets live in the database and follow the app clock; refresh's follow the
    process's monotonic clock. Move both."""
    monotonic.advance(seconds)
    harness.clock.advance(seconds)


@pytest.mark.parametrize("endpoint", ["login", "register", "refresh"])
async def test_ip_limit_on_each_endpoint(limited: IssuerHarness, monotonic: FakeMonotonic, endpoint: str) -> None:
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
        _advance(limited, monotonic, 11)
        # 1 s left (the limiter may round a float hair up to 2; it never announces less than the true wait).
        assert assert_throttled(await _send(client, endpoint, 6)) in (1, 2)
        _advance(limited, monotonic, 1)
        assert (await _send(client, endpoint, 7)).status_code == EXPECTED_OK[endpoint]
        assert_throttled(await _send(client, endpoint, 8))
        # A full minute refills the whole burst, no more.
        _advance(limited, monotonic, 3600)
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


async def test_ip_limit_zero_disables_it(settings: Settings, clock: FakeClock, monotonic: FakeMonotonic) -> None:
    async with running_issuer_with_monotonic(settings, clock, monotonic) as harness, harness.client() as client:
        assert harness.services.settings.rate_limit_per_ip == 0
        for i in range(40):
            assert (await _send(client, "login", i)).status_code == 401
            assert (await _send(client, "refresh", i)).status_code == 401
        assert sample(harness.services, "issuer_throttled_requests_total", {"route": "login", "reason": "ip"}) == 0


def test_ip_rate_limiter_unit() -> None:
    clock = FakeMonotonic()
    limiter = IpRateLimiter(15, clock)  # 15 per minute: one token every 4 s (exact in binary floating point)
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
    disabled = IpRateLimiter(0, clock)
    assert not disabled.enabled
    assert all(disabled.acquire("a") == 0.0 for _ in range(100))


def test_ip_rate_limiter_small_rates_round_up() -> None:
    clock = FakeMonotonic()
    limiter = IpRateLimiter(1, clock)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == 60
    clock.advance(59.5)
    assert limiter.acquire("a") == 1  # never 0 while refusing
    clock.advance(0.5)
    assert limiter.acquire("a") == 0.0


def test_ip_rate_limiter_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle, "MAX_TRACKED_ADDRESSES", 3)
    clock = FakeMonotonic()
    limiter = IpRateLimiter(1, clock)
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
async def behind_proxy(settings: Settings, clock: FakeClock, monotonic: FakeMonotonic) -> AsyncIterator[IssuerHarness]:
    configured = with_settings(settings, rate_limit_per_ip=5, trusted_proxies=("10.0.0.0/8", "127.0.0.1"))
    async with running_issuer_with_monotonic(configured, clock, monotonic) as harness:
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


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    """One subscriber holds a whole /64: per-address buckets would hand an attacker endless fresh ones."""
    now = [0.0]
    limiter = IpRateLimiter(2, lambda: now[0])
    assert limiter.acquire("2001:db8:1:2::1") == 0
    assert limiter.acquire("2001:db8:1:2:ffff::9") == 0
    assert limiter.acquire("2001:db8:1:2::abcd") > 0
    assert limiter.acquire("2001:db8:1:3::1") == 0  # the neighbouring /64 is someone else
    assert limiter.acquire("::ffff:192.0.2.1") == 0  # IPv4-mapped is the IPv4 address
    assert limiter.acquire("192.0.2.1") == 0
    assert limiter.acquire("192.0.2.1") > 0
