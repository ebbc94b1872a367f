"""Signing-key lifecycle across replicas: CLI rotation and revocation, scheduled rotation, JWKS caching.

Several app instances share one PostgreSQL database (and here one FakeClock). Each re-reads the key table on
its own schedule; the tests call ``reload()`` where a replica would have done so by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from issuer.http.app import create_app
from issuer.keys.manager import KeyManager
from issuer.keys.material import KeyDecryptionError
from issuer.settings import Secret, Settings
from tests.support.clock import FakeClock
from tests.support.http import assert_error, bearer, login, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.keys import Cli, by_kid, fetch_jwks, jwks_kids, key_rows, token_kid, verify_with_jwks

JWKS = "/.well-known/jwks.json"


@contextlib.asynccontextmanager
async def replicas(settings: Settings, clock: FakeClock, count: int) -> AsyncIterator[list[IssuerHarness]]:
    """``count`` app instances on one database, started one after the other like a rolling deploy."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_issuer(settings, clock)) for _ in range(count)]


async def reload_all(instances: list[IssuerHarness]) -> None:
    await asyncio.gather(*(instance.services.keys.reload() for instance in instances))


async def login_kids(clients: list[httpx.AsyncClient]) -> list[str]:
    return [token_kid((await login(c))["access_token"]) for c in clients]


def max_age(response: httpx.Response) -> int:
    match = re.fullmatch(r"public, max-age=(\d+)", response.headers["cache-control"])
    assert match, response.headers["cache-control"]
    return int(match.group(1))


# ---------------------------------------------------------------- rotation through the CLI, two replicas


async def test_cli_rotation_reaches_both_replicas_and_old_tokens_outlive_it(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    lead = settings.key_publish_lead
    async with replicas(settings, clock, 2) as instances:
        a, b = instances
        async with a.client() as ca, b.client() as cb:
            clients = [ca, cb]
            await register(ca)
            (old,) = [r.kid for r in await key_rows(settings.database_url)]
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
    async with replicas(settings, clock, 2) as instances:
        a, b = instances
        async with a.client() as ca, b.client() as cb:
            clients = [ca, cb]
            await register(ca)
            (old,) = [r.kid for r in await key_rows(settings.database_url)]
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
                    assert_error(await c.get("/auth/me", headers=bearer(token)), 401, "invalid_token")
            for c in clients:
                assert await jwks_kids(c) == {replacement}
            assert await login_kids(clients) == [replacement, replacement]


async def test_revoking_the_active_key_promotes_the_published_one(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    async with replicas(settings, clock, 2) as instances:
        a, b = instances
        async with a.client() as ca, b.client() as cb:
            clients = [ca, cb]
            await register(ca)
            (old,) = [r.kid for r in await key_rows(settings.database_url)]
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
                assert_error(await c.get("/auth/me", headers=bearer(old_token)), 401, "invalid_token")


async def test_revoking_the_waiting_key_leaves_the_current_key_signing(
    settings: Settings, clock: FakeClock, cli: Cli
) -> None:
    """A compromised key that never signed is withdrawn; the key it was to replace must not retire into nothing."""
    async with replicas(settings, clock, 2) as instances:
        a, b = instances
        async with a.client() as ca, b.client() as cb:
            clients = [ca, cb]
            await register(ca)
            (current,) = [r.kid for r in await key_rows(settings.database_url)]
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


async def test_scheduled_rotation_makes_exactly_one_key_per_interval(settings: Settings, clock: FakeClock) -> None:
    scheduled = with_settings(settings, key_rotation_interval=3600, key_publish_lead=600, jwks_max_age=300)
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


# ---------------------------------------------------------------- JWKS caching


@pytest.mark.parametrize(
    ("jwks_max_age", "publish_lead", "reload_interval"),
    [(300, 600, 10), (300, 300, 10), (300, 305, 10), (3600, 3600, 60), (60, 600, 1), (0, 0, 1)],
)
async def test_jwks_max_age_leaves_room_for_replicas_that_have_not_reloaded(
    settings: Settings, clock: FakeClock, jwks_max_age: int, publish_lead: int, reload_interval: int
) -> None:
    tuned = with_settings(
        settings, jwks_max_age=jwks_max_age, key_publish_lead=publish_lead, key_reload_interval=reload_interval
    )
    async with running_issuer(tuned, clock) as harness, harness.client() as c:
        response = await c.get(JWKS)
        assert response.status_code == 200
        served = max_age(response)
        assert served == KeyManager.jwks_max_age(tuned)
        assert served <= jwks_max_age
        assert served <= max(0, publish_lead - reload_interval)
        # The 304 carries the same caching instructions.
        again = await c.get(JWKS, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304
        assert max_age(again) == served


async def test_a_gateway_cache_filled_by_a_stale_replica_expires_before_the_new_key_signs(
    settings: Settings, clock: FakeClock
) -> None:
    async with replicas(settings, clock, 2) as (a, b), b.client() as cb:
        plan = await a.services.keys.rotate()
        assert plan.insert is not None
        new = plan.insert.kid
        # Worst case: b re-reads the table a full reload interval later; a gateway fetches from b just before.
        clock.advance(settings.key_reload_interval - 1)
        stale = await cb.get(JWKS)
        assert new not in {k["kid"] for k in stale.json()["keys"]}
        cached_until = clock.now + timedelta(seconds=max_age(stale))
        clock.advance(1)
        await b.services.keys.reload()
        assert new in await jwks_kids(cb)
        assert cached_until < plan.insert.activate_at, "the gateway would meet the new kid before refetching"


async def test_jwks_etag_follows_the_key_set(settings: Settings, clock: FakeClock) -> None:
    async with replicas(settings, clock, 2) as (a, b), a.client() as ca, b.client() as cb:
        first = await ca.get(JWKS)
        etag1 = first.headers["etag"]
        assert (await cb.get(JWKS)).headers["etag"] == etag1  # replicas agree, so revalidation works behind a balancer

        not_modified = await ca.get(JWKS, headers={"If-None-Match": etag1})
        assert not_modified.status_code == 304
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag1
        assert (await ca.get(JWKS, headers={"If-None-Match": '"something-else"'})).status_code == 200

        clock.advance(120)  # time alone changes nothing
        assert (await ca.get(JWKS)).headers["etag"] == etag1

        plan = await a.services.keys.rotate()
        assert plan.insert is not None
        await reload_all([a, b])
        second = await ca.get(JWKS)
        etag2 = second.headers["etag"]
        assert etag2 != etag1
        assert plan.insert.kid in {k["kid"] for k in second.json()["keys"]}
        assert (await cb.get(JWKS)).headers["etag"] == etag2

        stale = await ca.get(JWKS, headers={"If-None-Match": etag1})
        assert stale.status_code == 200, "a 304 for an outdated ETag would hide the new key"
        assert stale.content == second.content
        assert (await ca.get(JWKS, headers={"If-None-Match": etag2})).status_code == 304
        assert (await ca.get(JWKS, headers={"If-None-Match": f"W/{etag2}"})).status_code == 304
        assert (await ca.get(JWKS, headers={"If-None-Match": f"{etag1}, {etag2}"})).status_code == 304

        clock.advance(settings.key_publish_lead)  # the new key signs; the set of published keys is the same
        assert (await ca.get(JWKS)).headers["etag"] == etag2

        clock.advance(KeyManager.retire_grace(settings).total_seconds())  # the old key leaves
        third = await cb.get(JWKS)
        assert third.headers["etag"] not in {etag1, etag2}
        assert {k["kid"] for k in third.json()["keys"]} == {plan.insert.kid}
        assert (await cb.get(JWKS, headers={"If-None-Match": etag2})).status_code == 200


# ---------------------------------------------------------------- wrong KEK at start-up


async def test_app_with_a_wrong_kek_fails_at_startup_and_writes_nothing(settings: Settings, clock: FakeClock) -> None:
    async with running_issuer(settings, clock):
        pass
    before = await key_rows(settings.database_url)
    assert len(before) == 1

    wrong = with_settings(settings, kek=Secret(secrets.token_bytes(32)))
    app = create_app(wrong, clock=clock)
    try:
        with pytest.raises(KeyDecryptionError, match="ISSUER_KEK"):
            async with app.router.lifespan_context(app):
                pytest.fail("the app started with a KEK that does not open its keys")
    finally:
        await app.state.engine.dispose()
    assert await key_rows(settings.database_url) == before
