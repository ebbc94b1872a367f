"""Helpers for the verifier tests: local RSA keys, tokens signed with them, a scriptable fake issuer, counting
transports. Time is the one ``tests.support.clock.FakeClock``: ``wall()`` dates the tokens, ``monotonic()`` ages
the JWKS cache."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import RSAKey

from issuer.verifier import AccessTokenVerifier, JWKSCache
from tests.support.clock import FakeClock
from tests.support.jwt import b64url_uint, kid_of, rsa_signed

ISSUER = "https://issuer.test"
AUDIENCE = "api"
JWKS_URI = f"{ISSUER}/.well-known/jwks.json"
METADATA_URI = f"{ISSUER}/.well-known/oauth-authorization-server"
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
    """

    keys: list[dict[str, Any]] = field(default_factory=lambda: [public_jwk(private_key(0))])
    issuer: str = ISSUER
    jwks_uri: str = JWKS_URI
    cache_control: str | None = "public, max-age=300"
    etags: bool = True
    failure: Responder | None = None
    gate: asyncio.Event | None = None
    requests: list[httpx.Request] = field(default_factory=list)

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
            return httpx.Response(200, json={"issuer": self.issuer, "jwks_uri": self.jwks_uri})
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
