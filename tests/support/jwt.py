"""The tests' JWT toolkit, written from the RFCs and independent of joserfc: base64url, compact-JWS parts,
RFC 7638 thumbprints, and hand-signed tokens (any header, any payload, any signature). A test that checks
the issuer's tokens with these does not check joserfc against itself."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def b64url_uint(value: int) -> str:
    """RFC 7518 section 2: the unsigned big-endian bytes of an integer, no leading zeros."""
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload of a compact JWS, decoded by hand and not verified."""
    header, payload, signature = token.split(".")
    assert signature
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload))


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, not verified."""
    return segments(token)[1]


def token_kid(token: str) -> str:
    kid = segments(token)[0]["kid"]
    assert isinstance(kid, str)
    return kid


def rfc7638_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 section 3: the required RSA members in lexicographic order, no whitespace, SHA-256, base64url."""
    for member in ("e", "kty", "n"):
        assert isinstance(jwk[member], str)
        assert '"' not in jwk[member]
        assert "\\" not in jwk[member]
    canonical = '{"e":"' + jwk["e"] + '","kty":"' + jwk["kty"] + '","n":"' + jwk["n"] + '"}'
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def kid_of(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """The RFC 7638 thumbprint of an RSA key: the kid the issuer gives it."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    numbers = public.public_numbers()
    return rfc7638_thumbprint({"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)})


# ---------------------------------------------------------------- hand-built tokens


def _payload_bytes(payload: Mapping[str, Any] | bytes) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()


def compact(header: Mapping[str, Any], payload: Mapping[str, Any] | bytes, signature: bytes = b"") -> str:
    """A compact serialization built by hand: any header, any payload (claims, or raw bytes), any signature."""
    return f"{b64url_json(header)}.{b64url(_payload_bytes(payload))}.{b64url(signature)}"


def rsa_signed(
    header: Mapping[str, Any],
    payload: Mapping[str, Any] | bytes,
    private_key: rsa.RSAPrivateKey,
    *,
    pad: padding.AsymmetricPadding | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> str:
    """Signed with ``cryptography`` directly, whatever the header says (RS256 by default; PSS or another hash
    for algorithm confusion)."""
    signing_input = f"{b64url_json(header)}.{b64url(_payload_bytes(payload))}"
    signature = private_key.sign(signing_input.encode("ascii"), pad or padding.PKCS1v15(), algorithm or hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def hmac_signed(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes, digest: str = "sha256") -> str:
    """An HMAC over the signing input keyed with ``secret`` (the RS/HS confusion uses the public key's bytes)."""
    signing_input = f"{b64url_json(header)}.{b64url_json(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), getattr(hashlib, digest)).digest()
    return f"{signing_input}.{b64url(mac)}"
