"""Verify the issuer's access tokens in a resource service. Imports nothing from the server side."""

from __future__ import annotations

from issuer.verifier.errors import (
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
)
from issuer.verifier.verify import verify_access_token

__all__ = [
    "BadSignature",
    "ExpiredToken",
    "InvalidClaims",
    "MalformedToken",
    "NotYetValid",
    "TokenError",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "WrongAudience",
    "WrongIssuer",
    "WrongType",
    "verify_access_token",
]
