"""Forged, tampered and confused tokens: refused at the issuer's own Bearer endpoints, for the same reason the
shipped verifier gives, and never with any key touched before the algorithm is known to be RS256."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jws
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey

from issuer.verifier import (
    BadSignature,
    ExpiredToken,
    InvalidClaims,
    MalformedToken,
    NotYetValid,
    TokenError,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongIssuer,
    WrongType,
    verify_access_token,
)
from tests.access.conftest import BEARER_REQUIRED, Forge
from tests.support.http import assert_error, assert_invalid_token, me, refresh_body
from tests.support.jwt import b64url, b64url_json, compact, hmac_signed, kid_of, rsa_signed
from tests.support.verifier import DELETE

_ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_spki(f: Forge) -> bytes:
    return f.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem_pkcs1(f: Forge) -> bytes:
    return f.private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)


def _n_bytes(f: Forge) -> bytes:
    n = f.private_key.public_key().public_numbers().n
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _swap_payload(f: Forge, **changes: Any) -> str:
    """The real token's header and signature over other claims."""
    header, _, signature = f.access_token.split(".")
    return f"{header}.{b64url_json(f.payload(**changes))}.{signature}"


def _swap_header(f: Forge, **changes: Any) -> str:
    """The real token's claims and signature under another header."""
    _, payload, signature = f.access_token.split(".")
    return f"{b64url_json(f.header(**changes))}.{payload}.{signature}"


def _attacker_public_jwk() -> dict[str, Any]:
    return RSAKey.import_key(_ATTACKER_KEY.public_key()).as_dict(private=False)


Attack = Callable[[Forge], str]

ATTACKS: list[Any] = [
    # alg none: unsigned, with the real kid
    pytest.param(lambda f: compact(f.header(alg="none"), f.claims), UnsupportedAlgorithm, id="alg-none"),
    pytest.param(lambda f: compact(f.header(alg="None"), f.claims), UnsupportedAlgorithm, id="alg-None"),
    pytest.param(lambda f: compact(f.header(alg="NONE"), f.claims), UnsupportedAlgorithm, id="alg-NONE"),
    pytest.param(lambda f: _swap_header(f, alg="none"), UnsupportedAlgorithm, id="alg-none-keeping-the-real-signature"),
    # HS256 keyed with the public key (the classic RS/HS confusion)
    pytest.param(
        lambda f: hmac_signed(f.header(alg="HS256"), f.claims, _pem_spki(f)), UnsupportedAlgorithm, id="hs256-pem"
    ),
    pytest.param(
        lambda f: hmac_signed(f.header(alg="HS256"), f.claims, _pem_pkcs1(f)),
        UnsupportedAlgorithm,
        id="hs256-pem-pkcs1",
    ),
    pytest.param(
        lambda f: hmac_signed(f.header(alg="HS256"), f.claims, _n_bytes(f)),
        UnsupportedAlgorithm,
        id="hs256-jwk-n-bytes",
    ),
    pytest.param(
        lambda f: hmac_signed(f.header(alg="HS256"), f.claims, b64url(_n_bytes(f)).encode()),
        UnsupportedAlgorithm,
        id="hs256-jwk-n-base64url",
    ),
    pytest.param(
        lambda f: hmac_signed(f.header(alg="HS512"), f.claims, _pem_spki(f), "sha512"),
        UnsupportedAlgorithm,
        id="hs512-pem",
    ),
    # other asymmetric algorithms, even with the real key
    pytest.param(
        lambda f: rsa_signed(f.header(alg="RS512"), f.claims, f.private_key, algorithm=hashes.SHA512()),
        UnsupportedAlgorithm,
        id="rs512-real-key",
    ),
    pytest.param(
        lambda f: rsa_signed(
            f.header(alg="PS256"),
            f.claims,
            f.private_key,
            pad=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        ),
        UnsupportedAlgorithm,
        id="ps256-real-key",
    ),
    pytest.param(lambda f: _swap_header(f, alg="rs256"), UnsupportedAlgorithm, id="alg-lowercase"),
    pytest.param(lambda f: _swap_header(f, alg=["RS256"]), UnsupportedAlgorithm, id="alg-list"),
    # keys
    pytest.param(lambda f: f.sign(f.header(kid="not-a-published-kid")), UnknownKey, id="unknown-kid"),
    pytest.param(lambda f: f.sign(f.header(kid=DELETE)), UnknownKey, id="no-kid"),
    pytest.param(lambda f: f.sign(f.header(kid=7)), UnknownKey, id="kid-not-a-string"),
    pytest.param(
        lambda f: rsa_signed(f.header(kid=kid_of(_ATTACKER_KEY)), f.claims, _ATTACKER_KEY),
        UnknownKey,
        id="foreign-key-own-kid",
    ),
    pytest.param(lambda f: rsa_signed(f.header(), f.claims, _ATTACKER_KEY), BadSignature, id="foreign-key-real-kid"),
    pytest.param(
        lambda f: rsa_signed(f.header(jwk=_attacker_public_jwk()), f.claims, _ATTACKER_KEY),
        MalformedToken,
        id="embedded-jwk",
    ),
    pytest.param(
        lambda f: rsa_signed(
            f.header(kid=kid_of(_ATTACKER_KEY), jku="https://evil.test/jwks.json"), f.claims, _ATTACKER_KEY
        ),
        MalformedToken,
        id="jku",
    ),
    pytest.param(
        lambda f: rsa_signed(f.header(x5u="https://evil.test/cert.pem"), f.claims, _ATTACKER_KEY),
        MalformedToken,
        id="x5u",
    ),
    pytest.param(lambda f: f.sign(f.header(crit=["exp"])), MalformedToken, id="crit"),
    # tampering with a real token, keeping its signature
    pytest.param(lambda f: _swap_payload(f, sub=f.other_user_id), BadSignature, id="tampered-sub"),
    pytest.param(lambda f: _swap_payload(f, role="admin"), BadSignature, id="tampered-role"),
    pytest.param(lambda f: _swap_payload(f, exp=f.claims["exp"] + 86400), BadSignature, id="tampered-exp"),
    pytest.param(lambda f: _swap_header(f, typ="application/at+jwt"), BadSignature, id="tampered-header-typ"),
    pytest.param(lambda f: _swap_header(f, cty="JWT"), BadSignature, id="tampered-header-extra-member"),
    pytest.param(lambda f: f.access_token.rsplit(".", 1)[0] + ".", BadSignature, id="signature-stripped"),
    pytest.param(lambda f: f.access_token.rsplit(".", 1)[0] + "." + b64url(bytes(256)), BadSignature, id="zero-sig"),
    # claims, validly signed by the issuer's own key
    pytest.param(lambda f: f.sign(payload=f.payload(iss="https://evil.test")), WrongIssuer, id="wrong-iss"),
    pytest.param(lambda f: f.sign(payload=f.payload(iss=f.claims["iss"] + "/")), WrongIssuer, id="iss-trailing-slash"),
    pytest.param(lambda f: f.sign(payload=f.payload(iss=[f.claims["iss"]])), WrongIssuer, id="iss-list"),
    pytest.param(lambda f: f.sign(payload=f.payload(aud="another-api")), WrongAudience, id="wrong-aud"),
    pytest.param(lambda f: f.sign(payload=f.payload(aud=["another-api"])), WrongAudience, id="aud-list-without-us"),
    pytest.param(lambda f: f.sign(f.header(typ="JWT")), WrongType, id="typ-JWT"),
    pytest.param(lambda f: f.sign(f.header(typ="jwt")), WrongType, id="typ-jwt"),
    pytest.param(lambda f: f.sign(f.header(typ=DELETE)), WrongType, id="typ-missing"),
    pytest.param(lambda f: f.sign(f.header(typ="dpop+jwt")), WrongType, id="typ-other"),
    pytest.param(
        lambda f: f.sign(payload=f.payload(iat=f.now + f.settings.clock_leeway + 60, exp=f.now + 3600)),
        NotYetValid,
        id="iat-in-the-future",
    ),
    pytest.param(
        lambda f: f.sign(payload=f.payload(nbf=f.now + f.settings.clock_leeway + 60)),
        NotYetValid,
        id="nbf-in-the-future",
    ),
    pytest.param(
        lambda f: f.sign(payload=f.payload(iat=f.now - 4000, exp=f.now - f.settings.clock_leeway - 1)),
        ExpiredToken,
        id="expired",
    ),
    *[
        pytest.param(lambda f, name=name: f.sign(payload=f.payload(**{name: DELETE})), InvalidClaims, id=f"no-{name}")
        for name in ("iss", "aud", "sub", "exp", "iat", "jti")
    ],
    pytest.param(lambda f: f.sign(payload=f.payload(sub=12345)), InvalidClaims, id="sub-not-a-string"),
    pytest.param(lambda f: f.sign(payload=f.payload(sub="")), InvalidClaims, id="sub-empty"),
    pytest.param(lambda f: f.sign(payload=f.payload(exp=str(f.claims["exp"]))), InvalidClaims, id="exp-string"),
    pytest.param(lambda f: f.sign(payload=f.payload(exp=None)), InvalidClaims, id="exp-null"),
    pytest.param(
        lambda f: f.sign(payload=json.dumps(f.payload(exp=float("nan"))).encode()), InvalidClaims, id="exp-NaN"
    ),
    pytest.param(
        lambda f: f.sign(payload=json.dumps(f.payload(exp=float("inf"))).encode()), InvalidClaims, id="exp-Infinity"
    ),
    pytest.param(lambda f: f.sign(payload=b"[1, 2, 3]"), MalformedToken, id="payload-not-an-object"),
    pytest.param(lambda f: f.sign(payload=b"not json"), MalformedToken, id="payload-not-json"),
    # things that are not an access token at all
    pytest.param(lambda f: f.refresh_token, MalformedToken, id="refresh-token-as-bearer"),
    pytest.param(lambda f: "garbage", MalformedToken, id="garbage"),
    pytest.param(lambda f: "a.b.c", MalformedToken, id="three-garbage-segments"),
    pytest.param(lambda f: "..", MalformedToken, id="empty-segments"),
    pytest.param(lambda f: "\u00e4\u00f6.\u00fc.x", MalformedToken, id="non-ascii"),
    pytest.param(lambda f: f.access_token + "." + f.access_token, MalformedToken, id="too-many-segments"),
    pytest.param(lambda f: "eyJ" + "A" * 70_000 + ".eyJ.sig", MalformedToken, id="huge"),
    pytest.param(lambda f: f.sign(payload=f.payload(pad="x" * 20_000)), MalformedToken, id="huge-but-validly-signed"),
]


@pytest.mark.parametrize(("attack", "expected"), ATTACKS)
async def test_attack_is_refused(
    forge: Forge, client: httpx.AsyncClient, attack: Attack, expected: type[TokenError]
) -> None:
    token = attack(forge)
    assert token != forge.access_token
    response = await client.get("/auth/me", headers={b"Authorization": f"Bearer {token}".encode()})
    assert_invalid_token(response)
    # The answer never echoes token material back.
    assert token not in response.headers["www-authenticate"]
    if len(token) > 8:
        assert token not in response.text
    # The issuer refused it for the reason the verifier gives, and counted it once.
    assert forge.failures() == {expected.reason: 1}
    with pytest.raises(expected):
        forge.verify(token)
    with pytest.raises(expected):
        forge.verify(token, required=BEARER_REQUIRED)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        pytest.param({"sid": DELETE}, "invalid_claims", id="no-sid"),
        pytest.param({"tokenVersion": DELETE}, "invalid_claims", id="no-tokenVersion"),
        pytest.param({"tokenVersion": "0"}, "invalid_claims", id="tokenVersion-string"),
        pytest.param({"tokenVersion": False}, "invalid_claims", id="tokenVersion-bool"),
        pytest.param({"tokenVersion": 0.0}, "invalid_claims", id="tokenVersion-float"),
        pytest.param({"tokenVersion": 1}, "revoked", id="tokenVersion-from-the-future"),
        pytest.param({"sub": "00000000-0000-0000-0000-000000000000"}, "unknown_user", id="sub-of-nobody"),
    ],
)
async def test_issuer_checks_its_own_claims(
    forge: Forge, client: httpx.AsyncClient, change: dict[str, Any], reason: str
) -> None:
    """Claims only the issuer's endpoints need: a validly signed token without them is still refused there."""
    token = forge.sign(payload=forge.payload(**change))
    assert_invalid_token(await me(client, token))
    assert forge.failures() == {reason: 1}
    if any(value is DELETE for value in change.values()):
        with pytest.raises(InvalidClaims):
            forge.verify(token, required=BEARER_REQUIRED)


async def test_access_token_is_not_a_refresh_token(forge: Forge, client: httpx.AsyncClient) -> None:
    assert_error(await refresh_body(client, forge.access_token), 401, "invalid_grant")
    client.cookies.set("refresh_token", forge.access_token, domain="issuer.test", path="/auth")
    assert_error(await client.post("/auth/refresh"), 401, "invalid_grant")
    client.cookies.clear()
    # The real refresh token still works: nothing above consumed or revoked the family.
    assert (await refresh_body(client, forge.refresh_token)).status_code == 200


async def test_attack_tokens_are_built_right(forge: Forge, client: httpx.AsyncClient) -> None:
    """Self-check of the forging helpers: joserfc (an independent encoder) agrees with the hand-built tokens,
    and the attacker's kid is its key's RFC 7638 thumbprint as joserfc computes it."""
    by_hand = forge.sign()
    by_joserfc = jose_jwt.encode(forge.header(), forge.claims, forge.key.signing_key, algorithms=["RS256"])
    assert jws.extract_compact(by_hand.encode()).headers() == jws.extract_compact(by_joserfc.encode()).headers()
    assert forge.verify(by_joserfc) == forge.verify(by_hand)
    assert (await me(client, by_hand)).status_code == 200
    assert kid_of(_ATTACKER_KEY) == RSAKey.import_key(_ATTACKER_KEY.public_key()).thumbprint()
    assert kid_of(forge.private_key) == forge.kid


# ------------------------------------------------------------------ algorithm before key


class KeyTouched(BaseException):
    """BaseException, so no ``except Exception`` inside the verifier can swallow it."""


class Tripwire(Mapping[str, RSAKey]):
    """A keys mapping that fails the test if the verifier looks at it at all."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def _trip(self, what: str) -> KeyTouched:
        self.touched.append(what)
        return KeyTouched(what)

    def __getitem__(self, kid: str) -> RSAKey:
        raise self._trip("__getitem__")

    def get(self, kid: object, default: object = None) -> Any:
        raise self._trip("get")

    def __contains__(self, kid: object) -> bool:
        raise self._trip("__contains__")

    def __iter__(self) -> Iterator[str]:
        raise self._trip("__iter__")

    def __len__(self) -> int:
        raise self._trip("__len__")

    def keys(self) -> Any:
        raise self._trip("keys")

    def values(self) -> Any:
        raise self._trip("values")

    def items(self) -> Any:
        raise self._trip("items")


def test_tripwire_trips() -> None:
    """The tripwire works: a well-formed RS256 token does reach the keys."""
    header = {"alg": "RS256", "typ": "at+jwt", "kid": "k"}
    token = compact(header, {"sub": "x"}, b"sig")
    keys = Tripwire()
    with pytest.raises(KeyTouched):
        verify_access_token(token, keys, issuer="https://issuer.test", audience="api", now=0, leeway=0)
    assert keys.touched


async def test_tripwire_trips_at_the_issuer(
    forge: Forge, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And at the issuer's own endpoint, a well-formed RS256 token (not yet memoized) reaches the keys."""
    keys = Tripwire()
    monkeypatch.setattr(forge.harness.services.keys.ring, "verification_key_map", lambda now: keys)
    with pytest.raises(KeyTouched):
        await me(client, forge.sign(payload=forge.payload(jti="never-seen-before")))
    assert keys.touched


@pytest.mark.parametrize(
    "token_for",
    [
        pytest.param(lambda f: compact(f.header(alg="none"), f.claims), id="none"),
        pytest.param(lambda f: hmac_signed(f.header(alg="HS256"), f.claims, _pem_spki(f)), id="hs256-pem"),
        pytest.param(lambda f: hmac_signed(f.header(alg="HS256"), f.claims, _n_bytes(f)), id="hs256-n"),
        pytest.param(lambda f: hmac_signed(f.header(alg="HS384"), f.claims, b"k", "sha384"), id="hs384"),
        pytest.param(lambda f: _swap_header(f, alg="RS512"), id="rs512"),
        pytest.param(lambda f: _swap_header(f, alg="ES256"), id="es256"),
        pytest.param(lambda f: _swap_header(f, alg="PS256"), id="ps256"),
        pytest.param(lambda f: _swap_header(f, alg="EdDSA"), id="eddsa"),
        pytest.param(lambda f: _swap_header(f, alg="RS256 "), id="rs256-with-blank"),
        pytest.param(lambda f: _swap_header(f, alg=""), id="empty"),
        pytest.param(lambda f: _swap_header(f, alg=None), id="null"),
    ],
)
async def test_algorithm_is_refused_before_any_key_is_used(
    forge: Forge, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, token_for: Attack
) -> None:
    token = token_for(forge)
    keys = Tripwire()
    with pytest.raises(UnsupportedAlgorithm):
        verify_access_token(
            token, keys, issuer=forge.settings.issuer_url, audience=forge.settings.audience, now=forge.now, leeway=5
        )
    assert keys.touched == []
    # The issuer's own endpoints check in the same order.
    at_issuer = Tripwire()
    monkeypatch.setattr(forge.harness.services.keys.ring, "verification_key_map", lambda now: at_issuer)
    assert_invalid_token(await me(client, token))
    assert at_issuer.touched == []
    assert forge.failures() == {"unsupported_alg": 1}
