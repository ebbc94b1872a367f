"""Starlette integration: an ``AuthenticationBackend`` for Bearer access tokens, and RFC 6750 route guards.

::

    app = Starlette(routes=..., middleware=[bearer_middleware(verifier)], lifespan=verifier.lifespan)

    @requires_token            # anonymous -> 401 with a bare ``WWW-Authenticate: Bearer``
    async def me(request): ... # request.user is a TokenUser, request.user.token the AccessToken

    @requires_role("admin")    # another role -> 403 insufficient_scope
    async def admin(request): ...

How failures are answered:

- no ``Authorization`` header, or another scheme (``Basic ...``): anonymous (RFC 6750 section 3.1: no
  credentials for this scheme); guarded routes answer 401 with ``WWW-Authenticate: Bearer``, open routes run.
- a Bearer token that fails verification: 401 ``invalid_token`` with the reason in ``error_description``,
  on every route, guarded or not: a client that sent a bad token must learn it.
- a token the revocation feed revoked (``Revoked``): 401 ``invalid_token``, "The access token has been revoked."
- the JWKS cannot be had (issuer unreachable past the stale limit), or the revocation feed is stale and its
  policy is ``reject`` (:class:`VerifierUnavailable`): 503 ``temporarily_unavailable`` with ``Retry-After``.
  Fail closed, but honestly: a 401 would send every client to refresh its token at an issuer that is down,
  and would not be true (the token may well be valid).

``readiness(verifier)`` is an endpoint for a readiness probe: 200 once the keys are usable and the feed has
synchronised, 503 before (with ``verifier.status()`` as the body either way).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from issuer.verifier.errors import MalformedToken, VerificationError, VerifierUnavailable
from issuer.verifier.verifier import AccessToken, AccessTokenVerifier

_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])
# RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E, so no quote, no backslash.
_NOT_IN_QUOTED_STRING = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
WS_POLICY_VIOLATION = 1008


class TokenUser(BaseUser):
    """``request.user`` for a verified token: identity is ``sub``, display name the email."""

    def __init__(self, token: AccessToken) -> None:
        self.token = token

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.token.email or self.token.sub

    @property
    def identity(self) -> str:
        return self.token.sub

    @property
    def role(self) -> str | None:
        return self.token.role


class BearerAuthError(AuthenticationError):
    """A Bearer token was presented and could not be accepted; ``error`` says why."""

    def __init__(self, error: VerificationError) -> None:
        super().__init__(error.detail)
        self.error = error


class BearerAuthBackend(AuthenticationBackend):
    """Scopes granted: ``authenticated``, ``role:<role>``, and ``scope:<s>`` for each OAuth scope."""

    def __init__(self, verifier: AccessTokenVerifier) -> None:
        self.verifier = verifier

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        if not token:
            raise BearerAuthError(MalformedToken("The Authorization header must be 'Bearer <access token>'."))
        try:
            access = await self.verifier.verify(token)
        except VerificationError as exc:
            raise BearerAuthError(exc) from None
        scopes = ["authenticated"]
        if access.role:
            scopes.append(f"role:{access.role}")
        scopes.extend(f"scope:{scope}" for scope in access.scopes)
        return AuthCredentials(scopes), TokenUser(access)


def on_auth_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    """``on_error`` for :class:`AuthenticationMiddleware`: 401 ``invalid_token``, or 503 when the verifier cannot
    vouch for any token right now (keys unavailable, or a stale revocation feed under ``on_stale="reject"``)."""
    error = exc.error if isinstance(exc, BearerAuthError) else None
    if isinstance(error, VerifierUnavailable):
        return _error(503, "temporarily_unavailable", error.detail, {"Retry-After": str(error.retry_after)})
    # Any other AuthenticationError is not ours to describe: answer the generic sentence, never its text.
    description = error.detail if error is not None else "The access token is invalid."
    challenge = f'Bearer error="invalid_token", error_description="{quoted_string_safe(description)}"'
    return _error(401, "invalid_token", description, {"WWW-Authenticate": challenge})


def bearer_middleware(verifier: AccessTokenVerifier) -> Middleware:
    """The one line a Starlette app needs: ``Starlette(middleware=[bearer_middleware(verifier)])``."""
    return Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(verifier), on_error=on_auth_error)


def readiness(verifier: AccessTokenVerifier) -> Callable[[Request], Awaitable[Response]]:
    """A readiness endpoint: ``Route("/readyz", readiness(verifier))``. 200 when ``verifier.ready``, else 503."""

    async def endpoint(request: Request) -> Response:
        ready = verifier.ready
        return JSONResponse(verifier.status(), status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})

    return endpoint


def requires_token(endpoint: _Endpoint) -> _Endpoint:
    """Guard an endpoint: anonymous callers get 401 with a bare ``WWW-Authenticate: Bearer``."""
    return _guard(endpoint, roles=None)


def requires_role(*roles: str) -> Callable[[_Endpoint], _Endpoint]:
    """Guard an endpoint: a token with one of ``roles`` passes; another role gets 403 ``insufficient_scope``."""
    if not roles:
        raise ValueError("requires_role needs at least one role")

    def decorate(endpoint: _Endpoint) -> _Endpoint:
        return _guard(endpoint, roles=frozenset(roles))

    return decorate


def quoted_string_safe(text: str) -> str:
    """``text`` reduced to the characters RFC 6750 allows inside ``error_description="..."``."""
    return _NOT_IN_QUOTED_STRING.sub("?", text.replace('"', "'"))


def _refusal(conn: HTTPConnection, roles: frozenset[str] | None) -> Response | None:
    """None when ``conn`` may proceed; otherwise the response that refuses it."""
    if "authenticated" not in conn.auth.scopes:
        return _error(
            401, "invalid_token", "This endpoint needs a Bearer access token.", {"WWW-Authenticate": "Bearer"}
        )
    if roles is None or not roles.isdisjoint(_roles(conn.auth.scopes)):
        return None
    wanted = " or ".join(f"'{role}'" for role in sorted(roles))
    description = f"This endpoint needs the role {wanted}."
    challenge = f'Bearer error="insufficient_scope", error_description="{quoted_string_safe(description)}"'
    return _error(403, "insufficient_scope", description, {"WWW-Authenticate": challenge})


def _roles(scopes: list[str]) -> set[str]:
    return {scope.removeprefix("role:") for scope in scopes if scope.startswith("role:")}


def _guard(endpoint: _Endpoint, roles: frozenset[str] | None) -> _Endpoint:
    """Starlette's ``requires`` pattern: find the ``request``/``websocket`` parameter, check before the call."""
    names = list(inspect.signature(endpoint).parameters)
    kind = next((name for name in names if name in ("request", "websocket")), None)
    if kind is None:
        raise TypeError(f"{endpoint!r} has no 'request' or 'websocket' parameter")
    index = names.index(kind)

    def connection(args: tuple[Any, ...], kwargs: dict[str, Any]) -> HTTPConnection:
        conn = kwargs[kind] if kind in kwargs else args[index]
        assert isinstance(conn, HTTPConnection)
        return conn

    if kind == "websocket":

        @functools.wraps(endpoint)
        async def websocket_wrapper(*args: Any, **kwargs: Any) -> None:
            conn = connection(args, kwargs)
            assert isinstance(conn, WebSocket)
            if _refusal(conn, roles) is not None:
                await conn.close(code=WS_POLICY_VIOLATION)
                return
            await endpoint(*args, **kwargs)

        return websocket_wrapper  # type: ignore[return-value]  # keeps the endpoint's signature, as Starlette's requires

    if inspect.iscoroutinefunction(inspect.unwrap(endpoint)):

        @functools.wraps(endpoint)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            refusal = _refusal(connection(args, kwargs), roles)
            return refusal if refusal is not None else await endpoint(*args, **kwargs)

        return async_wrapper  # type: ignore[return-value]  # keeps the endpoint's signature, as Starlette's requires

    @functools.wraps(endpoint)
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        refusal = _refusal(connection(args, kwargs), roles)
        return refusal if refusal is not None else endpoint(*args, **kwargs)

    return sync_wrapper  # type: ignore[return-value]  # keeps the endpoint's signature, as Starlette's requires


def _error(status: int, error: str, description: str, headers: dict[str, str]) -> JSONResponse:
    body = {"error": error, "error_description": description}
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store", **headers})
