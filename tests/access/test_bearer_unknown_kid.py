"""A Bearer token whose kid this process does not hold gets one rate-limited reload of the key table before
it is refused (issuer/access/bearer.py, ``UnknownKidReload``).

The replicas here never hear of key changes by themselves: their LISTEN connection points at a closed port
and their periodic reload is an hour away, so only the unknown-kid reload can have taught them a new key.
Reloads are counted, never timed: the rate limit runs on the fake clock's monotonic seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from issuer.access.bearer import BearerAuth, UnknownKidReload
from issuer.access.user_lookup import UserLookup
from issuer.settings import Settings
from issuer.storage import users
from tests.support.clock import FakeClock
from tests.support.http import assert_invalid_token, login, me, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings, without_listen
from tests.support.jwt import jwt_claims, rsa_signed, token_kid
from tests.support.keys import jwks_kids

HOUR = 3600
FLOOD = 40


def deaf(settings: Settings) -> Settings:
    """A replica that hears of key changes only through its own reloads: no LISTEN, an hourly reload."""
    return with_settings(
        without_listen(settings),
        key_reload_interval=HOUR,
        key_publish_lead=2 * HOUR,
        jwks_max_age=60,
    )


@contextlib.asynccontextmanager
async def deaf_replicas(settings: Settings, clock: FakeClock, count: int) -> AsyncIterator[list[IssuerHarness]]:
    async with contextlib.AsyncExitStack() as stack:
        instances = [await stack.enter_async_context(running_issuer(deaf(settings), clock)) for _ in range(count)]
        yield instances


class CountingReload:
    """Wraps a KeyManager's reload: counts the calls, and can hold them until released, so that a flood
    is provably in flight while one reload runs."""

    def __init__(self, reload: Callable[[], Awaitable[None]]) -> None:
        self._reload = reload
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> None:
        self.calls += 1
        await self.release.wait()
        await self._reload()


def counted_bearer(instance: IssuerHarness, clock: FakeClock) -> CountingReload:
    """Give ``instance`` a BearerAuth whose reloads are counted and rate-limited on the fake monotonic clock
    (the same construction as ``Services.build``, with those two injected)."""
    services = instance.services
    counter = CountingReload(services.keys.reload)
    services.keys.reload = counter  # type: ignore[method-assign]  # only this BearerAuth captures it
    services.bearer = BearerAuth(
        UserLookup(lambda ids: users.by_ids(services.db, ids)),
        services.keys,
        services.settings,
        clock,
        services.metrics,
        monotonic=clock.monotonic,
    )
    return counter


@pytest.fixture(scope="module")
def stranger_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def forged(claims: dict[str, Any], key: rsa.RSAPrivateKey, kid: str) -> str:
    return rsa_signed({"alg": "RS256", "typ": "at+jwt", "kid": kid}, claims, key)


def thumbprint_shaped() -> str:
    """A kid of the issuer's own shape (43 base64url characters) that names no key anywhere."""
    return secrets.token_urlsafe(32)[:43].ljust(43, "A")


async def test_a_key_another_replica_just_activated_is_accepted_by_one_that_has_not_heard_of_it(
    settings: Settings, clock: FakeClock
) -> None:
    async with deaf_replicas(settings, clock, 2) as (a, b):
        assert not a.services.listener.connected
        assert not b.services.listener.connected
        async with a.client() as client_a, b.client() as client_b:
            await register(client_a)
            old_kid = token_kid((await login(client_a))["access_token"])

            await a.services.keys.rotate(immediate=True)
            fresh = (await login(client_a))["access_token"]
            new_kid = token_kid(fresh)
            assert new_kid != old_kid
            assert new_kid not in await jwks_kids(client_b)  # b has not heard of the new key

            response = await me(client_b, fresh)
            assert response.status_code == 200, response.text
            assert response.json()["id"] == jwt_claims(fresh)["sub"]
            # The reload it triggered is b's whole view now: the JWKS it serves includes the key.
            assert new_kid in await jwks_kids(client_b)


async def test_a_flood_of_unknown_kids_reloads_at_most_once_per_second(
    settings: Settings, clock: FakeClock, stranger_key: rsa.RSAPrivateKey
) -> None:
    async with deaf_replicas(settings, clock, 2) as (a, b):
        reloads = counted_bearer(b, clock)
        async with a.client() as client_a, b.client() as client_b:
            await register(client_a)
            claims = jwt_claims((await login(client_a))["access_token"])

            async def flood(count: int = FLOOD) -> list[httpx.Response]:
                tokens = [forged(claims, stranger_key, thumbprint_shaped()) for _ in range(count)]
                return await asyncio.gather(*(me(client_b, token) for token in tokens))

            # Every request of the flood is in flight while the one reload runs: they all share it.
            reloads.release.clear()
            flooding = asyncio.ensure_future(flood())
            while reloads.calls == 0:  # noqa: ASYNC110 (the first request reaching the reload)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            reloads.release.set()
            for response in await flooding:
                assert_invalid_token(response)
            assert reloads.calls == 1

            # Less than a second (of the rate limiter's clock) later: no reload at all, still refused.
            clock.advance(0.5)
            for response in await flood():
                assert_invalid_token(response)
            assert reloads.calls == 1

            # A second after the first one started: one more, however many ask.
            clock.advance(0.6)
            for response in await flood():
                assert_invalid_token(response)
            assert reloads.calls == 2

            # A kid that cannot be one of the issuer's (not an RFC 7638 thumbprint) never reloads.
            clock.advance(5)
            for kid in ("x", "../../etc/passwd", "A" * 44):
                assert_invalid_token(await me(client_b, forged(claims, stranger_key, kid)))
            assert reloads.calls == 2

            # Within a second of a flood's reload, a real new key is refused too: the limit is per process,
            # not per kid (LISTEN, when up, has told the replica long before). After the second it passes.
            await flood(3)
            assert reloads.calls == 3
            await a.services.keys.rotate(immediate=True)
            fresh = (await login(client_a))["access_token"]
            assert_invalid_token(await me(client_b, fresh))
            clock.advance(1)
            assert (await me(client_b, fresh)).status_code == 200
            assert reloads.calls == 4


async def test_callers_that_join_a_failing_reload_all_see_its_error() -> None:
    """The reload is shared, so is its failure (a database outage answers 503, not a refusal), and the
    next caller after the interval tries again."""
    clock = FakeClock()
    calls = 0
    gate = asyncio.Event()

    async def failing() -> None:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise ConnectionError("database down")

    reload = UnknownKidReload(failing, monotonic=clock.monotonic)
    waiters = [asyncio.ensure_future(reload()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(result, ConnectionError) for result in results)
    assert await reload() is False  # within the interval: none
    clock.advance(1)
    with pytest.raises(ConnectionError):
        await reload()
    assert calls == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_reload_for_the_others() -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    done = 0

    async def slow() -> None:
        nonlocal done
        await gate.wait()
        done += 1

    reload = UnknownKidReload(slow, monotonic=clock.monotonic)
    first = asyncio.ensure_future(reload())
    second = asyncio.ensure_future(reload())
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await second is True
    assert done == 1
