"""Verify the issuer's access tokens in a resource service or gateway. Imports nothing from the server side.

``issuer.verifier`` needs joserfc, cryptography and httpx only; ``issuer.verifier.starlette`` (the
authentication backend and route guards) needs Starlette too. ``RevocationFeed`` (``issuer.verifier.events``)
follows the issuer's revocation feed so that revoked tokens are refused within seconds.
"""

from __future__ import annotations

from issuer.verifier.errors import (
    BadSignature,
    ExpiredToken,
    InvalidClaims,
    KeysUnavailable,
    MalformedToken,
    NotYetValid,
    RevocationsUnavailable,
    Revoked,
    TokenError,
    UnknownKey,
    UnsupportedAlgorithm,
    VerificationError,
    VerifierUnavailable,
    WrongAudience,
    WrongIssuer,
    WrongType,
)
from issuer.verifier.events import FeedStats, RevocationFeed
from issuer.verifier.jwks import JWKSCache, JWKSStats
from issuer.verifier.verifier import AccessToken, AccessTokenVerifier
from issuer.verifier.verify import verify_access_token

__all__ = [
    "AccessToken",
    "AccessTokenVerifier",
    "BadSignature",
    "ExpiredToken",
    "FeedStats",
    "InvalidClaims",
    "JWKSCache",
    "JWKSStats",
    "KeysUnavailable",
    "MalformedToken",
    "NotYetValid",
    "RevocationFeed",
    "RevocationsUnavailable",
    "Revoked",
    "TokenError",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "VerificationError",
    "VerifierUnavailable",
    "WrongAudience",
    "WrongIssuer",
    "WrongType",
    "verify_access_token",
]
