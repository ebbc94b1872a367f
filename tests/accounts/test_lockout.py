"""Per-account login back-off (issuer.accounts.lockout), attacked through the HTTP API.

An attempt is counted before its password is checked, in the statement that checks the lock, so parallel
bursts from many addresses and replicas get no more guesses than the threshold; unknown emails are treated
exactly like registered ones; password guesses through account deletion count with the logins. The per-IP
limit is off here (see tests/http/test_throttle.py), so only the account lock-out answers 429; it runs on
the FakeClock: nothing sleeps.
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
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, assert_throttled, bearer, delete_account, login, register
from tests.support.issuer import CLIENT_IP, IssuerHarness, running_issuer, with_settings
from tests.support.operations import failure_row, sample

THRESHOLD = 5
ALICE = "alice@example.com"
NOBODY = "nobody@example.com"
WRONG = "not the right password"


@pytest.fixture
async def locking(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    """Lock-out on (threshold 5), IP limit off so that only the account lock-out is under test."""
    configured = with_settings(settings, login_lockout_threshold=THRESHOLD)
    async with running_issuer(configured, clock) as harness:
        yield harness


def attacker_ip(index: int) -> str:
    """A different documentation address per attempt (the attack comes from many addresses)."""
    return f"198.51.{100 + index // 250}.{1 + index % 250}"


async def attempt(harness: IssuerHarness, email: str, password: str, ip: str) -> httpx.Response:
    async with harness.client(ip=ip) as client:
        return await client.post("/auth/login", json={"email": email, "password": password, "token_transport": "body"})


def password_checks(harness: IssuerHarness, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every argon2 verification the app runs from now on, as (stored hash, password), in order."""
    checked: list[tuple[str, str]] = []
    passwords = harness.services.passwords
    original_verify = passwords._verify

    def counting_verify(stored_hash: str, password: str) -> bool:
        checked.append((stored_hash, password))
        return original_verify(stored_hash, password)

    monkeypatch.setattr(passwords, "_verify", counting_verify)
    return checked


def shape(response: httpx.Response) -> tuple[int, Any, str | None]:
    """What an attacker sees: status, body, Retry-After."""
    return response.status_code, response.json(), response.headers.get("retry-after")


async def test_brute_force_from_many_addresses_is_locked_out(locking: IssuerHarness, clock: FakeClock) -> None:
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
        clock.advance(wait - 1)
        assert assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(98))) == 1
        clock.advance(1)
    else:
        clock.advance(wait)

    ok = await attempt(locking, ALICE, PASSWORD, attacker_ip(97))
    assert ok.status_code == 200, ok.text
    assert ok.json()["refresh_token"]
    assert await failure_row(locking.engine, ALICE) is None, "a successful login must reset the count"

    # The count started over: THRESHOLD more failures before the next lock, not one.
    again = [await attempt(locking, ALICE, WRONG, attacker_ip(50 + i)) for i in range(THRESHOLD + 1)]
    assert [r.status_code for r in again] == [401] * THRESHOLD + [429]


async def test_every_attempt_is_counted_before_its_password_is_checked(
    locking: IssuerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the moment argon2 runs, the attempt is already in the table (as a failure): at login, for an unknown
    email, at account deletion, and for the right password too; only a success clears it afterwards."""
    async with locking.client() as client:
        await register(client)
        access = (await login(client))["access_token"]
    target = {"email": ALICE}
    counts_at_check: list[int | None] = []
    passwords = locking.services.passwords
    real_verify = passwords.verify

    async def verify(stored_hash: str | None, password: str) -> bool:
        row = await failure_row(locking.engine, target["email"])
        counts_at_check.append(None if row is None else row[0])
        return await real_verify(stored_hash, password)

    monkeypatch.setattr(passwords, "verify", verify)
    async with locking.client() as client:
        assert_error(await attempt(locking, ALICE, WRONG, attacker_ip(1)), 401, "invalid_credentials")
        target["email"] = NOBODY
        assert_error(await attempt(locking, NOBODY, WRONG, attacker_ip(2)), 401, "invalid_credentials")
        target["email"] = ALICE
        assert_error(await delete_account(client, access, WRONG), 403, "invalid_credentials")
        assert (await attempt(locking, ALICE, PASSWORD, attacker_ip(3))).status_code == 200
        assert await failure_row(locking.engine, ALICE) is None
        assert (await delete_account(client, access, PASSWORD)).status_code == 204
    assert counts_at_check == [1, 1, 2, 3, 1]
    assert await failure_row(locking.engine, ALICE) is None
    nobody = await failure_row(locking.engine, NOBODY)
    assert nobody is not None
    assert nobody[0] == 1


async def test_account_deletion_guesses_count_with_the_logins(locking: IssuerHarness, clock: FakeClock) -> None:
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

        clock.advance(wait)
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
    locking: IssuerHarness, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """Side by side: a registered email and an unregistered one, attacked identically, look identical."""
    async with locking.client() as client:
        await register(client)
    hashes_checked = password_checks(locking, monkeypatch)
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
    clock.advance(1)
    for i in range(12, 16):
        await round_(i)
    clock.advance(2)
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


async def test_back_off_doubles_and_is_capped(locking: IssuerHarness, clock: FakeClock) -> None:
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
        clock.advance(wait)
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(200 + i))).status_code == 401
    assert waits[0] == 1
    capped_from = waits.index(cap)
    for previous, current in itertools.pairwise(waits[: capped_from + 1]):
        assert current == min(cap, 2 * previous), waits
    assert waits[capped_from:] == [cap] * (len(waits) - capped_from), waits
    assert len(waits) - capped_from >= 3, "never stayed at the cap"
    # Even at the cap, the right password is refused while locked.
    assert assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(250))) == cap


async def test_partial_wait_counts_down(locking: IssuerHarness, clock: FakeClock) -> None:
    async with locking.client() as client:
        await register(client)
    for i in range(THRESHOLD):
        await attempt(locking, ALICE, WRONG, attacker_ip(i))
    clock.advance(1)
    await attempt(locking, ALICE, WRONG, attacker_ip(10))  # lock 2 s
    clock.advance(1)
    await attempt(locking, ALICE, WRONG, attacker_ip(11))  # still locked: refused, not counted
    clock.advance(1)
    assert (await attempt(locking, ALICE, WRONG, attacker_ip(12))).status_code == 401  # lock 4 s
    clock.advance(3)
    assert assert_throttled(await attempt(locking, ALICE, PASSWORD, attacker_ip(13))) == 1
    clock.advance(1)
    assert (await attempt(locking, ALICE, PASSWORD, attacker_ip(14))).status_code == 200


async def test_failures_older_than_the_window_are_forgotten(locking: IssuerHarness, clock: FakeClock) -> None:
    async with locking.client() as client:
        await register(client)
    window = locking.services.lockout.policy.window.total_seconds()
    for i in range(THRESHOLD - 1):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(i))).status_code == 401
    clock.advance(window + 1)
    for i in range(THRESHOLD - 1):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(10 + i))).status_code == 401
    row = await failure_row(locking.engine, ALICE)
    assert row is not None
    assert row[0] == THRESHOLD - 1
    assert (await attempt(locking, ALICE, PASSWORD, attacker_ip(20))).status_code == 200


async def test_failures_inside_the_window_accumulate(locking: IssuerHarness, clock: FakeClock) -> None:
    """Spreading guesses out (but within the window) does not dodge the count."""
    async with locking.client() as client:
        await register(client)
    window = locking.services.lockout.policy.window.total_seconds()
    step = window / (THRESHOLD + 1)
    for i in range(THRESHOLD):
        assert (await attempt(locking, ALICE, WRONG, attacker_ip(i))).status_code == 401
        clock.advance(step)
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
    locking: IssuerHarness, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """50 guesses at once from 50 addresses (a botnet): only THRESHOLD passwords are ever checked.

    If the lock were checked and the failure counted in separate steps, every guess of the burst would pass
    the check before the first failure was counted, and the right password anywhere in it would log in.
    """
    async with locking.client() as client:
        await register(client)
    checked = password_checks(locking, monkeypatch)
    for email in (ALICE, NOBODY):
        checked.clear()
        responses = await asyncio.gather(
            *(attempt(locking, email, f"guess number {i}", attacker_ip(i)) for i in range(50))
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(401) == THRESHOLD, statuses
        assert statuses.count(429) == 50 - THRESHOLD, statuses
        assert len(checked) == THRESHOLD
        assert len({password for _, password in checked}) == THRESHOLD
        row = await failure_row(locking.engine, email)
        assert row is not None
        failures, locked_until = row
        assert failures == THRESHOLD
        expected = locking.services.lockout.policy.lock_for(failures)
        assert expected is not None
        assert locked_until == clock() + expected
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
