"""Signing-key lifecycle across replicas: CLI rotation and revocation, scheduled rotation.

Several app instances share one PostgreSQL database (and here one FakeClock). Each re-reads the key table on
its own schedule; the tests call ``reload()`` where a replica would have done so by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import NamedTuple

import httpx
import pytest

from issuer.keys.manager import KeyManager
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import assert_invalid_token, bearer, login, register
from tests.support.issuer import IssuerHarness, with_settings
from tests.support.jwt import token_kid
from tests.support.keys import (
    JWKS,
    Cli,
    by_kid,
    fetch_jwks,
    jwks_kids,
    key_rows,
    reload_all,
    replicas,
    verify_with_jwks,
)


class Pair(NamedTuple):
    instances: list[IssuerHarness]
    clients: list[httpx.AsyncClient]
    first_kid: str


@contextlib.asynccontextmanager
async def two_replicas(settings: Settings, clock: FakeClock) -> AsyncIterator[Pair]:
    """Two replicas on one database with a client each, a registered user, and the key the first start-up made."""
    async with replicas(settings, clock, 2) as instances:
        a, b = instances
        async with a.client() as ca, b.client() as cb:
            await register(ca)
            (first,) = [r.kid for r in await key_rows(settings.database_url)]
            yield Pair(instances, [ca, cb], first)


async def login_kids(clients: list[httpx.AsyncClient]) -> list[str]:
    return [token_kid((await login(c))["access_token"]) for c in clients]


# ---------------------------------------------------------------- rotation through the CLI, two replicas


async def test_cli_rotation_reaches_both_replicas_and_old_tokens_outlive_it(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    lead = settings.key_publish_lead
    async with two_replicas(settings, clock) as (instances, clients, old):
        assert await login_kids(clients) == [old, old]

        result = await cli("keys", "rotate")
        assert result.code == 0, result
        rows = by_kid(await key_rows(settings.database_url))
        assert set(rows) - {old}, "rotate wrote no key"
        (new,) = set(rows) - {old}
        assert new in result.out
        assert rows[new].publish_at == clock.now
        assert rows[new].activate_at == clock.now + timedelta(seconds=lead)
        assert rows[old].retire_at == rows[new].activate_at

        await reload_all(instances)
        # Published on both at once, with identical documents, but not signing yet.
        documents = [await c.get(JWKS) for c in clients]
        assert [set(k["kid"] for k in d.json()["keys"]) for d in documents] == [{old, new}, {old, new}]
        assert documents[0].content == documents[1].content
        assert documents[0].headers["etag"] == documents[1].headers["etag"]
        assert await login_kids(clients) == [old, old]

        clock.advance(lead - 1)
        last_old_tokens = [(await login(c))["access_token"] for c in clients]
        assert [token_kid(t) for t in last_old_tokens] == [old, old]

        clock.advance(1)  # the new key's activate_at: both replicas switch in the same second
        assert await login_kids(clients) == [new, new]
        stopped = clock.now
        assert rows[old].retire_at == stopped

        # Tokens the old key signed keep verifying on both replicas, and a gateway finds their key in the JWKS.
        window = settings.access_token_ttl + settings.clock_leeway
        clock.advance(window - 2)
        await reload_all(instances)
        for token in last_old_tokens:
            for c in clients:
                me = await c.get("/auth/me", headers=bearer(token))
                assert me.status_code == 200, me.text
                verify_with_jwks(await fetch_jwks(c), token, audience=settings.audience, issuer=settings.issuer_url)
        clock.advance(2)  # the end of the window: still published
        await reload_all(instances)
        for c in clients:
            assert await jwks_kids(c) == {old, new}

        # Afterwards the old key leaves the JWKS on both (and not absurdly late).
        grace = KeyManager.retire_grace(settings).total_seconds()
        assert window <= grace <= window + 2 * settings.key_reload_interval
        clock.now = stopped + KeyManager.retire_grace(settings)
        await reload_all(instances)
        for c in clients:
            assert await jwks_kids(c) == {new}
        assert await login_kids(clients) == [new, new]


# ---------------------------------------------------------------- revocation through the CLI, two replicas


async def test_cli_revoke_of_the_active_key_takes_effect_on_both_replicas(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    async with two_replicas(settings, clock) as (instances, clients, old):
        cb = clients[1]
        tokens = [(await login(c))["access_token"] for c in clients]
        for token in tokens:
            assert (await cb.get("/auth/me", headers=bearer(token))).status_code == 200

        clock.advance(30)
        result = await cli("keys", "revoke", old)
        assert result.code == 0, result
        rows = by_kid(await key_rows(settings.database_url))
        assert rows[old].revoked_at == clock.now
        (replacement,) = set(rows) - {old}
        assert rows[replacement].activate_at == clock.now  # signs at once: the compromised key cannot

        await reload_all(instances)
        for token in tokens:
            for c in clients:
                assert_invalid_token(await c.get("/auth/me", headers=bearer(token)))
        for c in clients:
            assert await jwks_kids(c) == {replacement}
        assert await login_kids(clients) == [replacement, replacement]


async def test_revoking_the_active_key_promotes_the_published_one(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    async with two_replicas(settings, clock) as (instances, clients, old):
        cb = clients[1]
        assert (await cli("keys", "rotate")).code == 0
        (waiting,) = {r.kid for r in await key_rows(settings.database_url)} - {old}
        await reload_all(instances)
        old_token = (await login(cb))["access_token"]
        assert token_kid(old_token) == old

        clock.advance(60)
        result = await cli("keys", "revoke", old)
        assert result.code == 0, result
        rows = by_kid(await key_rows(settings.database_url))
        assert set(rows) == {old, waiting}, "a new key was created although one was already published"
        assert rows[waiting].activate_at == clock.now
        assert rows[old].revoked_at == clock.now
        assert waiting in result.err or waiting in result.out

        await reload_all(instances)
        assert await login_kids(clients) == [waiting, waiting]
        for c in clients:
            assert await jwks_kids(c) == {waiting}
            assert_invalid_token(await c.get("/auth/me", headers=bearer(old_token)))


async def test_revoking_the_waiting_key_leaves_the_current_key_signing(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    """A compromised key that never signed is withdrawn; the key it was to replace must not retire into nothing."""
    async with two_replicas(settings, clock) as (instances, clients, current):
        assert (await cli("keys", "rotate")).code == 0
        (waiting,) = {r.kid for r in await key_rows(settings.database_url)} - {current}

        result = await cli("keys", "revoke", waiting)
        assert result.code == 0, result
        await reload_all(instances)
        for c in clients:
            assert await jwks_kids(c) == {current}

        # Long past the moment the revoked key would have taken over, and past every replica's reload.
        clock.advance(settings.key_publish_lead + KeyManager.retire_grace(settings).total_seconds() + 1)
        await reload_all(instances)
        assert await login_kids(clients) == [current, current]
        for c in clients:
            assert await jwks_kids(c) == {current}
        assert {r.kid for r in await key_rows(settings.database_url)} == {current, waiting}


# ---------------------------------------------------------------- scheduled rotation, three replicas


async def test_scheduled_rotation_makes_exactly_one_key_per_interval(
    settings: Settings, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="issuer")
    scheduled = with_settings(settings, key_rotation_interval=3600, key_publish_lead=600, jwks_max_age=300)
    made: list[str] = []
    async with replicas(scheduled, clock, 3) as instances:
        managers = [instance.services.keys for instance in instances]

        async def contend(rounds: int = 3) -> int:
            """Every replica calls rotate_if_due at once, several times over; returns how many keys were made."""
            made = 0
            for _ in range(rounds):
                plans = await asyncio.gather(*(m.rotate_if_due() for m in managers for _ in range(3)))
                made += sum(1 for plan in plans if plan is not None and plan.insert is not None)
            return made

        (first,) = await key_rows(scheduled.database_url)
        clock.advance(3599)
        assert await contend() == 0
        assert len(await key_rows(scheduled.database_url)) == 1

        for interval in (1, 2):
            clock.advance(1)
            assert await contend() == 1
            rows = await key_rows(scheduled.database_url)
            assert len(rows) == 1 + interval
            newest = max(rows, key=lambda r: r.generation)
            made.append(newest.kid)
            assert newest.publish_at == clock.now
            assert newest.activate_at == clock.now + timedelta(seconds=600)
            assert len({r.generation for r in rows}) == len(rows)

            await reload_all(instances)
            documents = [instance.services.keys.ring.jwks(clock.now) for instance in instances]
            assert len({d.etag for d in documents}) == 1
            assert newest.kid.encode() in documents[0].body
            # Published, not signing; after the lead every replica signs with it.
            before = [m.signing_key(clock.now) for m in managers]
            assert all(key is not None and key.record.kid != newest.kid for key in before)
            clock.advance(600)
            assert await contend(1) == 0
            after = [m.signing_key(clock.now) for m in managers]
            assert [key.record.kid if key is not None else None for key in after] == [newest.kid] * 3
            async with instances[interval].client() as c:
                await register(c, email=f"user{interval}@example.com")
                assert token_kid((await login(c, email=f"user{interval}@example.com"))["access_token"]) == newest.kid

            # Not due again until a full interval after the newest key was published.
            clock.advance(3600 - 600 - 1)
            assert await contend() == 0
            assert len(await key_rows(scheduled.database_url)) == 1 + interval
        assert first.kid in {r.kid for r in await key_rows(scheduled.database_url)}

    # The audit trail says the same: one key created at the first start-up, one scheduled rotation per interval.
    def events(name: str, *fields: str) -> list[tuple[object, ...]]:
        return [(r.name, *(getattr(r, f) for f in fields)) for r in caplog.records if getattr(r, "event", None) == name]

    assert events("key_created", "kid") == [("issuer.audit", first.kid)]
    assert events("key_rotated", "kid", "scheduled") == [("issuer.audit", kid, True) for kid in made]
