"""The hot paths cost a fixed number of PostgreSQL round trips, counted on the wire (issue 6).

The issuer talks to PostgreSQL through :class:`tests.support.faults.PostgresProxy`, which counts every exchange
that makes the server answer and the client wait (a ``Sync`` or a simple ``Query``), whatever library sends it:
a hidden BEGIN/COMMIT, a pool's reset or liveness ping, or a second statement all show up, and each failure
lists the statements of the round trips it counted. The pool holds one connection, so the statements prepared
by the warm-up requests serve all the counted ones; the periodic key reload is stopped (it has statements of
its own).

The budget: a refresh 1; a Bearer call's user read 1, shared by concurrent calls; a login 2 (lock-out on or
off) plus 1 for the shared per-IP bucket; a login or register that the bucket or the lock-out refuses, only
the statement that refused it (the lock and the bucket come back in that statement, with no second read).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from issuer.access.user_lookup import UserLookup
from issuer.keys import ring
from issuer.settings import Settings
from issuer.storage import users
from issuer.storage.database import PING
from issuer.storage.users import User
from tests.support.clock import FakeClock
from tests.support.faults import PostgresProxy, RoundTrip, postgres_proxy
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register, retry_after
from tests.support.issuer import IssuerHarness, running_issuer, with_settings

LOCKOUT = 5  # LOGIN_LOCKOUT_THRESHOLD where the lock-out is on
LOCKOUT_ON_AND_OFF = pytest.mark.parametrize("lockout", [LOCKOUT, 0], ids=["lockout_on", "lockout_off"])
WRONG = {"email": "alice@example.com", "password": "not the password"}

Counted = tuple[IssuerHarness, PostgresProxy]


@contextlib.asynccontextmanager
async def counting_issuer(settings: Settings, clock: FakeClock, **changes: Any) -> AsyncIterator[Counted]:
    """An issuer on ``settings`` with ``changes``, whose one pooled connection goes through a counting proxy."""
    async with postgres_proxy() as proxy:
        proxied = with_settings(
            settings,
            database_url=proxy.url(settings.database_url),
            database_listen_url=settings.database_url,  # LISTEN has its own connection, not counted here
            db_pool_size=1,
            **changes,
        )
        async with running_issuer(proxied, clock) as harness:
            await harness.services.keys.stop()  # the periodic key reload would add its own statements
            await harness.services.revoked_sessions.stop()  # and so would the reading of revocation events
            yield harness, proxy


@pytest.fixture
async def counted(settings: Settings, clock: FakeClock) -> AsyncIterator[Counted]:
    async with counting_issuer(settings, clock) as counting:
        yield counting


def assert_round_trips(proxy: PostgresProxy, mark: int, expected: int) -> list[RoundTrip]:
    """Exactly ``expected`` round trips since ``mark``, none of them a simple-protocol query (a BEGIN, a
    COMMIT, a reset: nothing on these paths needs one)."""
    trips = proxy.since(mark)
    listing = "\n".join(f"  {trip}" for trip in trips) or "  (none)"
    assert len(trips) == expected, f"{len(trips)} round trips, not {expected}:\n{listing}"
    assert not [trip for trip in trips if trip.simple], f"a simple-protocol query among:\n{listing}"
    return trips


async def warm_logins(client: httpx.AsyncClient) -> None:
    """Register alice and log in twice: the first use of each statement on the connection prepares it."""
    await register(client)
    for _ in range(2):
        await login(client)


# ---------------------------------------------------------------- refresh


async def test_refresh_is_one_round_trip_and_signs_without_parsing_keys(
    counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness, proxy = counted
    async with harness.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        for _ in range(2):  # the first use of the statement on the connection prepares it
            response = await refresh_body(client, token)
            assert response.status_code == 200, response.text
            token = response.json()["refresh_token"]

        parsed: list[object] = []
        original_import = RSAKey.import_key

        def counting_import(*args: object, **kwargs: object) -> object:
            parsed.append(args)
            return original_import(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(RSAKey, "import_key", counting_import)
        monkeypatch.setattr(ring, "decrypt_private_key", lambda *a: parsed.append(a))

        mark = proxy.mark()
        for _ in range(10):
            response = await refresh_body(client, token)
            assert response.status_code == 200, response.text
            token = response.json()["refresh_token"]
        assert_round_trips(proxy, mark, 10)
    assert parsed == [], "a private key was decrypted or parsed on the request path"


# ---------------------------------------------------------------- Bearer


async def test_me_is_one_round_trip(counted: Counted) -> None:
    harness, proxy = counted
    async with harness.client() as client:
        await register(client)
        access = (await login(client))["access_token"]
        assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200
        mark = proxy.mark()
        for _ in range(10):
            assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200
        assert_round_trips(proxy, mark, 10)


async def test_concurrent_bearer_calls_share_one_user_read(counted: Counted, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve Bearer calls of six users at once: the first read goes out alone, and one statement answers all
    the calls that arrived while it was in flight, whichever users they are for.

    The first read is held (before it is sent) until every call has asked for its user, so the batching is
    measured, not the scheduler's timing."""
    harness, proxy = counted
    emails = [f"user{i}@example.com" for i in range(6)]
    async with harness.client() as client:
        tokens = []
        for email in emails:
            await register(client, email=email)
            tokens.append((await login(client, email=email))["access_token"])
        assert (await client.get("/auth/me", headers=bearer(tokens[0]))).status_code == 200  # prepares the read

        held = asyncio.Event()
        sent: list[list[str]] = []
        original_by_ids = users.by_ids

        async def held_first(db: Any, user_ids: list[str]) -> dict[str, User]:
            sent.append(list(user_ids))
            if len(sent) == 1:
                await held.wait()
            return await original_by_ids(db, user_ids)

        asked: list[str] = []
        original_get = UserLookup.get

        async def counting_get(self: UserLookup, user_id: str) -> User | None:
            asked.append(user_id)
            return await original_get(self, user_id)

        monkeypatch.setattr(users, "by_ids", held_first)
        monkeypatch.setattr(UserLookup, "get", counting_get)

        mark = proxy.mark()
        calls = [token for token in tokens for _ in range(2)]
        first = asyncio.create_task(client.get("/auth/me", headers=bearer(calls[0])))
        await _until(lambda: len(sent) == 1, "the first read never started")
        rest = [asyncio.create_task(client.get("/auth/me", headers=bearer(token))) for token in calls[1:]]
        await _until(lambda: len(asked) == len(calls), "not every call asked for its user")
        held.set()
        responses = await asyncio.gather(first, *rest)

    assert [response.status_code for response in responses] == [200] * len(calls)
    assert [response.json()["email"] for response in responses] == [e for e in emails for _ in range(2)]
    # The first user's second call came after its read had left: it is in the second batch, with all the others.
    assert len(sent) == 2, sent
    assert sent[0] == [asked[0]]
    assert sorted(sent[1]) == sorted(set(asked))
    assert_round_trips(proxy, mark, 2)


async def _until(condition: Any, failure: str) -> None:
    for _ in range(1000):  # bounded: 10 s at most
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(failure)


# ---------------------------------------------------------------- login


@LOCKOUT_ON_AND_OFF
async def test_login_is_two_statements_without_a_transaction(
    settings: Settings, clock: FakeClock, lockout: int
) -> None:
    """With the lock-out on, count the attempt and read the account, then start the family and clear the count;
    with it off, read the account, then start the family. A round trip each; a failed login costs only the first
    (nothing is cleared), for a wrong password as for an unknown email."""
    async with counting_issuer(settings, clock, login_lockout_threshold=lockout) as (harness, proxy):
        assert harness.services.lockout.policy.enabled is bool(lockout)
        async with harness.client() as client:
            await warm_logins(client)
            mark = proxy.mark()
            for _ in range(5):
                await login(client)
            assert_round_trips(proxy, mark, 5 * 2)
            for failing in (WRONG, {"email": "nobody@example.com", "password": "whatever1"}):
                mark = proxy.mark()
                assert_error(await client.post("/auth/login", json=failing), 401, "invalid_credentials")
                assert_round_trips(proxy, mark, 1)


async def test_a_locked_email_is_refused_in_the_statement_that_counts(settings: Settings, clock: FakeClock) -> None:
    """The lock comes back from the attempt's own statement: a refused login costs that one round trip, with
    the right password or not, for a known email or not (no read of the lock before or after)."""
    async with (
        counting_issuer(settings, clock, login_lockout_threshold=LOCKOUT) as (harness, proxy),
        harness.client() as client,
    ):
        await register(client)
        for email in ("alice@example.com", "nobody@example.com"):
            for _ in range(LOCKOUT):
                failed = await client.post("/auth/login", json={**WRONG, "email": email})
                assert_error(failed, 401, "invalid_credentials")
            for password in (PASSWORD, "not the password"):
                mark = proxy.mark()
                refused = await client.post("/auth/login", json={"email": email, "password": password})
                assert_error(refused, 429, "too_many_requests")
                retry_after(refused)
                assert_round_trips(proxy, mark, 1)


# ---------------------------------------------------------------- the shared per-IP bucket


@LOCKOUT_ON_AND_OFF
async def test_the_shared_ip_limit_adds_one_statement_to_a_login(
    settings: Settings, clock: FakeClock, lockout: int
) -> None:
    """With RATE_LIMIT_PER_IP on, the login's bucket is one more statement, still without a transaction."""
    async with (
        counting_issuer(settings, clock, login_lockout_threshold=lockout, rate_limit_per_ip=1000) as (harness, proxy),
        harness.client() as client,
    ):
        await warm_logins(client)
        mark = proxy.mark()
        for _ in range(5):
            await login(client)
        assert_round_trips(proxy, mark, 5 * 3)


async def test_the_ip_bucket_alone_is_one_statement(settings: Settings, clock: FakeClock) -> None:
    """The bucket is one statement by itself: a login turned away after it (a bad body) costs that one, and a
    refusal by an empty bucket also costs only that one (the bucket's state, for Retry-After, comes back in
    it). The clock stands still, so the bucket does not refill."""
    limit = 4
    async with (
        counting_issuer(settings, clock, login_lockout_threshold=LOCKOUT, rate_limit_per_ip=limit) as (harness, proxy),
        harness.client() as client,
    ):
        await warm_logins(client)  # three tokens of four
        mark = proxy.mark()
        bad = await client.post("/auth/login", json={"email": 1, "password": PASSWORD})
        assert_error(bad, 400, "invalid_request")
        assert_round_trips(proxy, mark, 1)  # and the bucket is now empty
        for request in (
            client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD}),
            client.post("/auth/register", json={"email": "bob@example.com", "password": PASSWORD}),
        ):
            mark = proxy.mark()
            refused = await request
            assert_error(refused, 429, "too_many_requests")
            retry_after(refused)
            assert_round_trips(proxy, mark, 1)


# ---------------------------------------------------------------- the counter itself


async def test_the_counter_sees_transactions(counted: Counted) -> None:
    """Control: a statement in a transaction is counted as its three round trips, BEGIN and COMMIT as simple
    queries (so the budget above would catch a transaction on a hot path)."""
    harness, proxy = counted
    db = harness.services.db
    async with db.transaction() as transaction:  # prepares the statement
        await transaction.fetch(PING)
    mark = proxy.mark()
    async with db.transaction() as transaction:
        await transaction.fetch(PING)
    trips = proxy.since(mark)
    assert [(trip.simple, trip.statements) for trip in trips] == [
        (True, ("BEGIN;",)),
        (False, (PING.sql,)),
        (True, ("COMMIT;",)),
    ], trips
