"""Why a token was refused, or why it could not be checked. Each error has a stable ``reason`` for metrics and logs.

::

    VerificationError
     +-- TokenError                the token's fault: answer 401 invalid_token
     |    +-- MalformedToken        reason "malformed"
     |    +-- UnsupportedAlgorithm  reason "unsupported_alg"   (checked before any key is used)
     |    +-- WrongType             reason "wrong_typ"
     |    +-- UnknownKey            reason "unknown_kid"
     |    +-- BadSignature          reason "bad_signature"
     |    +-- ExpiredToken          reason "expired"
     |    +-- NotYetValid           reason "not_yet_valid"
     |    +-- WrongIssuer           reason "wrong_issuer"
     |    +-- WrongAudience         reason "wrong_audience"
     |    +-- InvalidClaims         reason "invalid_claims"   (missing or mistyped claim)
     |    +-- Revoked               reason "revoked"  (the revocation feed says so: session, logout-all, deletion)
     +-- VerifierUnavailable       not the token's fault: answer 503 with Retry-After
          +-- KeysUnavailable      reason "keys_unavailable": no usable JWKS (the issuer has been unreachable
          |                        for longer than the stale limit)
          +-- RevocationsUnavailable  reason "revocations_unavailable": the revocation feed is not synchronised,
                                   or has been unreachable for longer than its bound, and its policy is "reject"

Catch :class:`VerifierUnavailable` (not only :class:`KeysUnavailable`) to answer every 503 case.
"""

from __future__ import annotations

from typing import ClassVar


class VerificationError(Exception):
    reason: ClassVar[str] = "invalid"
    message: ClassVar[str] = "The access token could not be verified."

    def __init__(self, message: str | None = None) -> None:
        self.detail = message or self.message
        super().__init__(self.detail)


class TokenError(VerificationError):
    reason = "invalid"
    message = "The access token is invalid."


class MalformedToken(TokenError):
    reason = "malformed"
    message = "The access token is malformed."


class UnsupportedAlgorithm(TokenError):
    reason = "unsupported_alg"
    message = "The access token is not signed with RS256."


class WrongType(TokenError):
    reason = "wrong_typ"
    message = "The token is not an access token (typ at+jwt)."


class UnknownKey(TokenError):
    reason = "unknown_kid"
    message = "The access token is signed with an unknown key."


class BadSignature(TokenError):
    reason = "bad_signature"
    message = "The access token signature is invalid."


class ExpiredToken(TokenError):
    reason = "expired"
    message = "The access token has expired."


class NotYetValid(TokenError):
    reason = "not_yet_valid"
    message = "The access token is not valid yet."


class WrongIssuer(TokenError):
    reason = "wrong_issuer"
    message = "The access token was issued by another issuer."


class WrongAudience(TokenError):
    reason = "wrong_audience"
    message = "The access token is meant for another audience."


class InvalidClaims(TokenError):
    reason = "invalid_claims"
    message = "The access token is missing a required claim or has a malformed one."


class Revoked(TokenError):
    """The token is well formed and signed, but the issuer's revocation feed revoked it (or its session or user)."""

    reason = "revoked"
    message = "The access token has been revoked."


class VerifierUnavailable(VerificationError):
    """The token may well be valid, but this verifier cannot vouch for it right now: answer 503, not 401."""

    reason = "unavailable"
    message = "The token cannot be verified right now; retry shortly."

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        # Seconds until the verifier will try the issuer again; a hint for Retry-After.
        self.retry_after = max(1, int(retry_after + 0.999))


class KeysUnavailable(VerifierUnavailable):
    """The issuer's keys cannot be had: never fetched, or cached for longer than the stale limit allows."""

    reason = "keys_unavailable"
    message = "The issuer's signing keys are unavailable; retry shortly."


class RevocationsUnavailable(VerifierUnavailable):
    """The revocation feed is not synchronised (never, or not for longer than its bound) and the policy says reject."""

    reason = "revocations_unavailable"
    message = "The issuer's revocation feed is unavailable; retry shortly."
