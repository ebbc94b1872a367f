"""Revocations reach verifiers that follow the feed: a real issuer, three verifiers following its feed at once.

For every path that revokes (logout-all, ``DELETE /auth/sessions/{id}``, account deletion, reuse detection,
logout, RFC 7009 with a refresh or an access token): every verifier accepts the token before, refuses it with
reason ``revoked`` after, and goes on accepting the tokens the revocation does not concern. The issuer runs
in-process with its lifespan (pool, key ring, LISTEN connection); each verifier reaches it through its own
``httpx.ASGITransport`` client, fetching the JWKS and long-polling the feed as it would over a network.

The delay from the revoking request's answer to each verifier's refusal is recorded (printed, and kept as the
``propagation_ms`` property of the test), never asserted: tests do not judge speed. ``make bench`` measures it
over real HTTP (``bench/propagation.py``). The only bound is ``REFUSAL_BOUND``, a generous limit on waiting
so that a feed that never delivers fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from issuer.settings import Settings
from issuer.verifier import AccessTokenVerifier, JWKSCache, RevocationFeed, Revoked, VerificationError
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import jwt_claims
from tests.support.oauth import new_client, revoke

VERIFIERS = 3
# How long to wait for a refusal before failing: a limit on waiting, not a timing assertion.
REFUSAL_BOUND = 30.0


@pytest.fixture
async def issuer(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    """The suite's issuer with REFRESH_REUSE_GRACE=0: every repeat of a consumed refresh token is reuse."""
    async with running_issuer(with_settings(settings, refresh_reuse_grace=0), clock) as harness:
        yield harness


@contextlib.asynccontextmanager
async def following(issuer: IssuerHarness, clock: FakeClock, count: int) -> AsyncIterator[list[AccessTokenVerifier]]:
    """``count`` verifiers, each with its own HTTP client, key cache and feed (one ``events`` client shared, as
    replicas of one resource service share their credentials), running their lifespans: synchronised."""
    credentials = await new_client(issuer, "events", name="resource-service")
    settings = issuer.services.settings
    async with contextlib.AsyncExitStack() as stack:
        verifiers = []
        for _ in range(count):
            http = await stack.enter_async_context(httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app)))
            feed = RevocationFeed(
                credentials.client_id,
                credentials.secret,
                http_client=http,
                token_lifetime=settings.access_token_ttl,
            )
            verifier = AccessTokenVerifier(
                issuer=settings.issuer_url,
                audience=settings.audience,
                jwks=JWKSCache(issuer=settings.issuer_url, http_client=http),
                leeway=settings.clock_leeway,
                clock=clock.wall,
                events=feed,
            )
            await stack.enter_async_context(verifier.lifespan())
            assert verifier.ready, verifier.status()
            verifiers.append(verifier)
        yield verifiers


# ---------------------------------------------------------------- the revocations


@dataclass
class Scenario:
    """What one revoking request must kill and must spare."""

    revoke: Callable[[], Awaitable[httpx.Response]]
    status: int  # of the revoking request's answer
    doomed: list[str]  # access tokens every verifier must refuse afterwards
    spared: list[str]  # access tokens every verifier must still accept afterwards
    # Tokens minted after the revocation that must be accepted (e.g. a new login after logout-all).
    later: Callable[[], Awaitable[list[str]]] | None = None
    delays: list[float] = field(default_factory=list)


@dataclass
class Session:
    access: str
    refresh: str

    @property
    def sid(self) -> str:
        sid: str = jwt_claims(self.access)["sid"]
        return sid


async def sign_in(http: httpx.AsyncClient, email: str) -> Session:
    tokens = await login(http, email)
    return Session(tokens["access_token"], tokens["refresh_token"])


async def users(http: httpx.AsyncClient) -> tuple[Session, Session, Session]:
    """Alice with two sessions, Bob with one."""
    await register(http, "alice@example.com")
    await register(http, "bob@example.com")
    return (
        await sign_in(http, "alice@example.com"),
        await sign_in(http, "alice@example.com"),
        await sign_in(http, "bob@example.com"),
    )


async def logout_all(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    first, second, bob = await users(http)

    async def new_login() -> list[str]:
        return [(await sign_in(http, "alice@example.com")).access]

    return Scenario(
        revoke=lambda: http.post("/auth/logout-all", headers=bearer(first.access)),
        status=204,
        doomed=[first.access, second.access],
        spared=[bob.access],
        later=new_login,
    )


async def session_delete(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    first, second, bob = await users(http)
    return Scenario(
        revoke=lambda: http.delete(f"/auth/sessions/{second.sid}", headers=bearer(first.access)),
        status=204,
        doomed=[second.access],
        spared=[first.access, bob.access],
    )


async def account_deletion(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    first, second, bob = await users(http)
    return Scenario(
        revoke=lambda: http.request(
            "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(first.access)
        ),
        status=204,
        doomed=[first.access, second.access],
        spared=[bob.access],
    )


async def reuse_detection(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    first, second, bob = await users(http)
    rotated = await refresh_body(http, second.refresh)
    assert rotated.status_code == 200, rotated.text
    successor = rotated.json()["access_token"]
    # REFRESH_REUSE_GRACE=0: presenting the consumed token again is theft; the family is revoked.
    return Scenario(
        revoke=lambda: refresh_body(http, second.refresh),
        status=401,
        doomed=[second.access, successor],
        spared=[first.access, bob.access],
    )


async def logout(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    first, second, bob = await users(http)
    return Scenario(
        revoke=lambda: http.post("/auth/logout", json={"refresh_token": second.refresh}),
        status=204,
        doomed=[second.access],
        spared=[first.access, bob.access],
    )


async def rfc7009_refresh_token(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    first, second, bob = await users(http)
    gateway = await new_client(issuer, "revoke", name="gateway")
    return Scenario(
        revoke=lambda: revoke(http, gateway, second.refresh, token_type_hint="refresh_token"),
        status=200,
        doomed=[second.access],
        spared=[first.access, bob.access],
    )


async def rfc7009_access_token(issuer: IssuerHarness, http: httpx.AsyncClient) -> Scenario:
    """An access token revokes its whole session (the contract, section 8)."""
    first, second, bob = await users(http)
    gateway = await new_client(issuer, "revoke", name="gateway")
    return Scenario(
        revoke=lambda: revoke(http, gateway, second.access),
        status=200,
        doomed=[second.access],
        spared=[first.access, bob.access],
    )


SCENARIOS: dict[str, Callable[[IssuerHarness, httpx.AsyncClient], Awaitable[Scenario]]] = {
    "logout-all": logout_all,
    "session delete": session_delete,
    "account deletion": account_deletion,
    "reuse detection": reuse_detection,
    "logout": logout,
    "RFC 7009, refresh token": rfc7009_refresh_token,
    "RFC 7009, access token": rfc7009_access_token,
}


# ---------------------------------------------------------------- the test


async def refused_after(verifier: AccessTokenVerifier, token: str, answered: float) -> float:
    """Seconds from ``answered`` (the revoking request's answer) until ``verifier`` refuses ``token`` as revoked.

    Polled every millisecond; a refusal for any other reason fails at once. Waits at most ``REFUSAL_BOUND``."""
    async with asyncio.timeout(REFUSAL_BOUND):
        while (reason := await refusal(verifier, token)) is None:  # noqa: ASYNC110  # polling is the measurement
            await asyncio.sleep(0.001)
    assert reason == "revoked"
    return time.monotonic() - answered


async def refusal(verifier: AccessTokenVerifier, token: str) -> str | None:
    """Why ``verifier`` refuses ``token`` (the error's stable ``reason``), or None when it accepts it."""
    try:
        await verifier.verify(token)
    except VerificationError as refused:
        return refused.reason
    return None


async def accepted_by_all(verifiers: list[AccessTokenVerifier], tokens: list[str]) -> None:
    for verifier in verifiers:
        for token in tokens:
            await verifier.verify(token)  # raises on any refusal


@pytest.mark.parametrize("kind", list(SCENARIOS))
async def test_a_revocation_reaches_every_verifier_following_the_feed(
    issuer: IssuerHarness, clock: FakeClock, kind: str, record_property: Callable[[str, object], None]
) -> None:
    async with issuer.client() as http, following(issuer, clock, VERIFIERS) as verifiers:
        scenario = await SCENARIOS[kind](issuer, http)
        await accepted_by_all(verifiers, scenario.doomed + scenario.spared)

        response = await scenario.revoke()
        answered = time.monotonic()
        assert response.status_code == scenario.status, response.text

        delays = await asyncio.gather(
            *(refused_after(verifier, token, answered) for verifier in verifiers for token in scenario.doomed)
        )
        await accepted_by_all(verifiers, scenario.spared)
        if scenario.later is not None:
            await accepted_by_all(verifiers, await scenario.later())
        for verifier in verifiers:
            assert verifier.events is not None
            stats = verifier.events.stats
            # Delivered through the feed, verified, and without a failed poll on the way.
            assert stats.sets_applied >= 1, verifier.status()
            assert stats.sets_refused == 0, verifier.status()
            assert stats.errors == 0, verifier.status()
            assert verifier.events.stats.tokens_revoked, verifier.status()

    record_property("propagation_ms", [round(delay * 1000, 1) for delay in delays])
    print(f"{kind}: refused by {VERIFIERS} verifiers after {', '.join(f'{d * 1000:.1f}' for d in delays)} ms")


async def test_verifiers_that_start_after_the_revocation_refuse_from_the_kept_window(
    issuer: IssuerHarness, clock: FakeClock
) -> None:
    """A verifier that was not running when the revocations happened reads them from the start of the window."""
    async with issuer.client() as http:
        first, second, bob = await users(http)
        assert (await http.delete(f"/auth/sessions/{second.sid}", headers=bearer(first.access))).status_code == 204
        assert (await http.post("/auth/logout-all", headers=bearer(bob.access))).status_code == 204
        async with following(issuer, clock, VERIFIERS) as verifiers:
            for verifier in verifiers:
                for token in (second.access, bob.access):
                    with pytest.raises(Revoked):
                        await verifier.verify(token)
            await accepted_by_all(verifiers, [first.access])
