"""The JWKS cache's rules, against a scriptable fake issuer and simulated time (no database, no sleeping).

Every count below is of requests the fake issuer actually received.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey, OctKey

from issuer.verifier import JWKSCache, KeysUnavailable, TokenError, UnknownKey
from tests.verifier_support import (
    ISSUER,
    JWKS_URI,
    FakeIssuer,
    SimClock,
    b64url_json,
    header_for,
    kid_of,
    mint,
    private_jwk,
    private_key,
    public_jwk,
    verifier_for,
)


@pytest.fixture
def clock() -> SimClock:  # shadows the issuer's FakeClock: these tests need no issuer
    return SimClock()


@pytest.fixture
def fake() -> FakeIssuer:
    return FakeIssuer()


@pytest.fixture
async def http(fake: FakeIssuer) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client() as client:
        yield client


def with_kid(token: str, kid: str) -> str:
    """The same token under another kid (signature untouched: the kid is looked up before it is checked)."""
    _, payload, signature = token.split(".")
    return f"{b64url_json(header_for(private_key(0), kid=kid))}.{payload}.{signature}"


# ---------------------------------------------------------------- freshness, Cache-Control, ETag


async def test_a_fresh_set_is_served_without_fetching(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
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
    assert len(fake.jwks_requests) == 2


@pytest.mark.parametrize(
    ("cache_control", "age", "lifetime"),
    [
        pytest.param("public, max-age=600", None, 600, id="max-age-honoured"),
        pytest.param("public, max-age=5", None, 30, id="too-short-clamped-up"),
        pytest.param("max-age=0", None, 30, id="zero-clamped-up"),
        pytest.param("public, max-age=999999999", None, 86400, id="too-long-clamped-down"),
        pytest.param(None, None, 300, id="absent-default"),
        pytest.param("public", None, 300, id="no-max-age-default"),
        pytest.param("max-age=soon", None, 300, id="malformed-default"),
        pytest.param("max-age=-5", None, 300, id="negative-default"),
        pytest.param("no-store", None, 30, id="no-store-is-the-minimum"),
        pytest.param("no-cache, max-age=600", None, 30, id="no-cache-is-the-minimum"),
        pytest.param("public, max-age=300", "200", 100, id="age-is-subtracted"),
        pytest.param('max-age="120"', None, 120, id="quoted"),
    ],
)
async def test_cache_control_sets_the_lifetime_within_bounds(
    fake: FakeIssuer,
    http: httpx.AsyncClient,
    clock: SimClock,
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
    assert len(fake.jwks_requests) == 1, "refetched before the lifetime ended"
    clock.advance(1)
    await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 2, "did not refetch when the lifetime ended"
    await http.aclose()


async def test_etag_revalidation_keeps_the_keys_and_extends_freshness(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    etag = (await http.get(JWKS_URI)).headers["etag"]
    fake.requests.clear()

    clock.advance(300)
    await verifier.verify(mint(clock))
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
) -> None:
    fake.etags = False
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    clock.advance(300)
    await verifier.verify(mint(clock))
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock, answer: Any
) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    fake.failure = answer
    clock.advance(300)

    # Stale, the refetch fails: the cached key still verifies, and nothing from the bad answer is trusted.
    assert (await verifier.verify(mint(clock))).sub == "user-1"
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
    assert len(fake.jwks_requests) == 3


async def test_a_good_answer_replaces_the_set(fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock) -> None:
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
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


async def test_only_public_members_are_imported(fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock) -> None:
    verifier = verifier_for(http, clock)
    await verifier.verify(mint(clock))
    key = verifier.jwks.peek(kid_of(private_key(0)))
    assert key is not None
    assert not key.is_private
    assert set(key.as_dict(private=False)) >= {"kty", "n", "e"}


async def test_a_hanging_issuer_times_out_and_keeps_the_keys(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    verifier = verifier_for(http, clock, fetch_timeout=0.05)
    await verifier.verify(mint(clock))
    fake.failure = hang
    clock.advance(300)
    assert (await verifier.verify(mint(clock))).sub == "user-1"
    assert verifier.jwks.stats.failures == 1


async def test_a_declared_oversize_body_is_not_read(fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock) -> None:
    verifier = verifier_for(http, clock, max_response_bytes=4096)
    fake.keys = [public_jwk(private_key(0)), *[public_jwk(private_key(1), kid=f"k{i}") for i in range(20)]]
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))
    assert "exceeds" in (verifier.jwks.stats.last_error or "")


# ---------------------------------------------------------------- one fetch in flight


@pytest.mark.parametrize("discover", [False, True], ids=["jwks_uri", "discovery"])
async def test_concurrent_verifications_on_a_cold_cache_share_one_fetch(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock, discover: bool
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
) -> None:
    verifier = verifier_for(http, clock, stale_limit=3600, failure_backoff=10)
    await verifier.verify(mint(clock))
    fake.failure = _raise(httpx.ConnectError)

    elapsed = 0
    for step in (300, *[60] * 59, 59):  # fresh for 300 s, then 3599 s of stale use
        clock.advance(step)
        elapsed += step
        assert (await verifier.verify(mint(clock))).sub == "user-1", elapsed
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
) -> None:
    """Control: the stale allowance is what kept the test above passing."""
    verifier = verifier_for(http, clock, stale_limit=0)
    await verifier.verify(mint(clock))
    fake.failure = _raise(httpx.ConnectError)
    clock.advance(300)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))


async def test_cold_cache_with_the_issuer_down(fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock) -> None:
    fake.failure = _raise(httpx.ConnectError)
    verifier = verifier_for(http, clock)
    with pytest.raises(KeysUnavailable, match="No signing keys"):
        await verifier.verify(mint(clock))
    with pytest.raises(KeysUnavailable):  # within the back-off: no second request
        await verifier.verify(mint(clock))
    assert len(fake.jwks_requests) == 1


async def test_a_304_without_a_cached_set_is_a_failure(
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock
) -> None:
    fake.failure = _status(304)
    verifier = verifier_for(http, clock)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))
    assert "304" in (verifier.jwks.stats.last_error or "")


# ---------------------------------------------------------------- discovery


async def test_discovery_reads_the_metadata_once(fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock) -> None:
    fake.jwks_uri = "https://keys.issuer.test/jwks"
    verifier = verifier_for(http, clock, discover=True)
    await verifier.verify(mint(clock))
    clock.advance(300)
    await verifier.verify(mint(clock))
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock, metadata_issuer: str, jwks_uri: str, complaint: str
) -> None:
    fake.issuer = metadata_issuer
    fake.jwks_uri = jwks_uri
    verifier = verifier_for(http, clock, discover=True)
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(clock))
    assert fake.jwks_requests == []
    assert complaint in (verifier.jwks.stats.last_error or "")


async def test_an_http_issuer_may_have_an_http_jwks_uri(clock: SimClock) -> None:
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
    fake: FakeIssuer, http: httpx.AsyncClient, clock: SimClock, monkeypatch: pytest.MonkeyPatch
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


async def test_aclose_closes_only_a_client_the_cache_created(http: httpx.AsyncClient, clock: SimClock) -> None:
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
