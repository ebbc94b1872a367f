"""UserLookup: concurrent bearer calls share one user read, and batching never serves a stale row.

The unit tests drive :class:`~issuer.access.user_lookup.UserLookup` with a fake fetch that reads its "database" (a
dict) when the statement starts, as PostgreSQL does, and can be held in flight on an ``asyncio.Event``. The
integration tests attack the property that matters through the app: once a logout-all has answered 204,
no /auth/me that starts afterwards is answered from a read taken before it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from issuer.access.bearer import BearerAuth
from issuer.access.user_lookup import Fetch, UserLookup
from issuer.settings import Settings
from issuer.storage import users
from issuer.storage.database import Database
from issuer.storage.users import User
from tests.support import http
from tests.support.clock import FakeClock
from tests.support.http import assert_invalid_token, bearer, login, register
from tests.support.issuer import IssuerHarness, running_issuer
from tests.support.jwt import jwt_claims

GUARD = 10  # seconds; only so that a broken lookup fails instead of hanging, never a timing assertion


def user(user_id: str, version: int = 0) -> User:
    return User(user_id, f"{user_id}@example.com", "hash", "user", version)


class FakeFetch:
    """A fetch whose statement reads ``rows`` when it starts; call ``n`` can be held by ``hold(n)``."""

    def __init__(self, *ids: str) -> None:
        self.rows = {user_id: user(user_id) for user_id in ids}
        self.calls: list[list[str]] = []
        self.log: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._holds: dict[int, asyncio.Event] = {}
        self._failures: dict[int, Exception] = {}
        self._started: dict[int, asyncio.Event] = {}

    def hold(self, call: int) -> asyncio.Event:
        """Keep call number ``call`` (0-based) in flight, after its read, until the event is set."""
        return self._holds.setdefault(call, asyncio.Event())

    def fail(self, call: int, exc: Exception) -> None:
        self._failures[call] = exc

    async def started(self, call: int) -> None:
        await asyncio.wait_for(self._started.setdefault(call, asyncio.Event()).wait(), GUARD)

    async def __call__(self, ids: list[str]) -> dict[str, User]:
        call = len(self.calls)
        self.calls.append(list(ids))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.log.append(("start", call))
        try:
            snapshot = {user_id: self.rows[user_id] for user_id in ids if user_id in self.rows}
            self._started.setdefault(call, asyncio.Event()).set()
            if call in self._holds:
                await self._holds[call].wait()
            if call in self._failures:
                raise self._failures[call]
            return snapshot
        finally:
            self.in_flight -= 1
            self.log.append(("end", call))


def spawn(lookup: UserLookup, *ids: str) -> list[asyncio.Task[User | None]]:
    return [asyncio.create_task(lookup.get(user_id)) for user_id in ids]


async def settle() -> None:
    """Let every runnable task run until it blocks (a few passes of the event loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def gather(tasks: list[asyncio.Task[User | None]]) -> list[User | None]:
    return await asyncio.wait_for(asyncio.gather(*tasks), GUARD)


async def me(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await asyncio.wait_for(http.me(client, token), GUARD)


# ---------------------------------------------------------------- batching


async def test_concurrent_gets_make_one_fetch_with_each_id_once() -> None:
    ids = [f"u{i}" for i in range(10)]
    fetch = FakeFetch(*ids)
    lookup = UserLookup(fetch)
    asked = [*ids, *reversed(ids), *ids, "nobody", "nobody"]

    results = await gather(spawn(lookup, *asked))

    assert len(fetch.calls) == 1, fetch.calls
    (sent,) = fetch.calls
    assert sorted(sent) == sorted([*ids, "nobody"]), "each distinct id exactly once"
    for user_id, result in zip(asked, results, strict=True):
        if user_id == "nobody":
            assert result is None
        else:
            assert result is not None
            assert result.id == user_id
    # Duplicates are answered by the one row read for them.
    first = {user_id: result for user_id, result in zip(asked, results, strict=True)}
    for user_id, result in zip(asked, results, strict=True):
        assert result is first[user_id]


async def test_a_lone_get_is_sent_at_once_and_nothing_is_cached_between_batches() -> None:
    fetch = FakeFetch("a")
    lookup = UserLookup(fetch)
    assert (await asyncio.wait_for(lookup.get("a"), GUARD)) == user("a")
    fetch.rows["a"] = user("a", version=1)
    again = await asyncio.wait_for(lookup.get("a"), GUARD)
    assert again == user("a", version=1)
    assert fetch.calls == [["a"], ["a"]]


# ---------------------------------------------------------------- freshness


async def test_a_get_issued_during_a_batch_is_answered_by_the_next_fetch() -> None:
    fetch = FakeFetch("a", "b")
    lookup = UserLookup(fetch)
    release = fetch.hold(0)
    early = spawn(lookup, "a", "a")
    await fetch.started(0)  # the first statement has read version 0 and is in flight

    fetch.rows["a"] = user("a", version=1)  # e.g. logout-all committed meanwhile
    late = spawn(lookup, "a", "b", "a")
    await settle()
    assert len(fetch.calls) == 1, "a second statement went out while the first was in flight"
    assert not any(task.done() for task in [*early, *late])

    release.set()
    early_results = await gather(early)
    late_results = await gather(late)
    assert early_results == [user("a"), user("a")]
    # Asked after the change: never answered by the read that started before it.
    assert late_results == [user("a", version=1), user("b"), user("a", version=1)]
    assert len(fetch.calls) == 2
    assert sorted(fetch.calls[1]) == ["a", "b"]
    # The next batch starts only after the first returned: one statement in flight at a time.
    assert fetch.log == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert fetch.most_in_flight == 1


async def test_one_statement_in_flight_under_a_continuous_stream() -> None:
    ids = [f"u{i}" for i in range(7)]
    fetch = FakeFetch(*ids)
    lookup = UserLookup(fetch)
    tasks: list[asyncio.Task[User | None]] = []
    for round_ in range(30):
        tasks += spawn(lookup, ids[round_ % 7], ids[(round_ * 3) % 7])
        await asyncio.sleep(0)
    results = await gather(tasks)
    assert all(result is not None for result in results)
    assert fetch.most_in_flight == 1
    assert all(len(call) == len(set(call)) for call in fetch.calls), fetch.calls
    assert len(fetch.calls) < len(tasks), "concurrent gets were not batched at all"


# ---------------------------------------------------------------- errors and cancellation


async def test_a_failed_fetch_fails_every_waiter_of_its_batch_and_the_next_batch_works() -> None:
    fetch = FakeFetch("a", "b")
    lookup = UserLookup(fetch)
    boom = RuntimeError("database went away")
    fetch.fail(0, boom)
    release = fetch.hold(0)
    failing = spawn(lookup, "a", "b", "a", "zzz")
    await fetch.started(0)
    later = spawn(lookup, "a", "b")  # arrives while the failing statement is in flight
    release.set()

    outcomes = await asyncio.wait_for(asyncio.gather(*failing, return_exceptions=True), GUARD)
    assert all(outcome is boom for outcome in outcomes), outcomes
    assert await gather(later) == [user("a"), user("b")]
    assert len(fetch.calls) == 2
    # And after going idle, the lookup still works.
    assert await asyncio.wait_for(lookup.get("b"), GUARD) == user("b")
    assert len(fetch.calls) == 3


async def test_a_cancelled_waiter_does_not_break_the_others() -> None:
    fetch = FakeFetch("a", "b")
    lookup = UserLookup(fetch)
    release_first = fetch.hold(0)
    release_second = fetch.hold(1)
    first = spawn(lookup, "a", "a", "b")
    await fetch.started(0)
    second = spawn(lookup, "b", "a", "b")  # queued behind the batch in flight
    await settle()

    first[0].cancel()  # a client went away while its statement was in flight
    second[0].cancel()  # and one while it was still waiting for the next batch
    await settle()
    release_first.set()
    await fetch.started(1)
    second[2].cancel()  # and one whose statement is in flight
    release_second.set()

    for task in (first[0], second[0], second[2]):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, GUARD)
    assert await gather([first[1], first[2], second[1]]) == [user("a"), user("b"), user("a")]
    # Nothing is left behind: the next get is answered by a new statement.
    assert await asyncio.wait_for(lookup.get("a"), GUARD) == user("a")
    assert len(fetch.calls) == 3


async def test_when_every_waiter_is_cancelled_the_lookup_recovers() -> None:
    fetch = FakeFetch("a")
    lookup = UserLookup(fetch)
    release = fetch.hold(0)
    tasks = spawn(lookup, "a", "a")
    await fetch.started(0)
    for task in tasks:
        task.cancel()
    await settle()
    release.set()
    await settle()
    for task in tasks:
        assert task.cancelled()
    assert await asyncio.wait_for(lookup.get("a"), GUARD) == user("a")


# ---------------------------------------------------------------- max_batch


async def test_max_batch_splits_a_big_batch_oldest_first() -> None:
    ids = [f"u{i}" for i in range(8)]
    fetch = FakeFetch(*ids)
    lookup = UserLookup(fetch, max_batch=3)
    asked = [*ids, *ids]  # duplicates do not count against the limit

    results = await gather(spawn(lookup, *asked))

    assert [len(call) for call in fetch.calls] == [3, 3, 2], fetch.calls
    assert fetch.calls == [ids[0:3], ids[3:6], ids[6:8]]
    assert [result.id if result else None for result in results] == asked
    assert fetch.most_in_flight == 1


async def test_max_batch_parts_are_all_sent_after_they_were_asked() -> None:
    ids = [f"u{i}" for i in range(5)]
    fetch = FakeFetch(*ids)
    lookup = UserLookup(fetch, max_batch=2)
    release = fetch.hold(0)
    first = spawn(lookup, "u0")
    await fetch.started(0)
    for user_id in ids:
        fetch.rows[user_id] = user(user_id, version=1)
    rest = spawn(lookup, *ids)
    release.set()
    assert await gather(first) == [user("u0")]
    assert await gather(rest) == [user(user_id, version=1) for user_id in ids]
    assert [len(call) for call in fetch.calls] == [1, 2, 2, 1]


# ---------------------------------------------------------------- through the app, on PostgreSQL


async def test_the_issuers_bearer_calls_share_users_by_ids_statements(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app as built (no lookup swapped in): its Bearer reads are ``users.by_ids`` statements, and calls that
    arrive while one is in flight share the next one, which carries their user's id once."""
    await register(client)
    token = (await login(client))["access_token"]
    user_id = jwt_claims(token)["sub"]
    statements: list[list[str]] = []
    first_read, release, all_asked = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_by_ids, real_get = users.by_ids, UserLookup.get
    calls = 21
    asked = 0

    async def held_by_ids(db: Any, ids: list[str]) -> dict[str, User]:
        statements.append(list(ids))
        rows = await real_by_ids(db, ids)
        if len(statements) == 1:
            first_read.set()
            await release.wait()
        return rows

    async def counting_get(lookup: UserLookup, wanted: str) -> User | None:
        nonlocal asked
        asked += 1
        if asked == calls:
            all_asked.set()
        return await real_get(lookup, wanted)

    monkeypatch.setattr(users, "by_ids", held_by_ids)
    monkeypatch.setattr(UserLookup, "get", counting_get)

    first = asyncio.create_task(me(client, token))
    await asyncio.wait_for(first_read.wait(), GUARD)
    rest = [asyncio.create_task(me(client, token)) for _ in range(calls - 1)]
    await asyncio.wait_for(all_asked.wait(), GUARD)
    assert statements == [[user_id]], "a second statement went out while the first was in flight"
    release.set()
    responses = await asyncio.wait_for(asyncio.gather(first, *rest), GUARD)
    assert [response.status_code for response in responses] == [200] * calls
    assert statements == [[user_id], [user_id]]


class CountingLookup(UserLookup):
    """Tells the test when a number of bearer calls have reached the lookup (their waiter is queued)."""

    def __init__(self, fetch: Fetch) -> None:
        super().__init__(fetch)
        self.asked = 0
        self._targets: list[tuple[int, asyncio.Event]] = []

    async def get(self, user_id: str) -> User | None:
        self.asked += 1
        for target, event in self._targets:
            if self.asked >= target:
                event.set()
        return await super().get(user_id)

    async def reached(self, count: int) -> None:
        event = asyncio.Event()
        if self.asked >= count:
            return
        self._targets.append((count, event))
        await asyncio.wait_for(event.wait(), GUARD)


class HeldStatements:
    """The real user statements (``users.by_ids``) of one app, each of which the test can hold in flight after
    its read."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._read: dict[int, asyncio.Event] = {}
        self._release: dict[int, asyncio.Event] = {}
        self.versions: list[dict[str, int]] = []  # what each statement read: user id -> tokenVersion
        self.lookup = CountingLookup(self.fetch)

    def hold(self, statement: int) -> None:
        """Hold statement number ``statement`` (1-based) after its read, until ``release(statement)``."""
        self._release[statement] = asyncio.Event()

    def release(self, statement: int) -> None:
        self._release[statement].set()

    async def has_read(self, statement: int) -> None:
        await asyncio.wait_for(self._read.setdefault(statement, asyncio.Event()).wait(), GUARD)

    async def fetch(self, ids: list[str]) -> dict[str, User]:
        rows = await users.by_ids(self._db, ids)
        self.versions.append({user_id: row.token_version for user_id, row in rows.items()})
        statement = len(self.versions)
        self._read.setdefault(statement, asyncio.Event()).set()
        if statement in self._release:
            await self._release[statement].wait()
        return rows

    def release_all(self) -> None:
        for event in self._release.values():
            event.set()


@contextlib.asynccontextmanager
async def held_statements(harness: IssuerHarness) -> AsyncIterator[HeldStatements]:
    """Swap the harness's bearer for one whose user statements go through a :class:`HeldStatements`."""
    svc = harness.services
    held = HeldStatements(svc.db)
    original = svc.bearer
    svc.bearer = BearerAuth(held.lookup, svc.keys, svc.settings, svc.clock, svc.metrics)
    try:
        yield held
    finally:
        held.release_all()
        svc.bearer = original


async def test_after_logout_all_returns_no_later_me_is_answered_by_an_older_read(
    settings: Settings, clock: FakeClock
) -> None:
    """Two replicas: the logout-all goes to B while A has a user statement in flight that read version 0."""
    async with (
        running_issuer(settings, clock) as a,
        running_issuer(settings, clock) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        await register(ca)
        token = (await login(ca))["access_token"]
        assert (await me(ca, token)).status_code == 200

        async with held_statements(a) as held:
            held.hold(1)
            before = [asyncio.create_task(me(ca, token)) for _ in range(20)]
            await held.has_read(1)
            await held.lookup.reached(len(before))

            logout = await asyncio.wait_for(cb.post("/auth/logout-all", headers=bearer(token)), GUARD)
            assert logout.status_code == 204, logout.text

            after = [asyncio.create_task(me(ca, token)) for _ in range(20)]
            await held.lookup.reached(len(before) + len(after))  # all queued while the old read is in flight
            assert not any(task.done() for task in after)
            held.release(1)
            early = await asyncio.wait_for(asyncio.gather(*before), GUARD)
            late = await asyncio.wait_for(asyncio.gather(*after), GUARD)

        # The held statement really did read the old version (those requests started before the logout).
        assert list(held.versions[0].values()) == [0]
        assert any(response.status_code == 200 for response in early)
        assert all(response.status_code in (200, 401) for response in early)
        for response in late:
            assert_invalid_token(response)
        assert_invalid_token(await me(ca, token))


async def test_on_one_replica_no_me_after_logout_all_is_answered_by_an_older_read(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One replica, /auth/me calls in flight on every side of a logout-all, in a fixed interleaving:

    statement 1 authenticates the logout-all; /auth/me calls queue behind it as statement 2, which reads
    version 0 before the logout's UPDATE commits and is still in flight when the logout has answered 204;
    /auth/me calls made after that must wait for a statement of their own.
    """
    await register(client)
    token = (await login(client))["access_token"]
    accounts = issuer.services.accounts
    real_logout_all = accounts.logout_all

    async with held_statements(issuer) as held:

        async def logout_all_after_statement_2(*args: Any, **kwargs: Any) -> Any:
            await held.has_read(2)
            return await real_logout_all(*args, **kwargs)

        monkeypatch.setattr(accounts, "logout_all", logout_all_after_statement_2)
        held.hold(1)
        held.hold(2)
        logout = asyncio.create_task(asyncio.wait_for(client.post("/auth/logout-all", headers=bearer(token)), GUARD))
        await held.has_read(1)
        during = [asyncio.create_task(me(client, token)) for _ in range(15)]
        await held.lookup.reached(1 + len(during))
        held.release(1)
        await held.has_read(2)  # statement 2 (the calls above) has read; now the logout commits
        response = await logout
        assert response.status_code == 204, response.text

        after = [asyncio.create_task(me(client, token)) for _ in range(15)]
        await held.lookup.reached(1 + len(during) + len(after))
        assert not any(task.done() for task in [*during, *after])
        held.release(2)
        in_flight = await asyncio.wait_for(asyncio.gather(*during), GUARD)
        late = await asyncio.wait_for(asyncio.gather(*after), GUARD)

    assert [list(read.values()) for read in held.versions[:2]] == [[0], [0]]
    assert all(response.status_code == 200 for response in in_flight)
    for response in late:
        assert_invalid_token(response)
    assert list(held.versions[2].values()) == [1]
