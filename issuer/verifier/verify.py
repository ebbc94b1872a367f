"""Access-token verification: pure, given the keys and the time. No I/O, no server imports.

Order matters (RFC 8725): the header is checked against the allow-list before any key is looked up, and
claims are only read from a payload whose signature has been checked. The steps are separate functions so
:class:`~issuer.verifier.AccessTokenVerifier` can look the key up in its JWKS cache between them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from joserfc import errors as jose_errors
from joserfc import jws
from joserfc.jwk import RSAKey
from joserfc.jws import CompactSignature
from joserfc.jwt import JWTClaimsRegistry
from joserfc.util import urlsafe_b64decode

from issuer.verifier.errors import (
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

ALLOWED_ALGORITHMS = ("RS256",)
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti")
MAX_TOKEN_LENGTH = 8192
# Keys come from the JWKS only: a token must not say where to find its key (jku, x5u), carry one (jwk, x5c),
# or change how it is processed (crit, b64).
REFUSED_HEADER_PARAMETERS = frozenset({"crit", "jku", "x5u", "jwk", "x5c", "b64"})

# Three base64url segments and nothing else (no padding, whitespace or non-ASCII): one spelling per token.
# A JWS in compact serialization: three base64url segments, the signature possibly empty (then refused later).
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# RS256 (RFC 7518 section 3.3), the only algorithm parse_token lets through.
_RS256_PADDING = padding.PKCS1v15()
_RS256_HASH = hashes.SHA256()


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token whose header passed the allow-list; nothing in it is trusted yet."""

    compact: CompactSignature
    header: dict[str, Any]
    kid: str | None


def verify_access_token(
    token: str,
    keys: Mapping[str, RSAKey],
    *,
    issuer: str,
    audience: str,
    now: int,
    leeway: int,
    required_claims: tuple[str, ...] = REQUIRED_CLAIMS,
) -> dict[str, Any]:
    """Return the claims of a valid access token, or raise a :class:`TokenError` subclass."""
    parsed = parse_token(token)
    _, key = key_for(parsed, keys)
    claims = verify_signature(parsed, key)
    check_claims(claims, issuer=issuer, audience=audience, now=now, leeway=leeway, required=required_claims)
    return claims


def parse_token(token: str) -> ParsedToken:
    """Split the token and check its header: size, RS256 only, ``typ`` at+jwt, no key-locating parameters.

    Touches no key: an ``alg`` of ``none`` or ``HS256`` is refused here, before anyone looks a key up.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not COMPACT_JWS.fullmatch(token):
        raise MalformedToken()
    try:
        compact = jws.extract_compact(token.encode("ascii"))
        header = compact.headers()
    except (jose_errors.JoseError, ValueError, TypeError, UnicodeError):
        raise MalformedToken() from None

    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise UnsupportedAlgorithm()
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise WrongType()
    if not REFUSED_HEADER_PARAMETERS.isdisjoint(header):
        raise MalformedToken("The access token header carries parameters this verifier refuses.")
    kid = header.get("kid")
    return ParsedToken(compact, header, kid if isinstance(kid, str) and kid else None)


def key_for(parsed: ParsedToken, keys: Mapping[str, RSAKey]) -> tuple[str, RSAKey]:
    """The token's kid and the key it names in ``keys``; UnknownKey when it names none."""
    key = keys.get(parsed.kid) if parsed.kid is not None else None
    if parsed.kid is None or key is None:
        raise UnknownKey()
    return parsed.kid, key


def verify_signature(parsed: ParsedToken, key: RSAKey) -> dict[str, Any]:
    """Check the RS256 signature with ``key``; return the payload as a JSON object (claims not checked yet).

    ``parse_token`` has pinned the algorithm to RS256, so this calls cryptography's RSASSA-PKCS1-v1_5/SHA-256
    directly rather than looking the algorithm up again: the hot path of every resource service.
    """
    public = key.public_key
    if not isinstance(public, RSAPublicKey):
        raise BadSignature()
    segments = parsed.compact.segments
    try:
        signature = urlsafe_b64decode(segments["signature"])
        public.verify(signature, segments["header"] + b"." + segments["payload"], _RS256_PADDING, _RS256_HASH)
    except (InvalidSignature, ValueError, TypeError):
        raise BadSignature() from None
    try:
        claims = json.loads(parsed.compact.payload)
    except (ValueError, UnicodeDecodeError):
        raise MalformedToken() from None
    if not isinstance(claims, dict):
        raise MalformedToken()
    return claims


def claims_registry(*, issuer: str, audience: str, now: int | Callable[[], int], leeway: int) -> JWTClaimsRegistry:
    """The time, ``iss`` and ``aud`` rules; ``now`` may be a callable so one registry serves many tokens."""
    return JWTClaimsRegistry(
        now=now,
        leeway=leeway,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
    )


def check_claims(
    claims: dict[str, Any], *, issuer: str, audience: str, now: int, leeway: int, required: tuple[str, ...]
) -> None:
    registry = claims_registry(issuer=issuer, audience=audience, now=now, leeway=leeway)
    check_claims_with(claims, registry, required)


def check_claims_with(claims: dict[str, Any], registry: JWTClaimsRegistry, required: tuple[str, ...]) -> None:
    """Required claims present, then ``iss``/``aud``/``exp``/``nbf``/``iat`` per ``registry``, then ``sub``."""
    for name in required:
        if name not in claims:
            raise InvalidClaims(f"The access token lacks the claim {name!r}.")
    try:
        registry.validate(claims)
    except jose_errors.ExpiredTokenError:
        raise ExpiredToken() from None
    except jose_errors.InvalidClaimError as exc:
        if exc.claim == "iss":
            raise WrongIssuer() from None
        if exc.claim == "aud":
            raise WrongAudience() from None
        if exc.claim in {"nbf", "iat"} and _is_number(claims.get(exc.claim)):
            raise NotYetValid() from None
        raise InvalidClaims(f"The access token has an invalid {exc.claim!r} claim.") from None
    except jose_errors.JoseError:
        raise InvalidClaims() from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidClaims("The access token has an invalid 'sub' claim.")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
