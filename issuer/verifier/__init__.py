"""Verify the issuer's access tokens in a resource service or gateway. Imports nothing from the server side.

``issuer.verifier`` needs joserfc, cryptography and httpx only; ``issuer.verifier.starlette`` (the
authentication backend and route guards) needs Starlette too.
"""

from __future__ import annotations

from issuer.verifier.errors import (
    BadSignature,
    ExpiredToken,
    InvalidClaims,
    KeysUnavailable,
    MalformedToken,
    NotYetValid,
    TokenError,
    UnknownKey,
    UnsupportedAlgorithm,
    VerificationError,
    WrongAudience,
    WrongIssuer,
    WrongType,
)
from issuer.verifier.jwks import JWKSCache, JWKSStats
from issuer.verifier.verifier import AccessToken, AccessTokenVerifier
from issuer.verifier.verify import verify_access_token

__all__ = [
    "AccessToken",
    "AccessTokenVerifier",
    "BadSignature",
    "ExpiredToken",
    "InvalidClaims",
    "JWKSCache",
    "JWKSStats",
    "KeysUnavailable",
    "MalformedToken",
    "NotYetValid",
    "TokenError",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "VerificationError",
    "WrongAudience",
    "WrongIssuer",
    "WrongType",
    "verify_access_token",
]
