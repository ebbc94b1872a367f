"""The JWKS cache's rules, against a scriptable fake issuer and simulated time (no database, no sleeping).

Every count below is of requests the fake issuer actually received. A stale lookup of a known kid revalidates in
the background, so tests that count its requests first ``settle`` the cache.
"""

from __future__ import annotations

import asyncio
import gc
import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, OctKey

from issuer.verifier import JWKSCache, KeysUnavailable, TokenError, UnknownKey
from tests.support.clock import FakeClock
from tests.support.jwt import b64url_json, kid_of
from tests.support.verifier import (
    ISSUER,
    JWKS_URI,
    FakeIssuer,
    header_for,
    mint,
    private_jwk,
    private_key,
    public_jwk,
    verifier_for,
)


@pytest.fixture(autouse=True)
def no_orphaned_tasks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A background fetch must not be collected while pending nor leave an exception unretrieved.

    asyncio reports both through its logger ("Task was destroyed but it is pending!", "Task exception was never
    retrieved"), not as warnings, so ``filterwarnings = error`` would not catch them.
    """
    yield
    gc.collect()
    logged = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    assert [r.getMessage() for r in logged if r.name == "asyncio"] == []


async def settle(cache: JWKSCache) -> None:
    """Wait for the fetch in flight, if any (a stale lookup of a known kid no longer waits for it)."""
    if cache._inflight is not None:
        await cache._inflight


def with_kid(token: str, kid: str) -> str:
    """The same token under another kid (signature untouched: the kid is looked up before it is checked)."""
    _, payload, signature = token.split(".")
    return f"{b64url_json(header_for(private_key(0), kid=kid))}.{payload}.{signature}"


# ---------------------------------------------------------------- freshness, Cache-Control, ETag


async def test_a_fresh_set_is_served_without_fetching(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock)
    for _ in range(3):
        assert (await verifier.verify(mint(clock))).sub == "user-1"
    assert len(fake.jwks_requests) == 1
    clock.advance(299)
    await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 1
    clock.advance(1)  # max-age=300 is over: one revalidation
    await verifier.verify(mint(clock))
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    assert len(fake.jwks_requests) == 2


@pytest.mark.parametrize(
    ("cache_control", "age", "lifetime"),
    [
        pytest.param("public, max-age=600", None, 600, id="max-age-honoured"),
        pytest.param("public, max-age=9", None, 9, id="short-max-age-honoured"),
        pytest.param("public, max-age=1", None, 1, id="one-second-honoured"),
        pytest.param("max-age=0", None, 1, id="zero-is-the-floor"),
        pytest.param("public, max-age=999999999", None, 86400, id="too-long-clamped-down"),
        pytest.param(None, None, 300, id="absent-default"),
        pytest.param("public", None, 300, id="no-max-age-default"),
        pytest.param("max-age=soon", None, 300, id="malformed-default"),
        pytest.param("max-age=-5", None, 300, id="negative-default"),
        pytest.param("no-store", None, 1, id="no-store-is-the-floor"),
        pytest.param("no-cache, max-age=600", None, 1, id="no-cache-is-the-floor"),
        pytest.param("public, max-age=300", "200", 100, id="age-is-subtracted"),
        pytest.param("public, max-age=300", "400", 1, id="older-than-max-age-is-the-floor"),
        pytest.param('max-age="120"', None, 120, id="quoted"),
    ],
)
async def test_cache_control_sets_the_lifetime_within_bounds(
    fake: FakeIssuer,
    http: httpx.AsyncClient,
    clock: FakeClock,
    cache_control: str | None,
    age: str | None,
    lifetime: int,
) -> None:
    fake.cache_control = cache_control
    if age is not None:
        original = fake.handle

        async def aged(request: httpx.Request) -> httpx.Response:
            response = await original(request)
            response.headers["Age"] = age
            return response

        fake.handle = aged  # type: ignore[method-assign]
        http = httpx.AsyncClient(transport=httpx.MockTransport(fake.handle))
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    clock.advance(lifetime - 1)
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    assert len(fake.jwks_requests) == 1, "refetched before the lifetime ended"
    clock.advance(1)
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    assert len(fake.jwks_requests) == 2, "did not refetch when the lifetime ended"
    await http.aclose()


def cache_for(http: httpx.AsyncClient, clock: FakeClock, **options: Any) -> JWKSCache:
    return JWKSCache(jwks_uri=JWKS_URI, http_client=http, monotonic=clock.monotonic, **options)


async def test_a_short_max_age_is_honoured_across_a_rotation(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """JWKS_MAX_AGE=10, KEY_PUBLISH_LEAD=20, KEY_RELOAD_INTERVAL=10: the issuer serves max-age=9 (its
    ``jwks_max_age``), and a key published just after our fetch signs 20 s later. Keeping the set longer than
    9 s (the old 30 s floor) meets the new kid inside the unknown-kid cooldown and refuses a valid token."""
    fake.cache_control = "public, max-age=9"
    cache = cache_for(http, clock)
    old, new = kid_of(private_key(0)), kid_of(private_key(1))
    assert (await cache.get_key(old)).kid == old  # t=0: fetched just before the rotation
    fake.keys = [public_jwk(private_key(0)), public_jwk(private_key(1))]  # published now, signs at t=20
    clock.advance(5)
    assert (await cache.get_key(old)).kid == old  # fresh: no fetch
    clock.advance(16)  # t=21: a token signed at t=20 by the new key
    assert (await cache.get_key(new)).kid == new
    assert len(fake.jwks_requests) == 2  # the one scheduled refetch...
    assert cache.stats.unknown_kid_refetches == 0  # ...and no unplanned one: the contract's promise
    await cache.aclose()


async def test_freshness_is_counted_from_the_request_not_the_answer(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """A slow answer is that much older (RFC 9111 4.2.3): its max-age must not stretch past the issuer's window."""
    fake.cache_control = "public, max-age=9"
    fake.gate = asyncio.Event()
    cache = cache_for(http, clock)
    known = kid_of(private_key(0))
    first = asyncio.create_task(cache.get_key(known))
    for _ in range(10):
        await asyncio.sleep(0)
    clock.advance(4)  # the issuer takes 4 s to answer
    fake.gate.set()
    assert (await first).kid == known
    clock.advance(4)  # t=8 since the request: fresh
    assert cache.peek(known) is not None
    clock.advance(1)  # t=9: stale, though the answer is only 5 s old
    assert cache.peek(known) is None
    await cache.get_key(known)
    await settle(cache)
    assert len(fake.jwks_requests) == 2
    await cache.aclose()


@pytest.mark.parametrize("cache_control", ["max-age=0", "no-cache", "no-store", "public, max-age=300, no-cache"])
@pytest.mark.parametrize("min_ttl", [None, 5.0], ids=["default-floor", "floor-5s"])
async def test_max_age_zero_or_no_cache_cost_at_most_one_fetch_per_min_ttl(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock, cache_control: str, min_ttl: float | None
) -> None:
    fake.cache_control = cache_control
    cache = cache_for(http, clock) if min_ttl is None else cache_for(http, clock, min_ttl=min_ttl)
    known, duration, step = kid_of(private_key(0)), 20.0, 0.25
    for _ in range(int(duration / step)):
        lookups = [cache.get_key(known) for _ in range(50)]
        lookups += [cache.get_key(secrets.token_urlsafe(8)) for _ in range(10)]  # forged kids on top
        outcomes = await asyncio.gather(*lookups, return_exceptions=True)
        assert {getattr(o, "kid", None) for o in outcomes[:50]} == {known}
        assert all(isinstance(o, UnknownKey) for o in outcomes[50:])
        await settle(cache)
        clock.advance(step)
    floor = cache.min_ttl
    assert floor == (min_ttl or 1.0)
    assert duration / floor - 1 <= len(fake.jwks_requests) <= duration / floor + 1, len(fake.jwks_requests)
    assert cache.stats.unknown_kid_refetches == 0
    await cache.aclose()


async def test_etag_revalidation_keeps_the_keys_and_extends_freshness(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    etag = (await http.get(JWKS_URI)).headers["etag"]
    fake.requests.clear()

    clock.advance(300)
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    (revalidation,) = fake.jwks_requests
    assert revalidation.headers["if-none-match"] == etag
    assert verifier.jwks.stats.not_modified == 1
    clock.advance(299)  # the 304's max-age made the set fresh again
    await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 1

    # Control: a changed document is a 200 with the new set, under a new ETag.
    fake.keys = [public_jwk(private_key(1))]
    clock.advance(1)
    assert (await verifier.verify(mint(clock, private_key(1)))).sub == "user-1"
    assert verifier.jwks.stats.not_modified == 1
    with pytest.raises(UnknownKey):
        await verifier.verify(mint(clock))  # key 0 left the JWKS


async def test_no_conditional_request_without_an_etag(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    fake.etags = False
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    clock.advance(300)
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    assert [r.headers.get("if-none-match") for r in fake.jwks_requests] == [None, None]


# ---------------------------------------------------------------- bad answers keep the keys


def _status(code: int, **headers: str) -> Any:
    return lambda request: httpx.Response(code, headers=headers)


def _body(content: bytes | str, content_type: str = "application/json") -> Any:
    data = content.encode() if isinstance(content, str) else content
    return lambda request: httpx.Response(200, content=data, headers={"Content-Type": content_type})


def _jwks(*keys: dict[str, Any]) -> Any:
    return _body(json.dumps({"keys": list(keys)}))


def _raise(error: type[httpx.TransportError]) -> Any:
    def respond(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    return respond


def _ec_jwk() -> dict[str, Any]:
    return {**ECKey.generate_key("P-256").as_dict(private=False), "kid": "ec-key", "use": "sig", "alg": "ES256"}


def _oct_jwk() -> dict[str, Any]:
    return {**OctKey.generate_key(256).as_dict(private=True), "kid": kid_of(private_key(1)), "alg": "HS256"}


GARBAGE = [
    pytest.param(_body("<html><body>502 Bad Gateway</body></html>", "text/html"), id="html"),
    pytest.param(_body('{"issuer": "https://issuer.test"}'), id="json-without-keys"),
    pytest.param(_body('{"keys": {"kid": "x"}}'), id="keys-not-a-list"),
    pytest.param(_body('{"keys": []}'), id="no-keys"),
    pytest.param(_body("[]"), id="json-array"),
    pytest.param(_body(b"\xff\xfe{not utf-8"), id="not-utf8"),
    pytest.param(_body("[" * 200_000), id="absurdly-nested"),
    pytest.param(_body('{"keys": [nan]}'), id="invalid-json"),
    pytest.param(lambda request: _jwks(private_jwk(private_key(1)))(request), id="key-with-private-members"),
    pytest.param(lambda request: _jwks(public_jwk(private_key(2, 1024)))(request), id="1024-bit-key"),
    pytest.param(lambda request: _jwks(_ec_jwk())(request), id="ec-key"),
    pytest.param(lambda request: _jwks(_oct_jwk())(request), id="symmetric-key"),
    pytest.param(lambda request: _jwks(public_jwk(private_key(1), alg="RS512"))(request), id="rs512-key"),
    pytest.param(lambda request: _jwks(public_jwk(private_key(1), use="enc"))(request), id="encryption-key"),
    pytest.param(lambda request: _jwks(public_jwk(private_key(1), kid=None))(request), id="key-without-kid"),
    pytest.param(lambda request: _jwks(public_jwk(private_key(1), n="not base64!"))(request), id="bad-modulus"),
    pytest.param(lambda request: _jwks(public_jwk(private_key(1), key_ops=["encrypt"]))(request), id="key-ops"),
    pytest.param(
        lambda request: _jwks(public_jwk(private_key(1)), public_jwk(private_key(2), kid=kid_of(private_key(1))))(
            request
        ),
        id="two-keys-one-kid",
    ),
    pytest.param(_status(500), id="500"),
    pytest.param(_status(503, **{"Retry-After": "5"}), id="503"),
    pytest.param(_status(404), id="404"),
    pytest.param(_status(302, Location="https://elsewhere.test/jwks.json"), id="redirect-not-followed"),
    pytest.param(_raise(httpx.ConnectError), id="connect-error"),
    pytest.param(_raise(httpx.ReadTimeout), id="read-timeout"),
    pytest.param(_raise(httpx.RemoteProtocolError), id="protocol-error"),
    pytest.param(_body(json.dumps({"keys": [public_jwk(private_key(1))], "pad": "x" * 300_000})), id="oversize-body"),
]


@pytest.mark.parametrize("answer", GARBAGE)
async def test_a_bad_answer_keeps_the_cached_keys_and_backs_off(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock, answer: Any
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    fake.failure = answer
    clock.advance(300)

    # Stale, the refetch fails: the cached key still verifies, and nothing from the bad answer is trusted.
    assert (await verifier.verify(mint(clock))).sub == "user-1"
    await settle(verifier.jwks)
    assert verifier.jwks.stats.failures == 1
    error = verifier.jwks.stats.last_error
    assert error
    assert not error.startswith("unexpected"), error  # a bug in the test's answer would pass silently otherwise
    assert verifier.jwks.kids == {kid_of(private_key(0))}
    with pytest.raises(UnknownKey):
        await verifier.verify(mint(clock, private_key(1)))
    assert len(fake.jwks_requests) == 2

    # No new attempt within the failure back-off (10 s), however many requests arrive...
    clock.advance(9)
    for _ in range(20):
        await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 2
    # ...and one after it.
    clock.advance(1)
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    assert len(fake.jwks_requests) == 3


async def test_a_good_answer_replaces_the_set(fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock) -> None:
    """Control for the test above: the same path with a valid answer does change the keys."""
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    fake.failure = _jwks(public_jwk(private_key(1)))
    clock.advance(300)
    assert (await verifier.verify(mint(clock, private_key(1)))).sub == "user-1"
    with pytest.raises(UnknownKey):
        await verifier.verify(mint(clock))
    assert verifier.jwks.stats.failures == 0


async def test_unusable_entries_are_skipped_not_fatal(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    good = public_jwk(private_key(0))
    fake.keys = [
        private_jwk(private_key(1)),
        _ec_jwk(),
        public_jwk(private_key(2, 1024)),
        "not an object",  # type: ignore[list-item]
        good,
        {**public_jwk(private_key(1)), "use": "enc"},
    ]
    verifier = verifier_for(http, clock)
    assert (await verifier.verify(mint(clock))).sub == "user-1"
    assert verifier.jwks.kids == {good["kid"]}
    assert verifier.jwks.stats.failures == 0
    # The key with private members was skipped, so its own tokens are refused.
    with pytest.raises(UnknownKey):
        await verifier.verify(mint(clock, private_key(1)))


async def test_only_public_members_are_imported(fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    key = verifier.jwks.peek(kid_of(private_key(0)))
    assert key is not None
    assert not key.is_private
    assert set(key.as_dict(private=False)) >= {"kty", "n", "e"}


async def test_a_hanging_issuer_times_out_and_keeps_the_keys(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    verifier = verifier_for(http, clock, fetch_timeout=0.05)
    await verifier.verify(mint(clock))
    fake.failure = hang
    clock.advance(300)
    assert (await verifier.verify(mint(clock))).sub == "user-1"
    await settle(verifier.jwks)
    assert verifier.jwks.stats.failures == 1


async def test_a_declared_oversize_body_is_not_read(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock, max_response_bytes=4096)
    fake.keys = [public_jwk(private_key(0)), *[public_jwk(private_key(1), kid=f"k{i}") for i in range(20)]]
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))
    assert "exceeds" in (verifier.jwks.stats.last_error or "")


# ---------------------------------------------------------------- one fetch in flight


@pytest.mark.parametrize("discover", [False, True], ids=["jwks_uri", "discovery"])
async def test_concurrent_verifications_on_a_cold_cache_share_one_fetch(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock, discover: bool
) -> None:
    fake.gate = asyncio.Event()
    verifier = verifier_for(http, clock, discover=discover)
    tokens = [mint(clock) for _ in range(5)]
    pending = asyncio.gather(*(verifier.verify(tokens[i % 5]) for i in range(100)))
    for _ in range(10):
        await asyncio.sleep(0)  # let all 100 reach the cache while the one request is held
    assert len(fake.jwks_requests) == 1
    fake.gate.set()
    results = await pending
    assert {r.sub for r in results} == {"user-1"}
    assert len(fake.jwks_requests) == 1
    assert len(fake.metadata_requests) == (1 if discover else 0)


async def test_concurrent_revalidation_and_concurrent_failure_are_one_request_each(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    clock.advance(300)
    token = mint(clock)
    await asyncio.gather(*(verifier.verify(token) for _ in range(100)))
    assert len(fake.jwks_requests) == 2

    cold = verifier_for(http, clock)
    fake.failure = _raise(httpx.ConnectError)
    outcomes = await asyncio.gather(*(cold.verify(token) for _ in range(100)), return_exceptions=True)
    assert all(isinstance(o, KeysUnavailable) for o in outcomes), outcomes[:3]
    assert len(fake.jwks_requests) == 3


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    fake.gate = asyncio.Event()
    verifier = verifier_for(http, clock)
    token = mint(clock)
    first = asyncio.create_task(verifier.verify(token))
    second = asyncio.create_task(verifier.verify(token))
    for _ in range(5):
        await asyncio.sleep(0)
    first.cancel()
    fake.gate.set()
    assert (await second).sub == "user-1"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len(fake.jwks_requests) == 1


# ---------------------------------------------------------------- forged kids


async def flood(verifier: Any, token: str, count: int = 1000) -> None:
    kids = {secrets.token_urlsafe(32) for _ in range(count)}
    assert len(kids) == count
    outcomes = await asyncio.gather(*(verifier.verify(with_kid(token, kid)) for kid in kids), return_exceptions=True)
    assert all(isinstance(o, UnknownKey) for o in outcomes), {type(o) for o in outcomes}


async def test_a_flood_of_forged_kids_costs_one_refetch_per_cooldown(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock)
    token = mint(clock)
    await verifier.verify(token)
    assert len(fake.jwks_requests) == 1

    await flood(verifier, token)  # the set was fetched just now: no refetch at all
    assert len(fake.jwks_requests) == 1

    clock.advance(30)
    await flood(verifier, token)
    assert len(fake.jwks_requests) == 2
    assert verifier.jwks.stats.unknown_kid_refetches == 1

    clock.advance(29)
    await flood(verifier, token)
    assert len(fake.jwks_requests) == 2

    clock.advance(1)
    for _ in range(3):  # sequential floods in the same second: still one
        await flood(verifier, token, 300)
    assert len(fake.jwks_requests) == 3

    # Meanwhile real tokens never stopped verifying.
    assert (await verifier.verify(mint(clock))).sub == "user-1"


async def test_an_unknown_kid_refetch_finds_a_real_new_key(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Control: the refetch the flood is denied is a real one (a key published without notice is found)."""
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    fake.keys = [public_jwk(private_key(0)), public_jwk(private_key(1))]
    with pytest.raises(UnknownKey):  # within the cooldown of the first fetch
        await verifier.verify(mint(clock, private_key(1)))
    clock.advance(30)
    assert (await verifier.verify(mint(clock, private_key(1)))).sub == "user-1"
    assert verifier.jwks.stats.unknown_kid_refetches == 1


# ---------------------------------------------------------------- issuer down, stale limit


async def test_issuer_down_cached_keys_work_until_the_stale_limit_then_fail_closed(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock, stale_limit=3600, failure_backoff=10)
    await verifier.verify(mint(clock))
    fake.failure = _raise(httpx.ConnectError)

    elapsed = 0
    for step in (300, *[60] * 59, 59):  # fresh for 300 s, then 3599 s of stale use
        clock.advance(step)
        elapsed += step
        assert (await verifier.verify(mint(clock))).sub == "user-1", elapsed
        await settle(verifier.jwks)
    assert elapsed == 300 + 3600 - 1
    attempts = len(fake.jwks_requests) - 1
    assert 1 <= attempts <= (elapsed - 300) / 10 + 1, attempts  # the outage was not hammered

    clock.advance(1)  # the stale limit
    with pytest.raises(KeysUnavailable) as refused:
        await verifier.verify(mint(clock))
    assert refused.value.reason == "keys_unavailable"
    assert "stale limit" in refused.value.detail
    assert not isinstance(refused.value, TokenError)  # not the token's fault: a 503, not a 401
    assert refused.value.retry_after >= 1

    fake.failure = None  # the issuer is back: the next attempt after the back-off recovers
    clock.advance(10)
    assert (await verifier.verify(mint(clock))).sub == "user-1"


async def test_stale_limit_zero_fails_closed_at_once(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Control: the stale allowance is what kept the test above passing."""
    verifier = verifier_for(http, clock, stale_limit=0)
    await verifier.verify(mint(clock))
    fake.failure = _raise(httpx.ConnectError)
    clock.advance(300)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))


async def test_cold_cache_with_the_issuer_down(fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock) -> None:
    fake.failure = _raise(httpx.ConnectError)
    verifier = verifier_for(http, clock)
    with pytest.raises(KeysUnavailable, match="No signing keys"):
        await verifier.verify(mint(clock))
    with pytest.raises(KeysUnavailable):  # within the back-off: no second request
        await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 1


async def test_a_304_without_a_cached_set_is_a_failure(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    fake.failure = _status(304)
    verifier = verifier_for(http, clock)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))
    assert "304" in (verifier.jwks.stats.last_error or "")


# ---------------------------------------------------------------- stale-while-revalidate


async def test_a_hanging_issuer_does_not_hold_up_known_kids_on_a_stale_set(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    """An issuer that accepts the connection and never answers: requests whose key we hold must not wait."""
    verifier = verifier_for(http, clock, fetch_timeout=0.2)
    await verifier.verify(mint(clock))
    fake.gate = asyncio.Event()  # never set: every JWKS request hangs until the fetch times out
    clock.advance(300)
    tokens = [mint(clock) for _ in range(5)]
    for _ in range(3):
        results = await asyncio.gather(*(verifier.verify(tokens[i % 5]) for i in range(100)))
        assert {r.sub for r in results} == {"user-1"}
        for _ in range(10):
            await asyncio.sleep(0)  # let the background fetch reach the issuer
        # All of them were answered while the one revalidation is still hanging (it ends only by failing).
        assert len(fake.jwks_requests) == 2
        assert verifier.jwks.stats.failures == 0
    await verifier.aclose()  # cancels the hanging fetch; no task is left pending
    assert verifier.jwks._inflight is None
    assert verifier.jwks.stats.failures == 0


async def test_a_fresh_set_never_waits_for_a_fetch_in_flight(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cache = cache_for(http, clock, fetch_timeout=0.2)
    known = kid_of(private_key(0))
    await cache.get_key(known)
    fake.gate = asyncio.Event()
    clock.advance(30)  # still fresh, past the unknown-kid cooldown: a forged kid starts a (hanging) refetch
    forged = asyncio.create_task(cache.get_key("forged"))
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(fake.jwks_requests) == 2
    assert not forged.done()  # the unknown kid does wait for the refetch
    assert (await cache.get_key(known)).kid == known  # the known one does not
    assert not forged.done()
    assert cache.stats.failures == 0
    with pytest.raises(UnknownKey):
        await forged  # the refetch times out; the cached set stays
    assert cache.stats.failures == 1
    await cache.aclose()


async def test_a_background_revalidation_installs_the_new_set(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cache = cache_for(http, clock)
    old, new = kid_of(private_key(0)), kid_of(private_key(1))
    await cache.get_key(old)
    fake.keys = [public_jwk(private_key(0)), public_jwk(private_key(1))]
    clock.advance(300)
    assert (await cache.get_key(old)).kid == old  # stale: answered from the cache, revalidation started
    assert cache.peek(new) is None
    await settle(cache)
    assert cache.kids == {old, new}
    assert cache.peek(new) is not None  # fresh again: the synchronous hot path sees the new key
    assert (await cache.get_key(new)).kid == new
    assert len(fake.jwks_requests) == 2
    assert cache.stats.unknown_kid_refetches == 0
    await cache.aclose()


async def test_a_revoked_kid_is_refused_once_the_background_revalidation_completes(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    fake.keys = [public_jwk(private_key(1))]  # `issuer keys revoke`: key 0 leaves the JWKS, key 1 signs
    clock.advance(300)
    token = mint(clock)
    assert (await verifier.verify(token)).sub == "user-1"  # the stale set still had it (at most once per fetch)
    await settle(verifier.jwks)
    for _ in range(3):
        with pytest.raises(UnknownKey):
            await verifier.verify(token)
    assert (await verifier.verify(mint(clock, private_key(1)))).sub == "user-1"
    assert len(fake.jwks_requests) == 2


async def test_an_unknown_kid_on_a_stale_set_waits_for_the_refetch(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    cache = cache_for(http, clock, fetch_timeout=2)
    old, new = kid_of(private_key(0)), kid_of(private_key(1))
    await cache.get_key(old)
    fake.keys = [public_jwk(private_key(0)), public_jwk(private_key(1))]
    fake.gate = asyncio.Event()
    clock.advance(300)
    waiting = [asyncio.create_task(cache.get_key(new)) for _ in range(20)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    assert (await cache.get_key(old)).kid == old  # meanwhile the known kid is answered at once...
    assert cache.stats.failures == 0  # ...not after the held fetch timed out
    fake.gate.set()
    assert {(await task).kid for task in waiting} == {new}
    assert len(fake.jwks_requests) == 2
    assert cache.stats.unknown_kid_refetches == 0  # a scheduled refetch, shared by all
    await cache.aclose()


async def test_past_the_stale_limit_a_hanging_issuer_fails_closed(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock
) -> None:
    verifier = verifier_for(http, clock, stale_limit=60, fetch_timeout=0.2)
    await verifier.verify(mint(clock))
    fake.gate = asyncio.Event()
    clock.advance(300 + 60)
    outcomes = await asyncio.gather(*(verifier.verify(mint(clock)) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(o, KeysUnavailable) for o in outcomes), outcomes[:3]
    assert len(fake.jwks_requests) == 2  # they all waited for the one fetch, which timed out
    assert verifier.jwks.stats.failures == 1
    with pytest.raises(KeysUnavailable, match="stale limit"):  # within the back-off: refused at once
        await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 2
    await verifier.aclose()


# ---------------------------------------------------------------- discovery


async def test_discovery_reads_the_metadata_once(fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock) -> None:
    fake.jwks_uri = "https://keys.issuer.test/jwks"
    verifier = verifier_for(http, clock, discover=True)
    await verifier.verify(mint(clock))
    clock.advance(300)
    await verifier.verify(mint(clock))
    await settle(verifier.jwks)
    assert len(fake.metadata_requests) == 1
    assert [str(r.url) for r in fake.jwks_requests] == ["https://keys.issuer.test/jwks"] * 2
    assert verifier.jwks.jwks_uri == "https://keys.issuer.test/jwks"


@pytest.mark.parametrize(
    ("metadata_issuer", "jwks_uri", "complaint"),
    [
        pytest.param("https://evil.test", JWKS_URI, "issuer", id="another-issuer"),
        pytest.param(ISSUER + "/", JWKS_URI, "issuer", id="issuer-not-exactly-equal"),
        pytest.param(ISSUER, "http://issuer.test/.well-known/jwks.json", "https", id="http-jwks-for-https-issuer"),
        pytest.param(ISSUER, "file:///etc/passwd", "https", id="file-url"),
    ],
)
async def test_discovery_refuses_inconsistent_metadata(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock, metadata_issuer: str, jwks_uri: str, complaint: str
) -> None:
    fake.issuer = metadata_issuer
    fake.jwks_uri = jwks_uri
    verifier = verifier_for(http, clock, discover=True)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))
    assert fake.jwks_requests == []
    assert complaint in (verifier.jwks.stats.last_error or "")


async def test_an_http_issuer_may_have_an_http_jwks_uri(clock: FakeClock) -> None:
    """Control for the https rule: a plain-http issuer (development) is consistent with an http jwks_uri."""
    issuer = "http://127.0.0.1:8000"

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("oauth-authorization-server"):
            return httpx.Response(200, json={"issuer": issuer, "jwks_uri": f"{issuer}/.well-known/jwks.json"})
        return httpx.Response(200, json={"keys": [public_jwk(private_key(0))]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        cache = JWKSCache(issuer=issuer, http_client=http, monotonic=clock.monotonic)
        assert await cache.refresh()
        assert cache.kids == {kid_of(private_key(0))}


# ---------------------------------------------------------------- construction, hot path, lifecycle


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="neither-uri-nor-issuer"),
        pytest.param({"jwks_uri": JWKS_URI, "issuer": ISSUER}, id="both"),
        pytest.param({"jwks_uri": JWKS_URI, "min_ttl": 0}, id="min-ttl-zero"),
        pytest.param({"jwks_uri": JWKS_URI, "min_ttl": 600}, id="min-above-default"),
        pytest.param({"jwks_uri": JWKS_URI, "unknown_kid_cooldown": -1}, id="negative-cooldown"),
        pytest.param({"jwks_uri": JWKS_URI, "fetch_timeout": 0}, id="zero-timeout"),
    ],
)
def test_bad_cache_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is for humans
        JWKSCache(**options)


async def test_warm_path_needs_no_await_into_the_cache(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))

    async def never(kid: str) -> Any:
        raise AssertionError("the warm path went through get_key")

    monkeypatch.setattr(verifier.jwks, "get_key", never)
    for _ in range(5):
        await verifier.verify(mint(clock))
    clock.advance(300)  # control: a stale set does go through get_key
    with pytest.raises(AssertionError, match="warm path"):
        await verifier.verify(mint(clock))


async def test_aclose_closes_only_a_client_the_cache_created(http: httpx.AsyncClient, clock: FakeClock) -> None:
    shared = JWKSCache(jwks_uri=JWKS_URI, http_client=http, monotonic=clock.monotonic)
    assert await shared.refresh()
    await shared.aclose()
    assert not http.is_closed

    own = JWKSCache(jwks_uri="http://127.0.0.1:9/jwks.json", monotonic=clock.monotonic, fetch_timeout=2)
    assert not await own.refresh()  # nothing listens on the discard port: a connect error, quickly
    client = own._http
    assert client is not None
    await own.aclose()
    assert client.is_closed
    await own.aclose()  # idempotent
    assert not await own.refresh()
    assert own.stats.last_error == "the JWKS cache is closed"
