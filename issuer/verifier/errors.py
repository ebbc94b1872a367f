"""Why a token was refused. Each error has a stable ``reason`` for metrics and logs.

::

    TokenError
     +-- MalformedToken        reason "malformed"
     +-- UnsupportedAlgorithm  reason "unsupported_alg"   (checked before any key is used)
     +-- WrongType             reason "wrong_typ"
     +-- UnknownKey            reason "unknown_kid"
     +-- BadSignature          reason "bad_signature"
     +-- ExpiredToken          reason "expired"
     +-- NotYetValid           reason "not_yet_valid"
     +-- WrongIssuer           reason "wrong_issuer"
     +-- WrongAudience         reason "wrong_audience"
     +-- InvalidClaims         reason "invalid_claims"   (missing or mistyped claim)
"""

from __future__ import annotations

from typing import ClassVar


class TokenError(Exception):
    reason: ClassVar[str] = "invalid"
    message: ClassVar[str] = "The access token is invalid."

    def __init__(self, message: str | None = None) -> None:
        self.detail = message or self.message
        super().__init__(self.detail)


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
