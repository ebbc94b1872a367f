"""Helpers for the verifier tests: local RSA keys, tokens signed with them, a scriptable fake issuer, a fake
revocation feed, counting transports. Time is the one ``tests.support.clock.FakeClock``: ``wall()`` dates the
tokens and the SETs, ``monotonic()`` ages the JWKS cache and the feed's lag."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from issuer.verifier import AccessTokenVerifier, JWKSCache, RevocationFeed, Revoked
from tests.support.clock import FakeClock
from tests.support.jwt import b64url_uint, kid_of, rsa_signed

ISSUER = "https://issuer.test"
AUDIENCE = "api"
JWKS_URI = f"{ISSUER}/.well-known/jwks.json"
METADATA_URI = f"{ISSUER}/.well-known/oauth-authorization-server"
POLL_URI = f"{ISSUER}/events/poll"
LEEWAY = 5  # seconds of clock skew a ``verifier_for`` verifier allows


# ---------------------------------------------------------------- keys and tokens


@functools.cache
def private_key(index: int = 0, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A few keys per test run: generating RSA keys is the slow part of these tests."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_jwk(key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    numbers = key.public_key().public_numbers()
    n, e = b64url_uint(numbers.n), b64url_uint(numbers.e)
    jwk = {"kty": "RSA", "kid": kid_of(key), "use": "sig", "alg": "RS256", "n": n, "e": e}
    jwk.update(extra)
    return {k: v for k, v in jwk.items() if v is not None}


def private_jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """The whole key, private members included: what a misconfigured issuer might publish."""
    return {**RSAKey.import_key(key).as_dict(private=True), "kid": kid_of(key), "use": "sig", "alg": "RS256"}


def claims_for(clock: FakeClock, ttl: int = 900, **changes: Any) -> dict[str, Any]:
    iat = int(clock.wall())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-1",
        "iat": iat,
        "exp": iat + ttl,
        "jti": secrets.token_urlsafe(16),
        "sid": "family-1",
        "tokenVersion": 0,
        "email": "alice@example.com",
        "role": "user",
    }
    return changed(claims, changes)


# A change that removes the member instead of setting it.
DELETE: Any = object()


def changed(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` applied; a value of ``DELETE`` removes that member."""
    result = dict(base)
    for name, value in changes.items():
        if value is DELETE:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def header_for(key: rsa.RSAPrivateKey, **changes: Any) -> dict[str, Any]:
    return changed({"alg": "RS256", "typ": "at+jwt", "kid": kid_of(key)}, changes)


def mint(clock: FakeClock, key: rsa.RSAPrivateKey | None = None, **claim_changes: Any) -> str:
    key = key or private_key(0)
    return rsa_signed(header_for(key), claims_for(clock, **claim_changes), key)


# ---------------------------------------------------------------- a fake issuer


Responder = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


@dataclass
class FakeIssuer:
    """Serves the metadata and the JWKS like the real issuer (max-age, ETag, 304), until told to misbehave.

    ``failure``, when set, answers every JWKS request (it may raise, e.g. ``httpx.ConnectError``).
    ``gate``, when set, holds every JWKS request until it is set: concurrent callers pile up behind it.
    ``feed``, when set, answers the revocation feed's poll URL, which the metadata then advertises.
    """

    keys: list[dict[str, Any]] = field(default_factory=lambda: [public_jwk(private_key(0))])
    issuer: str = ISSUER
    jwks_uri: str = JWKS_URI
    cache_control: str | None = "public, max-age=300"
    etags: bool = True
    failure: Responder | None = None
    gate: asyncio.Event | None = None
    requests: list[httpx.Request] = field(default_factory=list)
    feed: FakeFeed | None = None

    @property
    def jwks_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url) == self.jwks_uri]

    @property
    def metadata_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if str(r.url) == METADATA_URI]

    def body(self) -> bytes:
        return json.dumps({"keys": self.keys}, separators=(",", ":")).encode()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if str(request.url) == METADATA_URI:
            metadata = {"issuer": self.issuer, "jwks_uri": self.jwks_uri}
            if self.feed is not None:
                metadata["security_event_poll_endpoint"] = self.feed.poll_uri
            return httpx.Response(200, json=metadata)
        if self.feed is not None and str(request.url) == self.feed.poll_uri:
            return await self.feed.handle(request)
        if str(request.url) != self.jwks_uri:
            return httpx.Response(404)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            answer = self.failure(request)
            return await answer if isinstance(answer, Awaitable) else answer
        body = self.body()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        if self.etags:
            headers["ETag"] = etag
            if request.headers.get("if-none-match") == etag:
                return httpx.Response(304, headers=headers)
        return httpx.Response(200, content=body, headers={"Content-Type": "application/json", **headers})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def verifier_for(
    http: httpx.AsyncClient, clock: FakeClock, *, discover: bool = False, leeway: int = LEEWAY, **cache_options: Any
) -> AccessTokenVerifier:
    jwks = (
        JWKSCache(issuer=ISSUER, http_client=http, monotonic=clock.monotonic, **cache_options)
        if discover
        else JWKSCache(jwks_uri=JWKS_URI, http_client=http, monotonic=clock.monotonic, **cache_options)
    )
    return AccessTokenVerifier(issuer=ISSUER, audience=AUDIENCE, jwks=jwks, leeway=leeway, clock=clock.wall)


# ---------------------------------------------------------------- a fake revocation feed

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
ACCOUNT_PURGED = "https://schemas.openid.net/secevent/risc/event-type/account-purged"
CLIENT_ID = "gateway-1"
CLIENT_SECRET = "s3cret/with:odd&chars"


def set_header(key: rsa.RSAPrivateKey, **changes: Any) -> dict[str, Any]:
    return changed({"alg": "RS256", "typ": "secevent+jwt", "kid": kid_of(key)}, changes)


def set_claims(jti: str, at: float, sub_id: dict[str, Any], event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A SET's claims as the issuer writes them (feed.md): no exp, no sub, exactly one event."""
    claims = {"iss": ISSUER, "iat": int(at), "jti": jti, "aud": CLIENT_ID, "sub_id": sub_id, "events": event}
    return changed(claims, changes)


def user_subject(user: str, issuer: str = ISSUER) -> dict[str, Any]:
    return {"format": "iss_sub", "iss": issuer, "sub": user}


def session_revoked(jti: str, at: float, user: str, sid: str, **changes: Any) -> dict[str, Any]:
    sub_id = {"format": "complex", "user": user_subject(user), "session": {"format": "opaque", "id": sid}}
    return set_claims(jti, at, sub_id, {SESSION_REVOKED: {"event_timestamp": int(at)}}, **changes)


def version_raised(jti: str, at: float, user: str, version: int, **changes: Any) -> dict[str, Any]:
    event = {SESSION_REVOKED: {"event_timestamp": int(at), "token_version": version}}
    return set_claims(jti, at, user_subject(user), event, **changes)


def account_purged(jti: str, at: float, user: str, **changes: Any) -> dict[str, Any]:
    return set_claims(jti, at, user_subject(user), {ACCOUNT_PURGED: {"event_timestamp": int(at)}}, **changes)


@dataclass
class FakeFeed:
    """The issuer's poll endpoint as feed.md describes it, in memory: Basic client auth, ``maxEvents``,
    ``returnImmediately``, a long poll that wakes on :meth:`publish`, a non-destructive cursor bound to the
    client (another client's cursor is ``invalid_request``), ``cursor_expired`` once :meth:`forget_before`
    dropped what the cursor points into.

    SETs are signed with the JWT toolkit (``rsa_signed``), not joserfc: the verifier checks them with joserfc,
    and a test must not check joserfc against itself. ``answers``, when not empty, answers the next polls
    instead (one response each: errors, 429s, malformed bodies).
    """

    key: rsa.RSAPrivateKey = field(default_factory=lambda: private_key(0))
    clients: dict[str, str] = field(default_factory=lambda: {CLIENT_ID: CLIENT_SECRET})
    poll_uri: str = POLL_URI
    long_poll_wait: float = 0.5  # real seconds an empty long poll is held (the issuer holds about 25)
    events: list[tuple[str, str]] = field(default_factory=list)  # (jti, compact SET), in commit order
    first_kept: int = 0  # index of the oldest kept event; cursors before it are expired
    answers: list[httpx.Response] = field(default_factory=list)
    failure: Responder | None = None  # when set, answers every poll (it may raise, e.g. httpx.ConnectError)
    polls: list[dict[str, Any]] = field(default_factory=list)  # each request body, as parsed
    open_polls: int = 0
    _published: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._published is None:
            self._published = asyncio.Condition()
        return self._published

    def sign(self, claims: Mapping[str, Any], key: rsa.RSAPrivateKey | None = None, **header: Any) -> str:
        signer = key or self.key
        return rsa_signed(set_header(signer, **header), claims, signer)

    def add(self, jti: str, token: str) -> None:
        """Queue a SET as it is (no wake-up: for setting up before the verifier starts, or in bulk)."""
        self.events.append((jti, token))

    async def publish(self, claims: Mapping[str, Any], token: str | None = None) -> None:
        """Sign (unless ``token`` is given) and queue a SET, then wake the open long polls."""
        self.add(claims["jti"], token or self.sign(claims))
        async with self._condition():
            self._condition().notify_all()

    def forget_before(self, index: int) -> None:
        """Drop events from the window: cursors pointing before ``index`` get ``cursor_expired``."""
        self.first_kept = index

    def cursor(self, client: str, index: int) -> str:
        return f"{client}.{index}"

    async def handle(self, request: httpx.Request) -> httpx.Response:
        client = self._client(request)
        if client is None:
            return feed_error(401, "invalid_client", headers={"WWW-Authenticate": 'Basic realm="issuer"'})
        try:
            body = json.loads(request.content or b"{}")
        except ValueError:
            return feed_error(400, "invalid_request")
        self.polls.append(body)
        if self.answers:
            return self.answers.pop(0)
        if self.failure is not None:
            answer = self.failure(request)
            return await answer if isinstance(answer, Awaitable) else answer
        start = self.first_kept
        cursor = body.get("cursor")
        if cursor is not None:
            owner, _, index = str(cursor).rpartition(".")
            if owner != client or not index.isdigit():
                return feed_error(400, "invalid_request")
            if int(index) < self.first_kept:
                return feed_error(400, "cursor_expired")
            start = int(index)
        if start >= len(self.events) and not body.get("returnImmediately", False):
            self.open_polls += 1
            try:
                async with self._condition():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._condition().wait_for(lambda: start < len(self.events)), self.long_poll_wait
                        )
            finally:
                self.open_polls -= 1
            if cursor is not None and start < self.first_kept:  # the window moved on while the poll was held
                return feed_error(400, "cursor_expired")
        end = max(start, min(len(self.events), start + int(body.get("maxEvents", 100))))
        sets = dict(self.events[start:end])
        return httpx.Response(
            200, json={"sets": sets, "moreAvailable": end < len(self.events), "cursor": self.cursor(client, end)}
        )

    def _client(self, request: httpx.Request) -> str | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return None
        user, _, password = base64.b64decode(encoded).decode().partition(":")
        client, secret = urllib.parse.unquote(user), urllib.parse.unquote(password)
        return client if self.clients.get(client) == secret else None


def feed_error(status: int, error: str, headers: Mapping[str, str] | None = None) -> httpx.Response:
    body = {"error": error, "error_description": f"{error} (fake feed)"}
    return httpx.Response(status, json=body, headers=dict(headers or {}))


@dataclass
class Sleeps:
    """The feed's ``sleep``: records each back-off and yields briefly for real, so a failing loop cannot spin."""

    delays: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0.005)


def feed_verifier_for(
    http: httpx.AsyncClient,
    clock: FakeClock,
    *,
    sleeps: Sleeps | None = None,
    client_id: str = CLIENT_ID,
    client_secret: str = CLIENT_SECRET,
    **feed_options: Any,
) -> AccessTokenVerifier:
    """A verifier following the fake feed over ``http`` (poll URL discovered from the metadata by default)."""
    feed_options.setdefault("startup_wait", 5.0)
    feed_options.setdefault("jitter", lambda: 0.5)
    feed = RevocationFeed(
        client_id,
        client_secret,
        http_client=http,
        monotonic=clock.monotonic,
        sleep=sleeps if sleeps is not None else Sleeps(),
        **feed_options,
    )
    jwks = JWKSCache(jwks_uri=JWKS_URI, http_client=http, monotonic=clock.monotonic)
    return AccessTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, jwks=jwks, leeway=LEEWAY, clock=clock.wall, events=feed
    )


async def revoked(verifier: AccessTokenVerifier, token: str) -> bool:
    """True when ``verifier`` refuses ``token`` as revoked; False when it accepts it (other errors propagate)."""
    try:
        await verifier.verify(token)
    except Revoked:
        return True
    return False


async def until_revoked(verifier: AccessTokenVerifier, token: str, within: float = 10.0) -> None:
    """Wait until the feed has told ``verifier`` that ``token`` is revoked; fail after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not await revoked(verifier, token):  # noqa: ASYNC110  # no Event announces a merged SET
            await asyncio.sleep(0.005)


# ---------------------------------------------------------------- counting a real app's traffic


class CountingTransport(httpx.AsyncBaseTransport):
    """Wraps a transport (e.g. ``httpx.ASGITransport(app=issuer_app)``) and records every request path."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.paths: list[str] = []
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        response = await self.inner.handle_async_request(request)
        self.statuses.append(response.status_code)
        return response

    def count(self, path: str) -> int:
        return self.paths.count(path)

    async def aclose(self) -> None:
        await self.inner.aclose()
