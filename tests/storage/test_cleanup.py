"""Cleanup deletes exactly what ended more than ``retention`` ago, and nothing that can still be used.

Families are built on the FakeClock with the real services (login, rotations, logout), then the table
contents are checked row by row against two independent expectations: the named scenario of each
family, and the rule "ended (absolute, idle or revoked) before the cutoff".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.errors import InvalidGrant
from issuer.http.throttle import SharedRateLimiter
from issuer.settings import Settings
from issuer.storage.cleanup import cleanup
from issuer.storage.database import Database
from issuer.storage.schema import families, login_failures, rate_buckets, refresh_tokens
from issuer.storage.users import User
from tests.support.clock import FakeClock
from tests.support.families import assert_single_chain
from tests.support.families import sha256 as token_hash
from tests.support.http import PASSWORD
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.keys import Cli
from tests.support.operations import sample

REFRESH_TTL = 600
SESSION_MAX_AGE = 3000
RETENTION = timedelta(seconds=1000)
WINDOW = timedelta(minutes=15)


@pytest.fixture
async def harness(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    configured = with_settings(
        settings,
        access_token_ttl=60,
        refresh_token_ttl=REFRESH_TTL,
        session_max_age=SESSION_MAX_AGE,
        refresh_reuse_grace=0,
    )
    async with running_issuer(configured, clock) as running:
        yield running


@dataclass(eq=False)
class Chain:
    """One family as a client sees it: its id and the token the client holds now."""

    family_id: str
    token: str


class World:
    """Drives the real services on the fake clock, at offsets from the start."""

    def __init__(self, harness: IssuerHarness, user: User) -> None:
        assert isinstance(harness.clock, FakeClock)
        self.harness = harness
        self.clock: FakeClock = harness.clock
        self.user = user
        self.start = self.clock()

    def at(self, offset: int) -> datetime:
        target = self.start + timedelta(seconds=offset)
        assert target >= self.clock(), "time only moves forward"
        self.clock.now = target
        return target

    async def login(self, offset: int) -> Chain:
        issued = await self.harness.services.families.start(
            self.user, now=self.at(offset), user_agent="test", ip="192.0.2.1", clear_failures_of=None
        )
        return Chain(issued.family_id, issued.token)

    async def refresh(self, chain: Chain, offset: int) -> None:
        rotation = await self.harness.services.families.rotate(chain.token, now=self.at(offset))
        chain.token = rotation.refresh.token

    async def logout(self, chain: Chain, offset: int) -> None:
        assert await self.harness.services.families.revoke_by_token(chain.token, now=self.at(offset)) is not None


async def _rows(harness: IssuerHarness) -> tuple[dict[str, dict[str, datetime | None]], dict[bytes, str]]:
    async with harness.engine.connect() as conn:
        family_rows = (await conn.execute(select(families))).mappings().all()
        token_rows = (await conn.execute(select(refresh_tokens))).mappings().all()
    fams = {
        f["id"]: {"expires_at": f["expires_at"], "idle_expires_at": f["idle_expires_at"], "revoked_at": f["revoked_at"]}
        for f in family_rows
    }
    tokens = {t["token_hash"]: t["family_id"] for t in token_rows}
    return fams, tokens


async def _token_expiries(harness: IssuerHarness) -> dict[bytes, datetime]:
    async with harness.engine.connect() as conn:
        rows = (await conn.execute(select(refresh_tokens.c.token_hash, refresh_tokens.c.expires_at))).all()
    return {row.token_hash: row.expires_at for row in rows}


def _ended(family: dict[str, datetime | None]) -> datetime:
    ends = [family["expires_at"], family["idle_expires_at"], family["revoked_at"]]
    return min(end for end in ends if end is not None)


@pytest.mark.parametrize("batch", [2, 1000])
async def test_cleanup_removes_exactly_what_ended_before_the_retention(harness: IssuerHarness, batch: int) -> None:
    services = harness.services
    user = await services.accounts.register("alice@example.com", PASSWORD, now=harness.clock())
    world = World(harness, user)

    # In time order (the clock only moves forward). Cutoff: 5000 - 1000 = 4000.
    idle_long_ago = await world.login(0)  # never refreshed: idle-dead at 600
    revoked_long_ago = await world.login(0)
    lifetime_over = await world.login(0)  # refreshed until its absolute end at 3000
    await world.logout(revoked_long_ago, 10)
    for offset in range(500, 3000, 500):
        await world.refresh(lifetime_over, offset)
    live = await world.login(2500)  # refreshed all along: must survive with its recent chain
    await world.refresh(live, 3000)
    idle_before_cutoff = await world.login(3300)  # idle-dead at 3900, before the cutoff
    idle_at_cutoff = await world.login(3400)  # idle-dead at exactly the cutoff: not yet "more than" retention
    await world.refresh(live, 3500)
    idle_recently = await world.login(3500)  # idle-dead at 4100, after the cutoff: kept for the retention
    revoked_before_cutoff = await world.login(3800)  # its token would live until 4400, but it was revoked at 3850
    await world.logout(revoked_before_cutoff, 3850)
    await world.refresh(live, 4000)
    revoked_recently = await world.login(4200)
    await world.refresh(live, 4500)
    await world.logout(revoked_recently, 4500)
    await world.refresh(live, 5000)
    now = world.at(5000)
    cutoff = now - RETENTION
    live_token_before = live.token

    families_before, tokens_before = await _rows(harness)
    expiries = await _token_expiries(harness)
    assert len(families_before) == 9

    report = await cleanup(
        services.db, now=now, retention=RETENTION, failure_window=WINDOW, event_retention=RETENTION, batch=batch
    )

    families_after, tokens_after = await _rows(harness)

    # 1. By scenario.
    deleted = {idle_long_ago, revoked_long_ago, lifetime_over, idle_before_cutoff, revoked_before_cutoff}
    kept = {live, idle_at_cutoff, idle_recently, revoked_recently}
    assert {c.family_id for c in kept} == set(families_after)
    assert not {c.family_id for c in deleted} & set(families_after)

    # 2. By rule, row by row.
    for family_id, family in families_before.items():
        assert (family_id in families_after) == (_ended(family) >= cutoff), (family_id, family, cutoff)
    for hashed, family_id in tokens_before.items():
        should_go = family_id not in families_after or expiries[hashed] < cutoff
        assert (hashed in tokens_after) == (not should_go), (family_id, expiries[hashed], cutoff)
    # The live family lost only the old links of its chain: tokens of 3000 and 3500 expired at 3600 and 4100.
    live_tokens = {h for h, f in tokens_after.items() if f == live.family_id}
    assert token_hash(live.token) in live_tokens
    assert len(live_tokens) == 4  # issued at 3500 (expires 4100), 4000, 4500 and the live one of 5000
    assert report.families == len(families_before) - len(families_after)
    assert report.tokens == len(tokens_before) - len(tokens_after)
    assert report.login_failures == 0

    # Live families keep working after the cleanup.
    world.clock.now = now
    await world.refresh(live, 5010)
    assert live.token != live_token_before
    again = await cleanup(
        services.db,
        now=world.at(5010),
        retention=RETENTION,
        failure_window=WINDOW,
        event_retention=RETENTION,
        batch=batch,
    )
    # Ten seconds later the session that ended exactly at the old cutoff is past it, and only that one goes.
    assert (again.tokens, again.families) == (1, 1)
    families_later, _ = await _rows(harness)
    assert set(families_later) == {c.family_id for c in kept - {idle_at_cutoff}}
    await assert_single_chain(harness.engine, harness.clock())
    # The dead-but-retained sessions are still dead: cleanup's retention does not resurrect anything.
    for chain in (idle_recently, revoked_recently, idle_at_cutoff):
        with pytest.raises(InvalidGrant):
            await services.families.rotate(chain.token, now=harness.clock())


async def test_cleanup_in_tiny_batches_removes_everything(harness: IssuerHarness) -> None:
    """More dead rows than any batch: the loops run to completion, and live rows stay."""
    services = harness.services
    user = await services.accounts.register("alice@example.com", PASSWORD, now=harness.clock())
    world = World(harness, user)
    dead = [await world.login(0) for _ in range(7)]
    for step in range(1, 4):
        for chain in dead[:3]:
            await world.refresh(chain, step * 10)
    live = await world.login(5000)
    now = world.at(5000)
    report = await cleanup(
        services.db, now=now, retention=RETENTION, failure_window=WINDOW, event_retention=RETENTION, batch=2
    )
    families_after, tokens_after = await _rows(harness)
    assert set(families_after) == {live.family_id}
    assert set(tokens_after) == {token_hash(live.token)}
    assert report.families == 7
    assert report.tokens == 7 + 3 * 3
    await world.refresh(live, 5001)


async def test_cleanup_leaves_login_failures_that_still_matter(harness: IssuerHarness) -> None:
    engine = harness.engine
    now = harness.clock()
    old = now - WINDOW - timedelta(seconds=1)
    rows = [
        {"email": "old-unlocked@example.com", "failures": 3, "last_failure_at": old, "locked_until": None},
        {"email": "old-lock-over@example.com", "failures": 9, "last_failure_at": old, "locked_until": old},
        {
            "email": "old-still-locked@example.com",
            "failures": 30,
            "last_failure_at": old,
            "locked_until": now + timedelta(seconds=5),
        },
        {"email": "recent@example.com", "failures": 2, "last_failure_at": now - WINDOW + timedelta(seconds=1)},
        {
            "email": "recent-locked@example.com",
            "failures": 6,
            "last_failure_at": now,
            "locked_until": now + timedelta(seconds=60),
        },
    ]
    async with engine.begin() as conn:
        for row in rows:
            await conn.execute(insert(login_failures).values(**{"locked_until": None, **row}))
    report = await cleanup(
        harness.services.db, now=now, retention=RETENTION, failure_window=WINDOW, event_retention=RETENTION, batch=2
    )
    async with engine.connect() as conn:
        left = set((await conn.execute(select(login_failures.c.email))).scalars())
    assert left == {"old-still-locked@example.com", "recent@example.com", "recent-locked@example.com"}
    assert report.login_failures == 2


async def test_cleanup_never_touches_a_live_family_however_old(harness: IssuerHarness) -> None:
    """A session refreshed every few minutes for its whole lifetime keeps its live token at every step."""
    services = harness.services
    user = await services.accounts.register("alice@example.com", PASSWORD, now=harness.clock())
    world = World(harness, user)
    chain = await world.login(0)
    for offset in range(300, SESSION_MAX_AGE - 300, 300):
        await world.refresh(chain, offset)
        await cleanup(
            services.db,
            now=world.at(offset),
            retention=timedelta(0),
            failure_window=WINDOW,
            event_retention=RETENTION,
            batch=1,
        )
        families_after, tokens_after = await _rows(harness)
        assert chain.family_id in families_after
        assert token_hash(chain.token) in tokens_after
    await world.refresh(chain, SESSION_MAX_AGE - 300)


async def test_periodic_cleanup_task_runs_and_counts(settings: Settings, clock: FakeClock) -> None:
    """CLEANUP_INTERVAL=1: the background task runs on its own (a short real wait, bounded) and counts."""
    configured = with_settings(
        settings,
        cleanup_interval=1,
        cleanup_retention=0,
        refresh_token_ttl=600,
        session_max_age=3000,
        access_token_ttl=60,
    )
    async with running_issuer(configured, clock) as running:
        user = await running.services.accounts.register("alice@example.com", PASSWORD, now=clock())
        world = World(running, user)
        await world.login(0)
        world.at(700)  # idle-dead
        deleted = 0.0
        for _ in range(100):  # at most 10 s
            deleted = sample(running.services, "issuer_cleanup_deleted_total", {"kind": "families"})
            if deleted:
                break
            await asyncio.sleep(0.1)
        assert deleted == 1
        assert sample(running.services, "issuer_cleanup_deleted_total", {"kind": "tokens"}) == 1
        families_after, _ = await _rows(running)
        assert families_after == {}


REPORT = re.compile(
    r"deleted (\d+) refresh token\(s\), (\d+) session\(s\), (\d+) login-failure counter\(s\), (\d+) security event\(s\)"
)


async def test_cleanup_cli(
    settings: Settings,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configured = with_settings(settings, refresh_token_ttl=600, session_max_age=3000, access_token_ttl=60)
    async with running_issuer(configured, clock) as running:
        user = await running.services.accounts.register("alice@example.com", PASSWORD, now=clock())
        world = World(running, user)
        dead = await world.login(0)
        await world.refresh(dead, 100)
        live = await world.login(4000)
        async with running.engine.begin() as conn:
            await conn.execute(
                insert(login_failures).values(
                    email="stale@example.com",
                    failures=2,
                    last_failure_at=clock() - timedelta(hours=2),
                    locked_until=None,
                )
            )
        world.at(4000)

        cli = Cli(configured, clock, monkeypatch, capsys)
        monkeypatch.setenv("CLEANUP_RETENTION", "1000")
        result = await cli("cleanup")
        assert result.code == 0, result
        lines = result.out.splitlines()
        assert len(lines) == 1, result.out
        match = REPORT.fullmatch(lines[0])
        assert match is not None, lines[0]
        assert tuple(int(n) for n in match.groups()) == (2, 1, 1, 0)
        assert "Traceback" not in result.err

        families_after, tokens_after = await _rows(running)
        assert set(families_after) == {live.family_id}
        assert set(tokens_after) == {token_hash(live.token)}
        await world.refresh(live, 4001)

        # Run again: nothing left to do, still one line.
        again = await cli("cleanup")
        assert again.code == 0
        assert again.out.splitlines() == [
            "deleted 0 refresh token(s), 0 session(s), 0 login-failure counter(s), 0 security event(s)"
        ]


async def test_cleanup_cli_database_unreachable(
    settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = with_settings(settings, database_url="postgresql+asyncpg://postgres@127.0.0.1:1/nothing")
    cli = Cli(unreachable, clock, monkeypatch, capsys)
    result = await cli("cleanup")
    assert result.code == 1
    assert result.out == ""
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith("issuer: cannot reach the database")


async def test_cleanup_drops_only_idle_rate_buckets(db: Database, engine: AsyncEngine) -> None:
    limiter = SharedRateLimiter(db, 10, "login+register")
    start = datetime(2030, 1, 1, tzinfo=UTC)
    assert await limiter.acquire("192.0.2.1", start) == 0
    assert await limiter.acquire("192.0.2.2", start + timedelta(minutes=59)) == 0
    await cleanup(
        db,
        now=start + timedelta(hours=1, seconds=1),
        retention=timedelta(0),
        failure_window=timedelta(hours=1),
        event_retention=timedelta(0),
    )
    async with engine.connect() as conn:
        left = set((await conn.execute(select(rate_buckets.c.bucket))).scalars())
    assert left == {"login+register:192.0.2.2"}
