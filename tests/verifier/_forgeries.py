"""The forged-token catalogue: every way the tests attack a token, each changing one thing in an otherwise valid
one, with the refusal the verifier must give. test_verify.py sends each to ``AccessTokenVerifier``,
test_starlette.py to a resource service behind ``bearer_middleware``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from issuer.verifier import (
    BadSignature,
    ExpiredToken,
    InvalidClaims,
    MalformedToken,
    NotYetValid,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongIssuer,
    WrongType,
)
from tests.support.clock import FakeClock
from tests.support.jwt import b64url, b64url_decode, b64url_json, kid_of, rsa_signed
from tests.support.verifier import (
    DELETE,
    ISSUER,
    LEEWAY,
    changed,
    claims_for,
    header_for,
    private_key,
    public_jwk,
)


@dataclass
class Forge:
    clock: FakeClock
    key: rsa.RSAPrivateKey
    attacker: rsa.RSAPrivateKey
    claims: dict[str, Any]
    token: str

    @property
    def now(self) -> int:
        return int(self.clock.wall())

    def header(self, **changes: Any) -> dict[str, Any]:
        return header_for(self.key, **changes)

    def payload(self, **changes: Any) -> dict[str, Any]:
        return changed(self.claims, changes)

    def sign(self, header: dict[str, Any] | None = None, payload: dict[str, Any] | bytes | None = None) -> str:
        """Validly signed by the real key: only the property under test is wrong."""
        return rsa_signed(header or self.header(), self.claims if payload is None else payload, self.key)

    def swap_header(self, **changes: Any) -> str:
        _, payload, signature = self.token.split(".")
        return f"{b64url_json(self.header(**changes))}.{payload}.{signature}"

    def swap_payload(self, **changes: Any) -> str:
        header, _, signature = self.token.split(".")
        return f"{header}.{b64url_json(self.payload(**changes))}.{signature}"

    def hmac(self, alg: str, secret: bytes) -> str:
        signing_input = f"{b64url_json(self.header(alg=alg))}.{b64url_json(self.claims)}"
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), digest).digest())}"

    def unsigned(self, **header_changes: Any) -> str:
        return f"{b64url_json(self.header(**header_changes))}.{b64url_json(self.claims)}."

    # what an attacker has: everything public about the real key
    def spki_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def pkcs1_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)

    def jwk_json(self) -> bytes:
        return json.dumps(public_jwk(self.key)).encode()

    def n_bytes(self) -> bytes:
        n = self.key.public_key().public_numbers().n
        return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _sig(f: Forge, header: dict[str, Any], key: rsa.RSAPrivateKey, pad: Any = None, algorithm: Any = None) -> str:
    signing_input = f"{b64url_json(header)}.{b64url_json(f.claims)}"
    signature = key.sign(signing_input.encode(), pad or padding.PKCS1v15(), algorithm or hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


Attack = Callable[[Forge], str]

ATTACKS: list[Any] = [
    # alg none
    pytest.param(lambda f: f.unsigned(alg="none"), UnsupportedAlgorithm, id="alg-none"),
    pytest.param(lambda f: f.unsigned(alg="None"), UnsupportedAlgorithm, id="alg-None"),
    pytest.param(lambda f: f.unsigned(alg="nOnE"), UnsupportedAlgorithm, id="alg-nOnE"),
    pytest.param(lambda f: f.swap_header(alg="none"), UnsupportedAlgorithm, id="alg-none-with-a-real-signature"),
    pytest.param(lambda f: f.unsigned(alg=DELETE), MalformedToken, id="alg-missing"),
    pytest.param(lambda f: f.unsigned(alg=None), UnsupportedAlgorithm, id="alg-null"),
    # HMAC keyed with the public key in every form an attacker can get it (RS/HS confusion)
    pytest.param(lambda f: f.hmac("HS256", f.spki_pem()), UnsupportedAlgorithm, id="hs256-spki-pem"),
    pytest.param(lambda f: f.hmac("HS256", f.pkcs1_pem()), UnsupportedAlgorithm, id="hs256-pkcs1-pem"),
    pytest.param(lambda f: f.hmac("HS256", f.jwk_json()), UnsupportedAlgorithm, id="hs256-jwk-json"),
    pytest.param(lambda f: f.hmac("HS256", f.n_bytes()), UnsupportedAlgorithm, id="hs256-modulus"),
    pytest.param(lambda f: f.hmac("HS384", f.spki_pem()), UnsupportedAlgorithm, id="hs384-spki-pem"),
    pytest.param(lambda f: f.hmac("HS512", f.jwk_json()), UnsupportedAlgorithm, id="hs512-jwk-json"),
    # other algorithms, even with the real key
    pytest.param(
        lambda f: _sig(f, f.header(alg="RS512"), f.key, algorithm=hashes.SHA512()), UnsupportedAlgorithm, id="rs512"
    ),
    pytest.param(
        lambda f: _sig(
            f, f.header(alg="PS256"), f.key, pad=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        ),
        UnsupportedAlgorithm,
        id="ps256",
    ),
    pytest.param(lambda f: f.swap_header(alg="ES256"), UnsupportedAlgorithm, id="es256"),
    pytest.param(lambda f: f.swap_header(alg="rs256"), UnsupportedAlgorithm, id="alg-lowercase"),
    pytest.param(lambda f: f.swap_header(alg=["RS256"]), UnsupportedAlgorithm, id="alg-list"),
    # kid games
    pytest.param(lambda f: f.sign(f.header(kid="not-published")), UnknownKey, id="unknown-kid"),
    pytest.param(lambda f: f.sign(f.header(kid=DELETE)), UnknownKey, id="no-kid"),
    pytest.param(lambda f: f.sign(f.header(kid="")), UnknownKey, id="empty-kid"),
    pytest.param(lambda f: f.sign(f.header(kid=7)), UnknownKey, id="kid-number"),
    pytest.param(lambda f: f.sign(f.header(kid={"$ne": ""})), UnknownKey, id="kid-object"),
    pytest.param(lambda f: f.sign(f.header(kid="../../../.well-known/jwks.json")), UnknownKey, id="kid-path"),
    pytest.param(lambda f: f.sign(f.header(kid="x' OR '1'='1")), UnknownKey, id="kid-sql"),
    pytest.param(lambda f: f.sign(f.header(kid="k" * 300)), UnknownKey, id="kid-long"),
    pytest.param(lambda f: f.sign(f.header(kid="k" * 3000)), MalformedToken, id="header-oversize"),
    pytest.param(lambda f: _sig(f, f.header(kid=kid_of(f.attacker)), f.attacker), UnknownKey, id="own-key-own-kid"),
    pytest.param(lambda f: _sig(f, f.header(), f.attacker), BadSignature, id="own-key-real-kid"),
    # headers that try to supply or locate the key, or change processing
    pytest.param(
        lambda f: _sig(f, f.header(jwk=public_jwk(f.attacker)), f.attacker), MalformedToken, id="embedded-jwk"
    ),
    pytest.param(
        lambda f: _sig(f, f.header(kid=kid_of(f.attacker), jku="https://evil.test/jwks.json"), f.attacker),
        MalformedToken,
        id="jku",
    ),
    pytest.param(lambda f: _sig(f, f.header(x5u="https://evil.test/cert.pem"), f.attacker), MalformedToken, id="x5u"),
    pytest.param(lambda f: _sig(f, f.header(x5c=["MIIBIjAN"]), f.attacker), MalformedToken, id="x5c"),
    pytest.param(lambda f: f.sign(f.header(crit=["exp"])), MalformedToken, id="crit"),
    pytest.param(lambda f: f.sign(f.header(b64=False, crit=["b64"])), MalformedToken, id="b64-false"),
    # tampering, keeping the real signature
    pytest.param(lambda f: f.swap_payload(sub="someone-else"), BadSignature, id="tampered-sub"),
    pytest.param(lambda f: f.swap_payload(role="admin"), BadSignature, id="tampered-role"),
    pytest.param(lambda f: f.swap_payload(exp=f.claims["exp"] + 86400), BadSignature, id="tampered-exp"),
    pytest.param(lambda f: f.swap_payload(aud="another-api"), BadSignature, id="tampered-aud"),
    pytest.param(lambda f: f.swap_header(typ="application/at+jwt"), BadSignature, id="tampered-header-typ"),
    pytest.param(lambda f: f.swap_header(cty="JWT"), BadSignature, id="tampered-header-extra-member"),
    pytest.param(lambda f: f.token.rsplit(".", 1)[0] + ".", BadSignature, id="signature-stripped"),
    pytest.param(lambda f: f.token.rsplit(".", 1)[0] + "." + b64url(bytes(256)), BadSignature, id="zero-signature"),
    pytest.param(lambda f: f.token[:-8], BadSignature, id="signature-truncated"),
    pytest.param(lambda f: _flip_last_signature_byte(f.token), BadSignature, id="signature-bit-flip"),
    pytest.param(
        lambda f: f.token.rsplit(".", 1)[0] + "." + f.sign(payload=f.payload(jti="other")).rsplit(".", 1)[1],
        BadSignature,
        id="signature-of-another-token",
    ),
    # claims, validly signed
    pytest.param(lambda f: f.sign(payload=f.payload(iss="https://evil.test")), WrongIssuer, id="wrong-iss"),
    pytest.param(lambda f: f.sign(payload=f.payload(iss=ISSUER + "/")), WrongIssuer, id="iss-trailing-slash"),
    pytest.param(lambda f: f.sign(payload=f.payload(iss=[ISSUER])), WrongIssuer, id="iss-list"),
    pytest.param(lambda f: f.sign(payload=f.payload(aud="another-api")), WrongAudience, id="wrong-aud"),
    pytest.param(lambda f: f.sign(payload=f.payload(aud=["a", "b"])), WrongAudience, id="aud-list-without-us"),
    pytest.param(lambda f: f.sign(payload=f.payload(aud="API")), WrongAudience, id="aud-case"),
    pytest.param(lambda f: f.sign(f.header(typ="JWT")), WrongType, id="typ-JWT"),
    pytest.param(lambda f: f.sign(f.header(typ=DELETE)), WrongType, id="typ-missing"),
    pytest.param(lambda f: f.sign(f.header(typ="dpop+jwt")), WrongType, id="typ-dpop"),
    pytest.param(lambda f: f.sign(f.header(typ=["at+jwt"])), WrongType, id="typ-list"),
    pytest.param(lambda f: f.sign(payload=f.payload(iat=f.now - 2000, exp=f.now - LEEWAY)), ExpiredToken, id="expired"),
    pytest.param(
        lambda f: f.sign(payload=f.payload(iat=f.now + LEEWAY + 1, exp=f.now + 900)), NotYetValid, id="iat-future"
    ),
    pytest.param(lambda f: f.sign(payload=f.payload(nbf=f.now + LEEWAY + 1)), NotYetValid, id="nbf-future"),
    *[
        pytest.param(lambda f, name=name: f.sign(payload=f.payload(**{name: DELETE})), InvalidClaims, id=f"no-{name}")
        for name in ("iss", "aud", "sub", "exp", "iat", "jti")
    ],
    pytest.param(lambda f: f.sign(payload=f.payload(sub=42)), InvalidClaims, id="sub-number"),
    pytest.param(lambda f: f.sign(payload=f.payload(sub="")), InvalidClaims, id="sub-empty"),
    pytest.param(lambda f: f.sign(payload=f.payload(exp=str(f.claims["exp"]))), InvalidClaims, id="exp-string"),
    pytest.param(lambda f: f.sign(payload=f.payload(exp=True)), InvalidClaims, id="exp-bool"),
    pytest.param(
        lambda f: f.sign(payload=json.dumps(f.payload(exp=float("nan"))).encode()), InvalidClaims, id="exp-NaN"
    ),
    pytest.param(
        lambda f: f.sign(payload=json.dumps(f.payload(exp=float("inf"))).encode()), InvalidClaims, id="exp-Infinity"
    ),
    pytest.param(lambda f: f.sign(payload=f.payload(role=["admin"])), InvalidClaims, id="role-list"),
    pytest.param(lambda f: f.sign(payload=f.payload(tokenVersion="0")), InvalidClaims, id="tokenVersion-string"),
    pytest.param(lambda f: f.sign(payload=f.payload(sid=7)), InvalidClaims, id="sid-number"),
    pytest.param(lambda f: f.sign(payload=f.payload(scope=["admin"])), InvalidClaims, id="scope-list"),
    pytest.param(lambda f: f.sign(payload=b"[1, 2, 3]"), MalformedToken, id="payload-array"),
    pytest.param(lambda f: f.sign(payload=b"not json"), MalformedToken, id="payload-not-json"),
    # not a token at all, or too big
    pytest.param(lambda f: "", MalformedToken, id="empty"),
    pytest.param(lambda f: "garbage", MalformedToken, id="garbage"),
    pytest.param(lambda f: "a.b.c", MalformedToken, id="garbage-segments"),
    pytest.param(lambda f: "..", MalformedToken, id="empty-segments"),
    pytest.param(lambda f: f.token + "." + f.token, MalformedToken, id="too-many-segments"),
    pytest.param(lambda f: "\u00e4\u00f6.\u00fc.x", MalformedToken, id="non-ascii"),
    pytest.param(lambda f: f.token[:40] + "\u2603" + f.token[40:], MalformedToken, id="non-ascii-inside"),
    pytest.param(lambda f: f.token[:40] + "\x00" + f.token[40:], MalformedToken, id="nul-inside"),
    pytest.param(lambda f: f.token + "\n", MalformedToken, id="trailing-newline"),
    pytest.param(lambda f: f.token[:30] + " " + f.token[30:], MalformedToken, id="space-inside"),
    pytest.param(lambda f: f.token + "==", MalformedToken, id="padded"),
    pytest.param(lambda f: "eyJ" + "A" * 70_000 + ".eyJ.sig", MalformedToken, id="oversize-garbage"),
    pytest.param(lambda f: f.sign(payload=f.payload(pad="x" * 9000)), MalformedToken, id="oversize-validly-signed"),
    pytest.param(lambda f: b64url(secrets.token_bytes(48)), MalformedToken, id="opaque-like-a-refresh-token"),
]


# HTTP cannot carry these in a header (the empty Bearer token is a middleware test of its own).
IN_A_HEADER = [p for p in ATTACKS if p.id not in {"empty", "nul-inside", "trailing-newline"}]


def _flip_last_signature_byte(token: str) -> str:
    head, signature = token.rsplit(".", 1)
    raw = bytearray(b64url_decode(signature))
    raw[-1] ^= 1
    return f"{head}.{b64url(bytes(raw))}"


def forge_for(clock: FakeClock) -> Forge:
    """A valid token signed by key 0 (the one the fake issuer publishes), and key 1 as the attacker's own."""
    key = private_key(0)
    claims = claims_for(clock)
    return Forge(clock, key, private_key(1), claims, rsa_signed(header_for(key), claims, key))
