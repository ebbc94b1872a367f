"""Access-token verification: pure, given the keys and the time. No I/O, no server imports.

Order matters (RFC 8725): the header is checked against the allow-list before any key is looked up, and
claims are only read from a payload whose signature has been checked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from joserfc import errors as jose_errors
from joserfc import jws
from joserfc.jwk import RSAKey
from joserfc.jwt import JWTClaimsRegistry

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
    if not token or len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        raise MalformedToken()
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        header = obj.headers()
    except (jose_errors.JoseError, ValueError, TypeError, UnicodeError):
        raise MalformedToken() from None

    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise UnsupportedAlgorithm()
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise WrongType()
    if "crit" in header or "jku" in header or "x5u" in header or "jwk" in header:
        # Keys come from our JWKS only; a token must not point at where to find its key.
        raise MalformedToken("The access token header carries parameters this verifier refuses.")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise UnknownKey()

    try:
        valid = jws.validate_compact(obj, key, algorithms=list(ALLOWED_ALGORITHMS))
    except jose_errors.JoseError:
        valid = False
    if not valid:
        raise BadSignature()

    try:
        claims = json.loads(obj.payload)
    except (ValueError, UnicodeDecodeError):
        raise MalformedToken() from None
    if not isinstance(claims, dict):
        raise MalformedToken()
    check_claims(claims, issuer=issuer, audience=audience, now=now, leeway=leeway, required=required_claims)
    return claims


def check_claims(
    claims: dict[str, Any], *, issuer: str, audience: str, now: int, leeway: int, required: tuple[str, ...]
) -> None:
    missing = [name for name in required if name not in claims]
    if missing:
        raise InvalidClaims(f"The access token lacks the claim {missing[0]!r}.")
    registry = JWTClaimsRegistry(
        now=now,
        leeway=leeway,
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": audience},
    )
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
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise InvalidClaims("The access token has an invalid 'sub' claim.")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
