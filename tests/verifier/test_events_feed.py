"""The verifier following a revocation feed: what it refuses, readiness, the poll loop (paging, long poll,
cursor resets, back-off, Retry-After), the stale policy both ways, the memory bound, and shutdown.

The feed is ``FakeFeed`` (tests/support/verifier.py), served in-process next to the fake issuer's JWKS. Time for
tokens, SETs and lag is the fake clock; the loop itself runs on the real event loop, and tests wait for
conditions (``eventually``) without asserting on how long anything took.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from issuer.verifier import (
    AccessTokenVerifier,
    InvalidClaims,
    JWKSCache,
    RevocationFeed,
    RevocationsUnavailable,
    Revoked,
    VerifierUnavailable,
)
from issuer.verifier.starlette import bearer_middleware, readiness, requires_token
from tests.support.clock import FakeClock
from tests.support.http import bearer
from tests.support.verifier import (
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    JWKS_URI,
    POLL_URI,
    FakeFeed,
    FakeIssuer,
    Sleeps,
    account_purged,
    feed_error,
    feed_verifier_for,
    mint,
    revoked,
    session_revoked,
    until_revoked,
    verifier_for,
    version_raised,
)
from tests.support.waiting import eventually

LIFETIME, LEEWAY, MARGIN = 900, 5, 60


@contextlib.asynccontextmanager
async def running(verifier: AccessTokenVerifier) -> AsyncIterator[RevocationFeed]:
    async with verifier.lifespan():
        assert verifier.events is not None
        yield verifier.events


def unavailable(status: int = 503, retry_after: str | None = None) -> httpx.Response:
    return feed_error(status, "temporarily_unavailable", {"Retry-After": retry_after} if retry_after else None)


# ---------------------------------------------------------------- what is refused


async def test_a_revoked_session_refuses_its_tokens_and_no_others(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock)
    revoked, other_session, other_user = (
        mint(clock, sid="family-1"),
        mint(clock, sid="family-2"),
        mint(clock, sub="user-2", sid="family-3"),
    )
    async with running(verifier) as events:
        assert events.ready
        for token in (revoked, other_session, other_user):
            await verifier.verify(token)
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-1"))
        await until_revoked(verifier, revoked)
        await verifier.verify(other_session)
        await verifier.verify(other_user)
        assert events.stats.tokens_revoked == {"session_revoked": 1}
        assert events.status()["sessions"] == 1


async def test_a_token_version_refuses_lower_versions_of_that_user(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock)
    old, current, newer = (mint(clock, tokenVersion=v, sid=f"f{v}") for v in (2, 3, 4))
    other_user = mint(clock, sub="user-2", tokenVersion=0)
    async with running(verifier):
        await feed.publish(version_raised("e1", clock.wall(), "user-1", 3))
        await until_revoked(verifier, old)
        for token in (current, newer, other_user):
            await verifier.verify(token)


async def test_a_purged_account_refuses_every_token_of_the_user(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock)
    tokens = [mint(clock, sid=f"f{i}", tokenVersion=i) for i in range(3)]
    survivor = mint(clock, sub="user-2")
    async with running(verifier):
        await feed.publish(account_purged("e1", clock.wall(), "user-1"))
        for token in tokens:
            await until_revoked(verifier, token)
        await verifier.verify(survivor)


async def test_the_middleware_answers_a_revoked_token_with_401_invalid_token(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock)

    @requires_token
    async def page(request: Request) -> JSONResponse:
        return JSONResponse({"sub": request.user.identity})

    app = Starlette(routes=[Route("/page", page)], middleware=[bearer_middleware(verifier)])
    token = mint(clock)
    async with running(verifier), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rs") as rs:
        assert (await rs.get("/page", headers=bearer(token))).status_code == 200
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-1"))
        await until_revoked(verifier, token)
        response = await rs.get("/page", headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_token", "error_description": "The access token has been revoked."}
    assert response.headers["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="The access token has been revoked."'
    )


async def test_entries_expire_once_no_token_they_refuse_can_be_valid(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock, token_lifetime=LIFETIME, margin=MARGIN)
    feed.long_poll_wait = 0.02  # each empty long poll ends quickly, and each answer sweeps expired entries
    async with running(verifier) as events:
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-1"))
        token = mint(clock)
        await until_revoked(verifier, token)
        clock.advance(LIFETIME + LEEWAY - 1)  # the last second the token (or any of its session's) is accepted
        with pytest.raises(Revoked):
            await verifier.verify(token)
        assert len(events.state) == 1
        clock.advance(MARGIN + 2)
        # A token of that session minted now (the issuer would not) is accepted: the entry is gone.
        await verifier.verify(mint(clock))
        await eventually(lambda: len(events.state) == 0)


async def test_a_token_living_longer_than_the_window_is_refused(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    """The retention argument needs every token to expire within token_lifetime of its iat."""
    verifier = feed_verifier_for(http, clock, token_lifetime=LIFETIME)
    async with running(verifier):
        await verifier.verify(mint(clock, ttl=LIFETIME))
        with pytest.raises(InvalidClaims, match="token_lifetime"):
            await verifier.verify(mint(clock, ttl=LIFETIME + 1))


# ---------------------------------------------------------------- readiness


async def test_not_ready_until_the_first_sync_then_ready(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    for i in range(250):
        feed.add(f"e{i}", feed.sign(session_revoked(f"e{i}", clock.wall(), f"user-{i}", f"family-{i}")))
    feed.failure = lambda request: unavailable()
    verifier = feed_verifier_for(http, clock, max_events=100, startup_wait=0.05)
    app = Starlette(routes=[Route("/readyz", readiness(verifier))])
    assert not verifier.ready
    async with (
        running(verifier) as events,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rs") as rs,
    ):
        await eventually(lambda: events.stats.errors >= 2)
        assert verifier.jwks.usable
        assert not events.synced
        assert not verifier.ready
        response = await rs.get("/readyz")
        assert response.status_code == 503
        assert response.json()["events"]["synced"] is False
        # Not caught up: the lag counts from start-up.
        clock.advance(7)
        assert events.lag == pytest.approx(7)

        feed.failure = None
        await eventually(lambda: verifier.ready)
        response = await rs.get("/readyz")
        assert response.status_code == 200
        assert response.json()["events"]["entries"] == 250
        assert events.lag == 0  # a long poll is open in a caught-up state
    bodies = [poll for poll in feed.polls if "cursor" in poll or not poll["returnImmediately"]]
    # After the failures: three pages read at once (100, 100, 50), then long polls.
    assert [(p.get("cursor"), p["returnImmediately"]) for p in bodies[:3]] == [
        (f"{CLIENT_ID}.100", True),
        (f"{CLIENT_ID}.200", True),
        (f"{CLIENT_ID}.250", False),
    ]
    assert all(poll["maxEvents"] == 100 for poll in feed.polls)


async def test_the_lifespan_waits_for_the_first_sync(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock) -> None:
    feed.add("e0", feed.sign(session_revoked("e0", clock.wall(), "user-1", "family-1")))
    verifier = feed_verifier_for(http, clock)
    async with running(verifier) as events:
        # No waiting here: the first request after start-up already knows the revocation.
        assert events.synced
        with pytest.raises(Revoked):
            await verifier.verify(mint(clock))


async def test_the_poll_url_is_discovered_and_the_client_authenticates(
    fake: FakeIssuer, http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock)
    async with running(verifier) as events:
        assert events.poll_url == POLL_URI
    polls = [r for r in fake.requests if str(r.url) == POLL_URI]
    assert polls
    assert all(r.method == "POST" and r.headers["content-type"] == "application/json" for r in polls)
    # RFC 6749 2.3.1: the secret is form-urlencoded inside Basic (FakeFeed decodes it that way).
    assert all(feed._client(r) == CLIENT_ID for r in polls)


async def test_the_poll_url_defaults_to_the_issuers_events_poll(
    fake: FakeIssuer, http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    """A metadata document without security_event_poll_endpoint: ISSUER_URL + /events/poll."""
    original = fake.handle

    async def without_poll_endpoint(request: httpx.Request) -> httpx.Response:
        response = await original(request)
        if request.url.path.endswith("oauth-authorization-server"):
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": fake.jwks_uri})
        return response

    client = httpx.AsyncClient(transport=httpx.MockTransport(without_poll_endpoint))
    async with client, running(feed_verifier_for(client, clock)) as events:
        assert events.synced
        assert events.poll_url == f"{ISSUER}/events/poll"


async def test_bad_credentials_are_logged_and_retried_with_backoff(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    sleeps = Sleeps()
    verifier = feed_verifier_for(http, clock, client_secret="wrong", sleeps=sleeps, startup_wait=0)
    with caplog.at_level(logging.ERROR, "issuer.verifier.events"):
        async with running(verifier) as events:
            await eventually(lambda: len(sleeps.delays) >= 3)
            assert not events.synced
            assert events.stats.last_error == "FeedError: HTTP 401 invalid_client"
    assert "check its credentials" in caplog.text
    assert CLIENT_SECRET not in caplog.text
    assert "wrong" not in caplog.text


# ---------------------------------------------------------------- the loop


async def test_a_long_poll_is_answered_by_a_publish(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock) -> None:
    feed.long_poll_wait = 60  # the fake holds an empty poll far longer than the test waits
    verifier = feed_verifier_for(http, clock)
    token = mint(clock)
    async with running(verifier):
        await eventually(lambda: feed.open_polls == 1)
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-1"))
        await until_revoked(verifier, token)


async def test_cursor_expired_resynchronises_from_the_start_of_the_window(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    feed.long_poll_wait = 0.02
    sleeps = Sleeps()
    for i in range(3):
        feed.add(f"e{i}", feed.sign(session_revoked(f"e{i}", clock.wall(), "user-1", f"old-{i}")))
    verifier = feed_verifier_for(http, clock, sleeps=sleeps)
    async with running(verifier) as events:
        assert events.cursor == f"{CLIENT_ID}.3"
        # The verifier falls behind the kept window: its cursor now points before the oldest kept event.
        for i in range(3, 6):
            feed.add(f"e{i}", feed.sign(session_revoked(f"e{i}", clock.wall(), "user-1", f"new-{i}")))
        feed.forget_before(4)
        await eventually(lambda: events.stats.cursor_resets == 1)
        await eventually(lambda: events.cursor == f"{CLIENT_ID}.6")
        await until_revoked(verifier, mint(clock, sid="new-5"))
        await until_revoked(verifier, mint(clock, sid="new-4"))
        assert sleeps.delays == []  # a reset is not an error: no back-off
    assert len([poll for poll in feed.polls if "cursor" not in poll]) == 2  # the first poll, and the reset


async def test_a_refused_cursor_is_dropped_and_the_window_read_again(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    feed.long_poll_wait = 0.02
    verifier = feed_verifier_for(http, clock)
    async with running(verifier) as events:
        polls = len(feed.polls)
        feed.answers.append(feed_error(400, "invalid_request"))  # the issuer no longer takes our cursor as ours
        await eventually(lambda: events.stats.cursor_resets == 1)
        await eventually(lambda: len(feed.polls) >= polls + 3)
        assert events.stats.last_error == "FeedError: the issuer refused our cursor (invalid_request)"
    assert feed.polls[polls].get("cursor") == f"{CLIENT_ID}.0"
    assert "cursor" not in feed.polls[polls + 1]


async def test_errors_back_off_exponentially_with_jitter(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    feed.failure = lambda request: unavailable()
    draws = iter([0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0] + [0.5] * 1000)
    sleeps = Sleeps()
    verifier = feed_verifier_for(
        http, clock, sleeps=sleeps, jitter=lambda: next(draws), initial_backoff=1, max_backoff=8, startup_wait=0
    )
    async with running(verifier):
        await eventually(lambda: len(sleeps.delays) >= 8)
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    for delay, ceiling, draw in zip(sleeps.delays, ceilings, [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0], strict=False):
        assert delay == ceiling / 2 + draw * ceiling / 2
    assert len(set(sleeps.delays[3:8])) == 3  # at the ceiling, jitter still spreads the replicas out


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock, status: int) -> None:
    feed.answers = [unavailable(status, "17"), unavailable(status, "100000")]
    sleeps = Sleeps()
    verifier = feed_verifier_for(http, clock, sleeps=sleeps, max_retry_after=300)
    async with running(verifier) as events:
        assert events.synced
    assert sleeps.delays == [17, 300]  # at least Retry-After, capped by max_retry_after


async def test_a_malformed_answer_is_an_error_not_a_crash(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    feed.answers = [
        httpx.Response(200, content=b"not json"),
        httpx.Response(200, json=[]),
        httpx.Response(200, json={"sets": [], "moreAvailable": False, "cursor": "x"}),
        httpx.Response(200, json={"sets": {}, "moreAvailable": "no", "cursor": "x"}),
        httpx.Response(200, json={"sets": {}, "moreAvailable": False}),
        httpx.Response(200, content=b"x" * 4096),
    ]
    sleeps = Sleeps()
    verifier = feed_verifier_for(http, clock, sleeps=sleeps, max_response_bytes=1024)
    async with running(verifier) as events:
        assert events.synced
        assert events.stats.errors == 6
        assert events.cursor == f"{CLIENT_ID}.0"
    assert len(sleeps.delays) == 6


async def test_a_network_failure_keeps_what_is_known(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock) -> None:
    feed.long_poll_wait = 0.02
    verifier = feed_verifier_for(http, clock)
    token = mint(clock)
    async with running(verifier) as events:
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-1"))
        await until_revoked(verifier, token)

        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        feed.failure = refuse
        await eventually(lambda: events.stats.errors >= 2)
        assert await revoked(verifier, token)
        assert events.stats.last_error is not None
        assert "ConnectError" in events.stats.last_error


# ---------------------------------------------------------------- the stale policy


async def fall_behind(events: RevocationFeed, feed: FakeFeed, clock: FakeClock, seconds: float) -> None:
    """Make the feed unreachable and let ``seconds`` pass since the verifier was last caught up."""
    feed.failure = lambda request: unavailable()
    errors = events.stats.errors
    await eventually(lambda: events.stats.errors > errors)
    clock.advance(seconds)


async def test_stale_with_accept_keeps_verifying_and_logs(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    feed.long_poll_wait = 0.02
    verifier = feed_verifier_for(http, clock, max_lag=30)
    assert verifier.events is not None
    assert verifier.events.on_stale == "accept"  # the default
    known = mint(clock, sid="family-9")
    async with running(verifier) as events:
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-9"))
        await until_revoked(verifier, known)
        await fall_behind(events, feed, clock, 31)
        assert events.stale
        assert events.lag >= 31
        assert verifier.ready  # accept: still serving
        with caplog.at_level(logging.WARNING, "issuer.verifier.events"):
            token = mint(clock, sid="family-2")
            await verifier.verify(token)
            await verifier.verify(token)
        assert caplog.text.count("accepting tokens on what is known") == 1  # rate-limited
        assert events.stats.accepted_while_stale == 2
        assert await revoked(verifier, known)  # what is known is still enforced

        feed.failure = None
        await eventually(lambda: not events.stale)
        assert events.status()["lag_seconds"] == 0


async def test_stale_with_reject_refuses_with_a_retryable_503(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    feed.long_poll_wait = 0.02
    verifier = feed_verifier_for(http, clock, max_lag=30, on_stale="reject")

    @requires_token
    async def page(request: Request) -> JSONResponse:
        return JSONResponse({"sub": request.user.identity})

    app = Starlette(
        routes=[Route("/page", page), Route("/readyz", readiness(verifier))], middleware=[bearer_middleware(verifier)]
    )
    token = mint(clock)
    async with (
        running(verifier) as events,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rs") as rs,
    ):
        assert (await rs.get("/page", headers=bearer(token))).status_code == 200
        await fall_behind(events, feed, clock, 29)
        assert (await rs.get("/page", headers=bearer(token))).status_code == 200  # within max_lag
        clock.advance(2)
        with pytest.raises(RevocationsUnavailable) as caught:
            await verifier.verify(token)
        assert isinstance(caught.value, VerifierUnavailable)
        response = await rs.get("/page", headers=bearer(token))
        assert response.status_code == 503
        assert response.json()["error"] == "temporarily_unavailable"
        assert int(response.headers["retry-after"]) >= 1
        assert not verifier.ready
        assert (await rs.get("/readyz")).status_code == 503

        feed.failure = None
        await eventually(lambda: verifier.ready)
        assert (await rs.get("/page", headers=bearer(token))).status_code == 200


async def test_reject_refuses_before_the_first_sync(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock) -> None:
    feed.failure = lambda request: unavailable()
    verifier = feed_verifier_for(http, clock, on_stale="reject", startup_wait=0)
    async with running(verifier):
        with pytest.raises(RevocationsUnavailable):
            await verifier.verify(mint(clock))
        feed.failure = None
        await eventually(lambda: verifier.ready)
        await verifier.verify(mint(clock))


# ---------------------------------------------------------------- memory


async def test_a_flood_through_the_feed_stays_under_the_cap(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    """20,000 signed SETs through the feed (signing them is the slow part, about 0.3 ms each;
    test_events_state.py floods the state itself with 100,000)."""
    flood, cap = 20_000, 2_000
    start = clock.wall()
    for i in range(flood):
        at = start + i // 1000  # twenty seconds of events
        feed.add(f"e{i}", feed.sign(session_revoked(f"e{i}", at, f"user-{i}", f"family-{i}")))
    clock.advance(20)
    verifier = feed_verifier_for(http, clock, max_entries=cap, max_events=1000)
    sizes: list[int] = []
    async with running(verifier) as events:
        original = events.state.apply

        def watched(event: object, now: float) -> bool:
            changed = original(event, now)  # type: ignore[arg-type]
            sizes.append(len(events.state))
            return changed

        events.state.apply = watched  # type: ignore[method-assign]
        await feed.publish(session_revoked("last", clock.wall(), "user-x", "family-x"))
        await until_revoked(verifier, mint(clock, sub="user-x", sid="family-x"))
        assert len(events.state) <= cap
        assert events.state.evictions == flood + 1 - cap
        assert events.status()["evictions"] == flood + 1 - cap
        assert len(events.state._heap) <= 2 * cap + 1024
        # Kept: the newest revocations. Evicted ones are refused through the floor, with every token as old.
        await until_revoked(verifier, mint(clock, sub=f"user-{flood - 1}", sid=f"family-{flood - 1}"))
        with pytest.raises(Revoked):
            await verifier.verify(mint(clock, iat=int(start), exp=int(start) + 900))
        # A token issued after the floor is unaffected.
        await verifier.verify(mint(clock, sub="user-new", sid="family-new"))
    assert sizes
    assert max(sizes) <= cap


# ---------------------------------------------------------------- shutdown


async def test_shutdown_stops_an_open_long_poll_cleanly(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    feed.long_poll_wait = 60
    verifier = feed_verifier_for(http, clock)
    async with running(verifier) as events:
        await eventually(lambda: feed.open_polls == 1)
        task = events._task
        assert task is not None
    assert task.done()
    assert task.cancelled()
    assert feed.open_polls == 0
    assert not http.is_closed  # given, not owned: left open
    await verifier.aclose()  # idempotent


async def test_shutdown_during_backoff_and_with_an_owned_client(http: httpx.AsyncClient, clock: FakeClock) -> None:
    # The feed's own client reaches no server (nothing listens on port 1): an error, then a long back-off
    # (real asyncio.sleep) that shutdown must cut short.
    events = RevocationFeed(
        CLIENT_ID, CLIENT_SECRET, poll_url="http://127.0.0.1:1/events/poll", startup_wait=0, initial_backoff=60
    )
    jwks = JWKSCache(jwks_uri=JWKS_URI, http_client=http, monotonic=clock.monotonic)
    verifier = AccessTokenVerifier(issuer=ISSUER, audience="api", jwks=jwks, events=events)
    async with verifier.lifespan():
        await eventually(lambda: events.stats.errors >= 1)
        task = events._task
    assert task is not None
    assert task.done()
    assert events._http is None
    assert not verifier.ready


# ---------------------------------------------------------------- wiring


def test_one_feed_per_verifier(http: httpx.AsyncClient, clock: FakeClock) -> None:
    verifier = feed_verifier_for(http, clock)
    with pytest.raises(ValueError, match="already belongs"):
        AccessTokenVerifier(issuer=ISSUER, audience="api", events=verifier.events)
    assert "iat" in verifier.required_claims


def test_a_verifier_without_a_feed_is_unchanged(http: httpx.AsyncClient, clock: FakeClock) -> None:
    verifier = verifier_for(http, clock)
    assert verifier.events is None
    assert "events" not in verifier.status()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_stale": "ignore"}, "on_stale"),
        ({"token_lifetime": 0}, "token_lifetime"),
        ({"max_events": 0}, "max_events"),
        ({"max_events": 1001}, "max_events"),
        ({"max_entries": 0}, "max_entries"),
    ],
)
def test_bad_feed_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RevocationFeed(CLIENT_ID, CLIENT_SECRET, **options)  # type: ignore[arg-type]
