"""The error tree and the one handler that renders it.

::

    IssuerError                      (500 server_error; never raised for client mistakes)
     +-- InvalidRequest              400 invalid_request
     |    +-- BodyTooLarge           413 invalid_request
     +-- EmailTaken                  409 email_taken
     +-- InvalidCredentials          401 invalid_credentials
     |    +-- WrongPassword          403 invalid_credentials   (re-authentication of a signed-in user)
     +-- InvalidGrant                401 invalid_grant
     |    +-- RefreshTokenReused     401 invalid_grant          (theft: the family was revoked)
     |    +-- SuspiciousRefresh      401 invalid_grant          (REFRESH_BINDING=reject: the session was revoked)
     +-- Unauthenticated             401, bare ``WWW-Authenticate: Bearer``
     +-- InvalidToken                401 invalid_token, with the RFC 6750 challenge
     +-- Forbidden                   403 forbidden
     +-- InvalidClient               401 invalid_client, ``WWW-Authenticate: Basic``
     +-- InsufficientScope           403 insufficient_scope
     +-- CursorExpired               400 cursor_expired         (the feed's window has moved past it)
     +-- UnsupportedTokenType        400 unsupported_token_type (RFC 7009)
     +-- NotFound                    404 not_found
     +-- TooManyRequests             429 too_many_requests, ``Retry-After``
     +-- ServiceUnavailable          503 temporarily_unavailable, ``Retry-After``

Domain code raises these; only :func:`render_error` turns them into responses.
"""

from __future__ import annotations

from typing import ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class IssuerError(Exception):
    error: ClassVar[str] = "server_error"
    description: ClassVar[str] = "The server could not complete the request."
    status_code: ClassVar[int] = 500

    def __init__(self, description: str | None = None) -> None:
        self.detail = description or self.description
        super().__init__(self.detail)

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(IssuerError):
    error = "invalid_request"
    description = "The request is malformed."
    status_code = 400


class BodyTooLarge(InvalidRequest):
    description = "The request body is too large."
    status_code = 413


class EmailTaken(IssuerError):
    error = "email_taken"
    description = "An account with this email already exists."
    status_code = 409


class InvalidCredentials(IssuerError):
    error = "invalid_credentials"
    description = "The email or password is wrong."
    status_code = 401


class WrongPassword(InvalidCredentials):
    description = "The password is wrong."
    status_code = 403


class InvalidGrant(IssuerError):
    error = "invalid_grant"
    description = "The refresh token is missing, unknown, expired or revoked."
    status_code = 401


class RefreshTokenReused(InvalidGrant):
    """Same response as any invalid grant; a separate class so metrics and the audit log can tell."""

    description = "The refresh token was already used; the session has been revoked."

    def __init__(self, description: str | None = None, *, family_revoked: bool = False) -> None:
        super().__init__(description)
        # True for the one request that revoked the family: N racing thieves are one detection, not N.
        self.family_revoked = family_revoked


class SuspiciousRefresh(InvalidGrant):
    """REFRESH_BINDING=reject refused a refresh from another network and another user agent than the session's
    recent ones, and revoked the session."""

    description = (
        "This session was used from another network and another browser, so it has been ended for safety; "
        "sign in again."
    )

    def __init__(self, *, user_id: str, session_id: str) -> None:
        super().__init__()
        # For the audit line: whose session the binding check ended.
        self.user_id = user_id
        self.session_id = session_id


class Unauthenticated(IssuerError):
    """No credentials at all: RFC 6750 section 3.1 says the challenge carries no error code."""

    error = "invalid_token"
    description = "This endpoint needs a Bearer access token."
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class InvalidToken(IssuerError):
    error = "invalid_token"
    description = "The access token is invalid."
    status_code = 401

    def headers(self) -> dict[str, str]:
        # The description is ours (never token text), but keep the quoted-string well-formed anyway.
        safe = self.detail.replace("\\", "").replace('"', "'")
        return {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{safe}"'}


class Forbidden(IssuerError):
    error = "forbidden"
    description = "This request is not allowed."
    status_code = 403


class InvalidClient(IssuerError):
    """RFC 6749 section 5.2: client authentication failed (no, unknown or wrong credentials)."""

    error = "invalid_client"
    description = "Client authentication failed."
    status_code = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Basic realm="issuer", charset="UTF-8"'}


class InsufficientScope(IssuerError):
    error = "insufficient_scope"
    description = "The client is not allowed to use this endpoint."
    status_code = 403


class CursorExpired(IssuerError):
    error = "cursor_expired"
    description = "The cursor is older than the events kept; start again without a cursor."
    status_code = 400


class UnsupportedTokenType(IssuerError):
    error = "unsupported_token_type"
    description = "This token type cannot be revoked."
    status_code = 400


class NotFound(IssuerError):
    error = "not_found"
    description = "No such resource."
    status_code = 404


class MethodNotAllowed(IssuerError):
    error = "method_not_allowed"
    description = "This method is not allowed here."
    status_code = 405


class TooManyRequests(IssuerError):
    error = "too_many_requests"
    description = "Too many requests; try again later."
    status_code = 429

    def __init__(self, retry_after: int, description: str | None = None) -> None:
        super().__init__(description)
        self.retry_after = max(1, int(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(IssuerError):
    error = "temporarily_unavailable"
    description = "The service is temporarily unavailable; retry shortly."
    status_code = 503

    def __init__(self, description: str | None = None, retry_after: int = 2) -> None:
        super().__init__(description)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def error_response(exc: IssuerError, extra_headers: dict[str, str] | None = None) -> Response:
    headers = {"Cache-Control": "no-store", **(extra_headers or {}), **exc.headers()}
    body = {"error": exc.error, "error_description": exc.detail}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def render_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for :class:`IssuerError`."""
    assert isinstance(exc, IssuerError)
    return error_response(exc)
