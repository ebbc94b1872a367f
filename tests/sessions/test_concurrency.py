"""Concurrent refreshes with one token, over HTTP and at the service, racing for real in PostgreSQL (section 4).

The app runs on its own asyncpg pool; ``asyncio.gather`` of 50 ``client.post`` calls interleaves the
requests at every await, so the conditional UPDATE that consumes the token is contended in the database.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from issuer.errors import InvalidGrant, RefreshTokenReused
from issuer.sessions.families import Rotation
from issuer.storage import sessions as session_store
from tests.sessions.conftest import GRACE, MakeIssuer, db_error_count, reuse_count
from tests.support.families import (
    assert_single_chain,
    family_of,
    family_row,
    live_tokens,
    rotate_ok,
    start_session,
    token_row,
)
from tests.support.http import assert_error, login, refresh_body, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims

RACERS = 50


@pytest.fixture
async def strict_issuer(make_issuer: MakeIssuer) -> AsyncIterator[IssuerHarness]:
    """REFRESH_REUSE_GRACE=0: every repeat is theft."""
    async with make_issuer(refresh_reuse_grace=0) as harness:
        yield harness


class Contention:
    """Wraps ``issuer.storage.sessions.rotate`` to record how many consuming statements were in flight at once.

    A race that the test harness accidentally serialized would prove nothing, so every race asserts that
    several requests were inside the conditional UPDATE together (i.e. contending in PostgreSQL).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.in_flight = 0
        self.peak = 0
        original = session_store.rotate

        async def rotate(*args: object, **kwargs: object) -> object:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                return await original(*args, **kwargs)  # type: ignore[arg-type]
            finally:
                self.in_flight -= 1

        monkeypatch.setattr(session_store, "rotate", rotate)


@pytest.fixture
def contention(monkeypatch: pytest.MonkeyPatch) -> Contention:
    return Contention(monkeypatch)


async def race(client: httpx.AsyncClient, token: str, contention: Contention, n: int = RACERS) -> list[httpx.Response]:
    contention.peak = 0
    started = time.perf_counter()
    responses = await asyncio.gather(*(refresh_body(client, token) for _ in range(n)))
    elapsed = time.perf_counter() - started
    # Informative only (run with -s to see it); nothing is asserted on wall-clock time.
    print(
        f"\n{n} concurrent refreshes: {elapsed * 1000:.0f} ms total, {elapsed * 1000 / n:.1f} ms per request, "
        f"{contention.peak} in the consuming UPDATE at once"
    )
    assert contention.peak > 1, "the requests did not overlap in the database: not a race"
    return list(responses)


def outcome(responses: list[httpx.Response]) -> Counter[tuple[int, str]]:
    return Counter((r.status_code, r.json().get("error", "")) for r in responses)


@pytest.mark.parametrize("round_", range(3))
async def test_strict_race_has_exactly_one_winner_then_revokes(
    strict_issuer: IssuerHarness, contention: Contention, round_: int
) -> None:
    engine = strict_issuer.engine
    clock = strict_issuer.clock
    async with strict_issuer.client() as client:
        await register(client, f"racer{round_}@example.com")
        # Previous logins of the same user are other families that the race must not touch.
        bystander = (await login(client, f"racer{round_}@example.com"))["refresh_token"]
        token = (await login(client, f"racer{round_}@example.com"))["refresh_token"]
        family_id = await family_of(engine, token)

        responses = await race(client, token, contention)

        counts = outcome(responses)
        assert counts[(200, "")] == 1, counts
        assert counts[(401, "invalid_grant")] == RACERS - 1, counts
        assert sum(counts.values()) == RACERS
        for response in responses:
            if response.status_code == 401:
                assert_error(response, 401, "invalid_grant")
        winner = next(r for r in responses if r.status_code == 200).json()
        successor = winner["refresh_token"]
        assert successor != token
        assert jwt_claims(winner["access_token"])["sid"] == family_id

        # The losers presented a consumed token: theft, so the whole family is revoked...
        family = await family_row(engine, family_id)
        assert family.revoked_at is not None
        assert family.revoked_reason == "reuse"
        successor_row = await token_row(engine, successor)
        assert successor_row is not None
        assert successor_row.family_id == family_id
        # ...and the winner's successor is dead with it.
        assert_error(await refresh_body(client, successor), 401, "invalid_grant")
        assert_error(await refresh_body(client, token), 401, "invalid_grant")

        # Another family of the same user is untouched and still rotates.
        assert (await family_row(engine, await family_of(engine, bystander))).revoked_at is None
        assert (await refresh_body(client, bystander)).status_code == 200
        await assert_single_chain(engine, clock())
        assert db_error_count(strict_issuer) == 0


async def test_grace_race_returns_one_successor_to_everyone(issuer: IssuerHarness, contention: Contention) -> None:
    assert issuer.services.settings.refresh_reuse_grace == GRACE
    engine, clock = issuer.engine, issuer.clock
    async with issuer.client() as client:
        token = (await start_session(client))["refresh_token"]
        family_id = await family_of(engine, token)

        responses = await race(client, token, contention)

        counts = outcome(responses)
        assert counts == Counter({(200, ""): RACERS}), counts
        bodies = [r.json() for r in responses]
        successors = {b["refresh_token"] for b in bodies}
        assert len(successors) == 1, f"{len(successors)} different successors were handed out"
        (successor,) = successors
        assert successor != token
        # Each caller still gets its own access token, all for this family.
        access_tokens = [b["access_token"] for b in bodies]
        assert len({jwt_claims(t)["jti"] for t in access_tokens}) == RACERS
        assert {jwt_claims(t)["sid"] for t in access_tokens} == {family_id}

        assert await live_tokens(engine, family_id, clock()) == 1
        assert (await family_row(engine, family_id)).revoked_at is None
        original = await token_row(engine, token)
        assert original is not None
        assert original.consumed_at is not None
        await assert_single_chain(engine, clock())

        # The successor is used: the chain moves on.
        newest = await refresh_body(client, successor)
        assert newest.status_code == 200, newest.text
        newest_token = newest.json()["refresh_token"]
        assert newest_token not in {token, successor}
        assert await live_tokens(engine, family_id, clock()) == 1

        # Now the original is replayed (still inside the grace window, but its successor is spent): theft.
        clock.advance(1)
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        family = await family_row(engine, family_id)
        assert family.revoked_at is not None
        assert family.revoked_reason == "reuse"
        assert_error(await refresh_body(client, newest_token), 401, "invalid_grant")
        assert_error(await refresh_body(client, successor), 401, "invalid_grant")
        await assert_single_chain(engine, clock())
        assert reuse_count(issuer) == 1


async def test_grace_race_on_the_successor_after_a_replay_race(issuer: IssuerHarness, contention: Contention) -> None:
    """Two consecutive races: the replayed successor is itself raced; still one chain, one live token."""
    engine, clock = issuer.engine, issuer.clock
    async with issuer.client() as client:
        token = (await start_session(client))["refresh_token"]
        family_id = await family_of(engine, token)
        first = {r.json()["refresh_token"] for r in await race(client, token, contention)}
        assert len(first) == 1
        clock.advance(2)
        second_responses = await race(client, first.pop(), contention)
        assert {r.status_code for r in second_responses} == {200}
        second = {r.json()["refresh_token"] for r in second_responses}
        assert len(second) == 1
        assert await live_tokens(engine, family_id, clock()) == 1
        await assert_single_chain(engine, clock())
        # Both generations together: the first token replayed while the second race's successor is live.
        assert_error(await refresh_body(client, token), 401, "invalid_grant")
        assert (await family_row(engine, family_id)).revoked_reason == "reuse"
        assert_error(await refresh_body(client, second.pop()), 401, "invalid_grant")


async def test_strict_race_across_many_families_at_once(strict_issuer: IssuerHarness, contention: Contention) -> None:
    """Ten families each raced by five requests, all interleaved: each family has exactly one winner."""
    engine = strict_issuer.engine
    async with strict_issuer.client() as client:
        await register(client)
        tokens = [(await login(client))["refresh_token"] for _ in range(10)]
        requests = [refresh_body(client, token) for token in tokens for _ in range(5)]
        responses = await asyncio.gather(*requests)
        assert contention.peak > 1
        for index, token in enumerate(tokens):
            mine = responses[index * 5 : index * 5 + 5]
            assert sorted(r.status_code for r in mine) == [200, 401, 401, 401, 401], token
            family = await family_row(engine, await family_of(engine, token))
            assert family.revoked_reason == "reuse"
        await assert_single_chain(engine, strict_issuer.clock())
        assert db_error_count(strict_issuer) == 0


async def test_replays_racing_the_next_rotation_keep_one_chain(issuer: IssuerHarness, contention: Contention) -> None:
    """Victim rotates the current token while copies of the previous one are replayed, all at once.

    The outcome order is up to the database, but the family must stay one chain: only the current token's
    successor or its own successor is ever handed out, and unless the family was revoked, it has exactly
    one live token.
    """
    engine, clock = issuer.engine, issuer.clock
    families_service = issuer.services.families
    async with issuer.client() as client:
        old = (await start_session(client))["refresh_token"]
        family_id = await family_of(engine, old)
        current = (await rotate_ok(client, old))["refresh_token"]
        newest = families_service.successor_of(current)
        clock.advance(1)

        requests = [refresh_body(client, old if i % 2 else current) for i in range(RACERS)]
        responses = await asyncio.gather(*requests)

        assert contention.peak > 1
        assert {r.status_code for r in responses} <= {200, 401}
        handed_out = {r.json()["refresh_token"] for r in responses if r.status_code == 200}
        assert handed_out <= {current, newest}, "a token outside the chain was issued"
        assert newest in handed_out  # the first rotation of the current token cannot lose
        family = await family_row(engine, family_id)
        if family.revoked_at is None:
            assert await live_tokens(engine, family_id, clock()) == 1
            assert all(r.status_code == 200 for r in responses)
        else:
            assert family.revoked_reason == "reuse"
            assert_error(await refresh_body(client, newest), 401, "invalid_grant")
        await assert_single_chain(engine, clock())


@pytest.mark.parametrize("grace", [0, GRACE])
async def test_concurrent_rotations_at_service_level(
    make_issuer: MakeIssuer, contention: Contention, grace: int
) -> None:
    """The same race without HTTP in between: twelve ``RefreshFamilies.rotate`` calls with one token."""
    async with make_issuer(refresh_reuse_grace=grace) as harness, harness.client() as client:
        engine, clock = harness.engine, harness.clock
        token = (await start_session(client))["refresh_token"]
        family_id = await family_of(engine, token)
        service = harness.services.families

        results = await asyncio.gather(*(service.rotate(token, now=clock()) for _ in range(12)), return_exceptions=True)
        assert contention.peak > 1, "the rotations did not overlap in the database: not a race"

        wins = [r for r in results if isinstance(r, Rotation)]
        losses = [r for r in results if not isinstance(r, Rotation)]
        assert all(isinstance(r, InvalidGrant) for r in losses), losses
        if grace == 0:
            assert len(wins) == 1
            # The first loser detects the reuse; later ones may already find the family revoked.
            assert any(isinstance(r, RefreshTokenReused) for r in losses)
            assert (await family_row(engine, family_id)).revoked_reason == "reuse"
        else:
            assert len(wins) == 12
            assert len({w.refresh.token for w in wins}) == 1
            assert sum(not w.replayed for w in wins) == 1
            assert (await family_row(engine, family_id)).revoked_at is None
            assert await live_tokens(engine, family_id, clock()) == 1
        await assert_single_chain(engine, clock())
