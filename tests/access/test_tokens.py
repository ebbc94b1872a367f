"""Minting: access tokens as a resource service sees them (header, claims, kid), verified by PyJWT alone."""

from __future__ import annotations

import functools
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from issuer.access.tokens import mint_access_token
from issuer.keys.material import new_key_record
from issuer.keys.ring import KeyRing
from issuer.settings import Secret, Settings
from tests.support.clock import FakeClock
from tests.support.http import bearer, login, refresh_body, register
from tests.support.issuer import ISSUER_URL, IssuerHarness, running_issuer, with_settings
from tests.support.jwt import b64url, b64url_decode, jwt_claims, kid_of, rfc7638_thumbprint, segments, token_kid
from tests.support.keys import fetch_jwks

PUBLIC_MEMBERS = {"kty", "kid", "use", "alg", "n", "e"}
CLAIMS = {"iss", "aud", "sub", "iat", "exp", "jti", "sid", "tokenVersion", "email", "role"}


def pyjwt_verify(token: str, jwks: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Verify with PyJWT only: the JWKS document is the only input from the issuer.

    PyJWT reads the wall clock, the tests run on a FakeClock: PyJWT checks signature, alg, typ, iss, aud and
    the presence of the time claims; their values are checked against the FakeClock by the caller.
    """
    key = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
    decoded = jwt.decode_complete(
        token,
        key,
        algorithms=["RS256"],
        audience=settings.audience,
        issuer=settings.issuer_url,
        options={
            "require": ["exp", "iat", "iss", "aud", "sub", "jti"],
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
        },
    )
    # The verified header, not only the unverified one, says this is an access token.
    assert decoded["header"]["typ"] == "at+jwt"
    assert decoded["header"]["alg"] == "RS256"
    payload: dict[str, Any] = decoded["payload"]
    return payload


async def sessions(client: httpx.AsyncClient, access_token: str) -> list[dict[str, Any]]:
    response = await client.get("/auth/sessions", headers=bearer(access_token))
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()["sessions"]
    return listed


async def check_access_token(
    client: httpx.AsyncClient,
    token: str,
    *,
    settings: Settings,
    clock: FakeClock,
    user: dict[str, Any],
    token_version: int = 0,
) -> dict[str, Any]:
    jwks = await fetch_jwks(client)
    header, claims = segments(token)

    by_kid = {key["kid"]: key for key in jwks["keys"]}
    assert header["kid"] in by_kid
    jwk = by_kid[header["kid"]]
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": rfc7638_thumbprint(jwk)}
    # Every published kid is its own key's thumbprint, so a kid can never be reused for another key.
    for key in jwks["keys"]:
        assert key["kid"] == rfc7638_thumbprint(key)

    assert claims["iss"] == settings.issuer_url == ISSUER_URL
    assert claims["aud"] == settings.audience
    assert isinstance(claims["sub"], str)
    assert claims["sub"] == user["id"]
    for name in ("iat", "exp", "tokenVersion"):
        assert type(claims[name]) is int, (name, claims[name])
    assert claims["iat"] == int(clock.now.timestamp())
    assert claims["exp"] - claims["iat"] == settings.access_token_ttl
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) >= 16
    assert isinstance(claims["sid"], str)
    assert claims["tokenVersion"] == token_version
    assert claims["email"] == user["email"]
    assert claims["role"] == user["role"] == "user"
    assert set(claims) == CLAIMS

    verified = pyjwt_verify(token, jwks, settings)
    assert verified == claims

    listed = await sessions(client, token)
    assert claims["sid"] in {s["id"] for s in listed}
    current = [s["id"] for s in listed if s["current"]]
    assert current == [claims["sid"]]
    return claims


def test_mint_access_token_alone() -> None:
    """The minting function by itself: exactly the contract's header and claims, the kid computed here from the
    key's own numbers (RFC 7638), the signature checked by PyJWT against the bare public key (no JWKS)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kek = Secret(secrets.token_bytes(32))
    now = datetime(2030, 1, 2, 3, 4, 5, 999_999, tzinfo=UTC)
    record = new_key_record(kek, now=now, activate_at=now, private_key=private)
    key = KeyRing.load([record], kek, timedelta(0)).signing_key(now)
    assert key is not None
    mint = functools.partial(
        mint_access_token,
        key,
        issuer=ISSUER_URL,
        audience="api",
        ttl=600,
        now=now,
        user_id="user-1",
        email="alice@example.com",
        role="user",
        token_version=3,
        session_id="family-1",
    )
    token = mint()
    header, claims = segments(token)
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": kid_of(private)}
    iat = int(datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())  # whole seconds, rounded down
    assert claims == {
        "iss": ISSUER_URL,
        "aud": "api",
        "sub": "user-1",
        "iat": iat,
        "exp": iat + 600,
        "jti": claims["jti"],
        "sid": "family-1",
        "tokenVersion": 3,
        "email": "alice@example.com",
        "role": "user",
    }
    assert isinstance(claims["jti"], str)
    assert len(b64url_decode(claims["jti"])) >= 16  # 128 bits from the CSPRNG
    verified = jwt.decode_complete(
        token,
        private.public_key(),
        algorithms=["RS256"],
        audience="api",
        issuer=ISSUER_URL,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert verified["header"] == header
    assert verified["payload"] == claims
    assert jwt_claims(mint())["jti"] != claims["jti"]


async def test_login_token_header_and_claims(
    client: httpx.AsyncClient, issuer: IssuerHarness, clock: FakeClock
) -> None:
    settings = issuer.services.settings
    user = await register(client)

    body = await login(client, transport="body")
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == settings.access_token_ttl
    body_claims = await check_access_token(client, body["access_token"], settings=settings, clock=clock, user=user)

    cookie = await login(client, transport="cookie")
    cookie_claims = await check_access_token(client, cookie["access_token"], settings=settings, clock=clock, user=user)
    assert body_claims["sid"] != cookie_claims["sid"]

    clock.advance(30)
    rotated = await refresh_body(client, body["refresh_token"])
    assert rotated.status_code == 200, rotated.text
    rotated_claims = await check_access_token(
        client, rotated.json()["access_token"], settings=settings, clock=clock, user=user
    )
    # A refresh stays in the family the token came from.
    assert rotated_claims["sid"] == body_claims["sid"]


async def test_jti_is_unique_even_within_one_second(client: httpx.AsyncClient, issuer: IssuerHarness) -> None:
    await register(client)
    tokens: list[str] = []
    for _ in range(3):
        tokens.append((await login(client))["access_token"])
    # The FakeClock does not move: every token has the same iat, and a refresh in the same family
    # produces an otherwise identical claim set, so only jti tells them apart.
    refresh = (await login(client))["refresh_token"]
    for _ in range(3):
        response = await refresh_body(client, refresh)
        assert response.status_code == 200, response.text
        tokens.append(response.json()["access_token"])
        refresh = response.json()["refresh_token"]
    jtis = [jwt_claims(token)["jti"] for token in tokens]
    assert len(set(jtis)) == len(jtis)
    assert len({jwt_claims(token)["iat"] for token in tokens}) == 1


async def test_exp_follows_configured_ttl(settings: Settings, clock: FakeClock) -> None:
    custom = with_settings(settings, access_token_ttl=123)
    async with running_issuer(custom, clock) as harness, harness.client() as client:
        user = await register(client)
        body = await login(client)
        assert body["expires_in"] == 123
        claims = await check_access_token(client, body["access_token"], settings=custom, clock=clock, user=user)
        assert claims["exp"] - claims["iat"] == 123


async def test_token_version_claim_follows_logout_all(
    client: httpx.AsyncClient, issuer: IssuerHarness, clock: FakeClock
) -> None:
    settings = issuer.services.settings
    user = await register(client)
    first = await login(client)
    response = await client.post("/auth/logout-all", headers=bearer(first["access_token"]))
    assert response.status_code == 204
    second = await login(client)
    await check_access_token(client, second["access_token"], settings=settings, clock=clock, user=user, token_version=1)


async def test_jwks_key_is_the_signing_key_and_large_enough(
    client: httpx.AsyncClient, issuer: IssuerHarness, clock: FakeClock
) -> None:
    await register(client)
    token = (await login(client))["access_token"]
    jwks = await fetch_jwks(client)
    kid = token_kid(token)
    jwk = next(key for key in jwks["keys"] if key["kid"] == kid)
    assert set(jwk) == PUBLIC_MEMBERS
    modulus = int.from_bytes(b64url_decode(jwk["n"]), "big")
    assert modulus.bit_length() >= 2048
    assert int.from_bytes(b64url_decode(jwk["e"]), "big") == 65537

    signing = issuer.services.keys.signing_key(clock())
    assert signing is not None
    assert signing.record.kid == kid
    numbers = signing.signing_key.private_key.private_numbers()  # type: ignore[union-attr]
    assert numbers.public_numbers.n == modulus


async def test_pyjwt_refuses_a_tampered_token(client: httpx.AsyncClient, issuer: IssuerHarness) -> None:
    """The independent check is not vacuous: the same PyJWT path rejects a changed payload."""
    await register(client)
    token = (await login(client))["access_token"]
    jwks = await fetch_jwks(client)
    header, _, signature = token.split(".")
    claims = jwt_claims(token) | {"role": "admin"}
    forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    with pytest.raises(jwt.InvalidSignatureError):
        pyjwt_verify(forged, jwks, issuer.services.settings)
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            token,
            jwt.PyJWKSet.from_dict(jwks)[token_kid(token)],
            algorithms=["RS256"],
            audience="other",
            options={"verify_exp": False, "verify_iat": False},
        )
