"""Forged, tampered and misused tokens: refused at the issuer's Bearer endpoints and by the shipped verifier."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jws
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey

from issuer.keys.ring import LoadedKey
from issuer.settings import Settings
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
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness
from tests.support.verifier import DELETE, changed

# What the issuer's own endpoints require on top of the verifier's defaults (issuer/bearer.py).
BEARER_REQUIRED = ("iss", "aud", "sub", "exp", "iat", "jti", "sid", "tokenVersion")


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def unb64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def compact(header: Mapping[str, Any], payload: Mapping[str, Any] | bytes, signature: bytes = b"") -> str:
    """Hand-built compact serialization: any header, any payload, any signature bytes."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    return f"{b64url_json(header)}.{b64url(body)}.{b64url(signature)}"


def hmac_signed(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes, digest: str = "sha256") -> str:
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), getattr(hashlib, digest)).digest()
    return f"{signing_input}.{b64url(mac)}"


def rsa_signed(
    header: Mapping[str, Any],
    payload: Mapping[str, Any] | bytes,
    private_key: rsa.RSAPrivateKey,
    *,
    pad: padding.AsymmetricPadding | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> str:
    """Sign with cryptography directly, whatever the header says (for alg-confusion and foreign keys)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    signing_input = f"{b64url_json(header)}.{b64url(body)}"
    signature = private_key.sign(signing_input.encode("ascii"), pad or padding.PKCS1v15(), algorithm or hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


_ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Forge:
    """Everything an attack needs: a real signed-in user, the issuer's real key, and the verifier's inputs."""

    harness: IssuerHarness
    settings: Settings
    key: LoadedKey
    access_token: str
    refresh_token: str
    claims: dict[str, Any]
    other_user_id: str

    @property
    def kid(self) -> str:
        return self.key.record.kid

    @property
    def now(self) -> int:
        return int(self.harness.clock().timestamp())

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        private = self.key.signing_key.private_key
        assert isinstance(private, rsa.RSAPrivateKey)
        return private

    def header(self, **changes: Any) -> dict[str, Any]:
        return changed({"alg": "RS256", "typ": "at+jwt", "kid": self.kid}, changes)

    def payload(self, **changes: Any) -> dict[str, Any]:
        return changed(self.claims, changes)

    def sign(self, header: dict[str, Any] | None = None, payload: dict[str, Any] | bytes | None = None) -> str:
        """Validly signed by the issuer's own key: only the property under test is wrong."""
        return rsa_signed(header or self.header(), self.claims if payload is None else payload, self.private_key)

    def verify(self, token: str, *, required: tuple[str, ...] | None = None) -> dict[str, Any]:
        now = self.harness.clock()
        keys = self.harness.services.keys.ring.verification_key_map(now)
        extra = {} if required is None else {"required_claims": required}
        return verify_access_token(
            token,
            keys,
            issuer=self.settings.issuer_url,
            audience=self.settings.audience,
            now=int(now.timestamp()),
            leeway=self.settings.clock_leeway,
            **extra,
        )


@pytest.fixture
async def forge(client: httpx.AsyncClient, issuer: IssuerHarness) -> Forge:
    await register(client)
    other = await register(client, email="mallory@example.com")
    tokens = await login(client)
    key = issuer.services.keys.signing_key(issuer.clock())
    assert key is not None
    claims = json.loads(unb64url(tokens["access_token"].split(".")[1]))
    forge = Forge(
        harness=issuer,
        settings=issuer.services.settings,
        key=key,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        claims=claims,
        other_user_id=other["id"],
    )
    # The baseline is sound: the real token and a token re-signed by the real key both pass everywhere,
    # so every refusal below is caused by the one thing each attack changes.
    for token in (forge.access_token, forge.sign()):
        assert forge.verify(token, required=BEARER_REQUIRED)["sub"] == claims["sub"]
        response = await client.get("/auth/me", headers=bearer(token))
        assert response.status_code == 200, response.text
    return forge


def assert_invalid_token(response: httpx.Response) -> None:
    assert_error(response, 401, "invalid_token")
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    assert "error_description=" in challenge


# ------------------------------------------------------------------ the attacks


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
    header, _, signature = f.access_token.split(".")
    return f"{header}.{b64url_json(f.payload(**changes))}.{signature}"


def _swap_header(f: Forge, **changes: Any) -> str:
    _, payload, signature = f.access_token.split(".")
    return f"{b64url_json(f.header(**changes))}.{payload}.{signature}"


def _attacker_kid() -> str:
    return RSAKey.import_key(_ATTACKER_KEY.public_key()).thumbprint()


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
        lambda f: rsa_signed(f.header(kid=_attacker_kid()), f.claims, _ATTACKER_KEY),
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
        lambda f: rsa_signed(f.header(kid=_attacker_kid(), jku="https://evil.test/jwks.json"), f.claims, _ATTACKER_KEY),
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
    response = await client.get("/auth/me", headers={"Authorization": f"Bearer {token}".encode()})
    assert_invalid_token(response)
    # The challenge never echoes token material back.
    assert token not in response.headers["www-authenticate"]
    with pytest.raises(expected):
        forge.verify(token)
    with pytest.raises(expected):
        forge.verify(token, required=BEARER_REQUIRED)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"sid": DELETE}, id="no-sid"),
        pytest.param({"tokenVersion": DELETE}, id="no-tokenVersion"),
        pytest.param({"tokenVersion": "0"}, id="tokenVersion-string"),
        pytest.param({"tokenVersion": False}, id="tokenVersion-bool"),
        pytest.param({"tokenVersion": 0.0}, id="tokenVersion-float"),
        pytest.param({"tokenVersion": 1}, id="tokenVersion-from-the-future"),
        pytest.param({"sub": "00000000-0000-0000-0000-000000000000"}, id="sub-of-nobody"),
    ],
)
async def test_issuer_checks_its_own_claims(forge: Forge, client: httpx.AsyncClient, change: dict[str, Any]) -> None:
    """Claims only the issuer's endpoints need: a validly signed token without them is still refused there."""
    token = forge.sign(payload=forge.payload(**change))
    response = await client.get("/auth/me", headers=bearer(token))
    assert_invalid_token(response)
    if any(value is DELETE for value in change.values()):
        with pytest.raises(InvalidClaims):
            forge.verify(token, required=BEARER_REQUIRED)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer    ", id="scheme-and-blanks"),
        pytest.param("Bearer not a token", id="bearer-garbage"),
        pytest.param("Bearer \u00e9\u00e9\u00e9.\u00e9.\u00e9", id="bearer-non-ascii"),
    ],
)
async def test_bad_authorization_headers(forge: Forge, client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/auth/me", headers={"Authorization": header.encode("utf-8")})
    assert_invalid_token(response)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("", id="empty"),
        pytest.param("Basic YWxpY2U6cGFzc3dvcmQ=", id="basic"),
        pytest.param("Token abc.def.ghi", id="other-scheme"),
    ],
)
async def test_other_schemes_count_as_no_credentials(client: httpx.AsyncClient, header: str) -> None:
    """RFC 6750 section 3.1: an unsupported authentication method gets the bare challenge, no error code."""
    response = await client.get("/auth/me", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("scheme", ["Basic", "Token", "MAC", "Bearer:", "Bearerx"])
async def test_real_token_under_another_scheme(forge: Forge, client: httpx.AsyncClient, scheme: str) -> None:
    response = await client.get("/auth/me", headers={"Authorization": f"{scheme} {forge.access_token}"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_scheme_is_case_insensitive_control(forge: Forge, client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/me", headers={"Authorization": f"bearer {forge.access_token}"})
    assert response.status_code == 200


async def test_no_credentials_is_a_bare_challenge(forge: Forge, client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/me")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_huge_authorization_header(forge: Forge, client: httpx.AsyncClient) -> None:
    response = await client.get("/auth/me", headers=bearer(forge.access_token + "A" * 1_000_000))
    assert_invalid_token(response)


# ------------------------------------------------------------------ time, driven by the FakeClock


async def test_expired_after_ttl_plus_leeway(forge: Forge, client: httpx.AsyncClient) -> None:
    settings, clock = forge.settings, forge.harness.clock
    exp = forge.claims["exp"]
    # Last second inside the leeway: still accepted.
    clock.advance(exp + settings.clock_leeway - 1 - forge.now)
    assert (await client.get("/auth/me", headers=bearer(forge.access_token))).status_code == 200
    assert forge.verify(forge.access_token)["sub"] == forge.claims["sub"]
    clock.advance(2)
    assert forge.now > exp + settings.clock_leeway
    assert_invalid_token(await client.get("/auth/me", headers=bearer(forge.access_token)))
    with pytest.raises(ExpiredToken):
        forge.verify(forge.access_token)


async def test_iat_within_leeway_is_accepted_and_beyond_is_not(forge: Forge, client: httpx.AsyncClient) -> None:
    leeway = forge.settings.clock_leeway
    inside = forge.sign(payload=forge.payload(iat=forge.now + leeway, exp=forge.now + leeway + 900))
    assert (await client.get("/auth/me", headers=bearer(inside))).status_code == 200
    assert forge.verify(inside)["iat"] == forge.now + leeway
    beyond = forge.sign(payload=forge.payload(iat=forge.now + leeway + 1, exp=forge.now + leeway + 901))
    assert_invalid_token(await client.get("/auth/me", headers=bearer(beyond)))
    with pytest.raises(NotYetValid):
        forge.verify(beyond)


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
async def test_algorithm_is_refused_before_any_key_is_used(forge: Forge, token_for: Attack) -> None:
    token = token_for(forge)
    keys = Tripwire()
    with pytest.raises(UnsupportedAlgorithm):
        verify_access_token(
            token, keys, issuer=forge.settings.issuer_url, audience=forge.settings.audience, now=forge.now, leeway=5
        )
    assert keys.touched == []


# ------------------------------------------------------------------ state the issuer holds


async def test_token_version_below_current_after_logout_all(forge: Forge, client: httpx.AsyncClient) -> None:
    second = await login(client)
    response = await client.post("/auth/logout-all", headers=bearer(forge.access_token))
    assert response.status_code == 204
    for old in (forge.access_token, second["access_token"]):
        assert_invalid_token(await client.get("/auth/me", headers=bearer(old)))
        assert_invalid_token(await client.get("/auth/sessions", headers=bearer(old)))
        # Still a well-formed, unexpired, correctly signed token: only the version makes it dead.
        assert forge.verify(old, required=BEARER_REQUIRED)["tokenVersion"] == 0
    # A token that claims the new version, signed by the real key, is accepted: the version is the only reason.
    current = forge.sign(payload=forge.payload(tokenVersion=1))
    assert (await client.get("/auth/me", headers=bearer(current))).status_code == 200
    fresh = await login(client)
    me = await client.get("/auth/me", headers=bearer(fresh["access_token"]))
    assert me.status_code == 200
    assert me.json()["tokenVersion"] == 1


async def test_token_of_a_deleted_user(forge: Forge, client: httpx.AsyncClient) -> None:
    response = await client.request(
        "DELETE", "/auth/account", headers=bearer(forge.access_token), json={"password": PASSWORD}
    )
    assert response.status_code == 204, response.text
    assert_invalid_token(await client.get("/auth/me", headers=bearer(forge.access_token)))
    assert_invalid_token(await client.get("/auth/sessions", headers=bearer(forge.access_token)))
    # Re-signing the same claims does not help either: the user is gone.
    assert_invalid_token(await client.get("/auth/me", headers=bearer(forge.sign())))


async def test_access_token_is_not_a_refresh_token(forge: Forge, client: httpx.AsyncClient) -> None:
    assert_error(await refresh_body(client, forge.access_token), 401, "invalid_grant")
    client.cookies.set("refresh_token", forge.access_token, domain="issuer.test", path="/auth")
    assert_error(await client.post("/auth/refresh"), 401, "invalid_grant")
    client.cookies.clear()
    # The real refresh token still works: nothing above consumed or revoked the family.
    assert (await refresh_body(client, forge.refresh_token)).status_code == 200


async def test_attack_tokens_are_built_right(forge: Forge) -> None:
    """Self-check of the forging helpers: joserfc (an independent encoder) agrees with the hand-built tokens."""
    by_hand = forge.sign()
    by_joserfc = jose_jwt.encode(forge.header(), forge.claims, forge.key.signing_key, algorithms=["RS256"])
    assert jws.extract_compact(by_hand.encode()).headers() == jws.extract_compact(by_joserfc.encode()).headers()
    assert forge.verify(by_joserfc) == forge.verify(by_hand)
