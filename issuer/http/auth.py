"""The /auth endpoints. Handlers parse, call a service, and shape the response; errors are raised."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from issuer.access.tokens import mint_access_token
from issuer.accounts.service import check_password_shape, lookup_email, normalize_email
from issuer.audit import audit
from issuer.errors import (
    InvalidCredentials,
    InvalidGrant,
    InvalidRequest,
    RefreshTokenReused,
    ServiceUnavailable,
    SuspiciousRefresh,
    TooManyRequests,
)
from issuer.http.requests import check_origin, client_ip, read_json_object, user_agent
from issuer.keys.ring import LoadedKey
from issuer.services import Services
from issuer.sessions.families import IssuedRefresh
from issuer.storage.users import User

COOKIE_NAME = "refresh_token"
COOKIE_PATH = "/auth"
TRANSPORTS = ("cookie", "body")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def services(request: Request) -> Services:
    """The process's services, which the app's lifespan hands to every request."""
    svc: Services = request.state.services
    return svc


def user_json(user: User) -> dict[str, str]:
    return {"id": user.id, "email": user.email, "role": user.role}


def _string_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if value is None:
        raise InvalidRequest(f"'{name}' is required.")
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string.")
    return value


async def throttle_ip(svc: Services, request: Request, route: str) -> str | None:
    """The client address, after taking a token from its bucket (429 when empty).

    Login, register and account deletion share a bucket kept in the database (the limit protects accounts,
    so it must hold across replicas); refresh uses this process's memory (it protects this process's CPU).
    """
    ip = client_ip(request, svc.settings)
    if route == "refresh":
        wait = svc.ip_limiter.acquire(ip)
    else:
        wait = await svc.account_ip_limiter.acquire(ip, svc.clock())
    if wait:
        svc.metrics.throttled.labels(route, "ip").inc()
        audit("rate_limited", "failure", ip=ip, user_agent=user_agent(request), route=route)
        raise TooManyRequests(int(wait), "Too many requests from this address; try again later.")
    return ip


async def register(request: Request) -> Response:
    svc = services(request)
    ip = await throttle_ip(svc, request, "register")
    data = await read_json_object(request)
    email = normalize_email(data["email"]) if "email" in data else _missing("email")
    password = check_password_shape(data["password"], new=True) if "password" in data else _missing("password")
    user = await svc.accounts.register(email, password, now=svc.clock())
    audit("register", "success", user_id=user.id, ip=ip, user_agent=user_agent(request))
    return JSONResponse({"user": user_json(user)}, status_code=201, headers=NO_STORE)


def _missing(name: str) -> str:
    raise InvalidRequest(f"'{name}' is required.")


async def login(request: Request) -> Response:
    svc = services(request)
    ip = await throttle_ip(svc, request, "login")
    data = await read_json_object(request)
    transport = data.get("token_transport", "cookie")
    if transport not in TRANSPORTS:
        raise InvalidRequest("'token_transport' must be 'cookie' or 'body'.")
    if transport == "cookie":
        # A foreign page must not plant its own session's cookie in the browser (login CSRF): the login
        # that sets the cookie gets the same Origin check as the endpoints that use it.
        check_origin(request, svc.settings)
    email = lookup_email(data["email"]) if "email" in data else _missing("email")
    password = check_password_shape(data["password"], new=False) if "password" in data else _missing("password")
    agent = user_agent(request)
    key = _require_signing_key(svc)
    try:
        # Locked emails are refused before the password is even checked, known account or not. The attempt
        # is counted (as a failure until it succeeds) atomically with that check: parallel guesses cannot
        # all slip past it.
        done = await svc.login(email, password, user_agent=agent, ip=ip)
    except TooManyRequests:
        svc.metrics.logins.labels("locked").inc()
        svc.metrics.throttled.labels("login", "account").inc()
        audit("login_locked", "failure", ip=ip, user_agent=agent)
        raise
    except InvalidCredentials:
        svc.metrics.logins.labels("invalid_credentials").inc()
        audit("login", "failure", "login failed", ip=ip, user_agent=agent, reason="invalid credentials")
        raise
    svc.metrics.logins.labels("success").inc()
    audit("login", "success", user_id=done.user.id, ip=ip, user_agent=agent, session_id=done.refresh.family_id)
    return token_response(svc, key, done.user, done.refresh, done.issued_at, transport)


async def refresh(request: Request) -> Response:
    svc = services(request)
    ip = await throttle_ip(svc, request, "refresh")
    data = await read_json_object(request, allow_empty=True)
    if "refresh_token" in data:
        presented, transport = _string_field(data, "refresh_token"), "body"
    else:
        check_origin(request, svc.settings)
        presented, transport = request.cookies.get(COOKIE_NAME, ""), "cookie"
    agent = user_agent(request)
    if not presented:
        svc.metrics.refreshes.labels("missing").inc()
        audit("refresh", "failure", ip=ip, user_agent=agent, reason="no refresh token")
        raise InvalidGrant("No refresh token was presented.")
    key = _require_signing_key(svc)
    now = svc.clock()
    try:
        rotation = await svc.families.rotate(presented, now=now, ip=ip, user_agent=agent)
    except SuspiciousRefresh as exc:
        svc.metrics.refreshes.labels("invalid_grant").inc()
        svc.metrics.suspicious_refreshes.labels("rejected").inc()
        # A refresh line like every refused refresh (so counting them counts requests), and the detection.
        audit(
            "refresh",
            "failure",
            user_id=exc.user_id,
            ip=ip,
            user_agent=agent,
            session_id=exc.session_id,
            reason=exc.detail,
        )
        audit(
            "refresh_suspicious",
            "failure",
            user_id=exc.user_id,
            ip=ip,
            user_agent=agent,
            session_id=exc.session_id,
            reason="another network and another user agent than the session's",
        )
        raise
    except RefreshTokenReused as exc:
        svc.metrics.refreshes.labels("reuse").inc()
        if exc.family_revoked:
            svc.metrics.reuse_detections.inc()
        audit("refresh", "failure", ip=ip, user_agent=agent, reason=exc.detail)
        raise
    except InvalidGrant as exc:
        svc.metrics.refreshes.labels("invalid_grant").inc()
        audit("refresh", "failure", ip=ip, user_agent=agent, reason=exc.detail)
        raise
    svc.metrics.refreshes.labels("replayed" if rotation.replayed else "success").inc()
    if rotation.suspicious:
        svc.metrics.suspicious_refreshes.labels("audited").inc()
        audit(
            "refresh_suspicious",
            "success",
            user_id=rotation.user.id,
            ip=ip,
            user_agent=agent,
            session_id=rotation.refresh.family_id,
            reason="another network and another user agent than the session's recent uses",
        )
    # Every refresh is audited (a failed one above), cheaply enough to stay on (docs/performance.md).
    audit(
        "refresh",
        "success",
        user_id=rotation.user.id,
        ip=ip,
        user_agent=agent,
        session_id=rotation.refresh.family_id,
        replayed=rotation.replayed,
    )
    return token_response(svc, key, rotation.user, rotation.refresh, now, transport)


async def logout(request: Request) -> Response:
    svc = services(request)
    data = await read_json_object(request, allow_empty=True)
    if "refresh_token" in data:
        presented = _string_field(data, "refresh_token")
    else:
        check_origin(request, svc.settings)
        presented = request.cookies.get(COOKIE_NAME, "")
    if presented:
        family_id = await svc.families.revoke_by_token(presented, now=svc.clock())
        if family_id is not None:
            audit("logout", "success", ip=client_ip(request, svc.settings), session_id=family_id)
    response = Response(status_code=204, headers=NO_STORE)
    _clear_cookie(response, svc)
    return response


async def logout_all(request: Request) -> Response:
    svc = services(request)
    caller = await svc.bearer.authenticate(request)
    await svc.accounts.logout_all(caller.user.id, now=svc.clock())
    audit("logout_all", "success", user_id=caller.user.id, ip=client_ip(request, svc.settings))
    response = Response(status_code=204, headers=NO_STORE)
    _clear_cookie(response, svc)
    return response


class UserInfo:
    """``GET /auth/me`` as a plain ASGI endpoint: the caller's account, read after the Bearer check.

    Resource services may call this on every request of their own, so it is the issuer's hottest
    authenticated path. It writes its ASGI messages itself, with an encoder made once, instead of building
    a Request and a JSONResponse; the body is what JSONResponse would render. Errors are raised as in every
    handler, for the app's exception handlers to answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        svc: Services = scope["state"]["services"]
        caller = await svc.bearer.authenticate(HTTPConnection(scope))
        body = _JSON.encode({**user_json(caller.user), "tokenVersion": caller.user.token_version}).encode()
        headers = [(b"content-length", str(len(body)).encode()), *_JSON_NO_STORE]  # a new list: middleware adds
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


# JSONResponse's rendering (compact, UTF-8, no NaN), made once.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_NO_STORE_LINES = tuple((name.lower().encode(), value.encode()) for name, value in NO_STORE.items())
_JSON_NO_STORE = ((b"content-type", b"application/json"), *_NO_STORE_LINES)


async def list_sessions(request: Request) -> Response:
    svc = services(request)
    caller = await svc.bearer.authenticate(request)
    rows = await svc.families.active_sessions(caller.user.id, now=svc.clock())
    sessions = [
        {
            "id": f.id,
            "created_at": _iso(f.created_at),
            "last_used_at": _iso(f.last_used_at),
            # Where the session started (its login) and where it was used last (its latest refresh).
            "user_agent": f.user_agent,
            "ip": f.ip,
            "last_user_agent": f.last_user_agent,
            "last_ip": f.last_ip,
            "current": f.id == caller.session_id,
        }
        for f in rows
    ]
    return JSONResponse({"sessions": sessions}, headers=NO_STORE)


async def revoke_session(request: Request) -> Response:
    svc = services(request)
    caller = await svc.bearer.authenticate(request)
    session_id = request.path_params["session_id"]
    await svc.families.revoke_session(caller.user.id, session_id, now=svc.clock())
    audit("session_revoked", "success", user_id=caller.user.id, session_id=session_id)
    return Response(status_code=204, headers=NO_STORE)


async def delete_account(request: Request) -> Response:
    """A password check like login's, so it gets login's guards: the shared per-IP bucket, and the account's
    lock-out (failures here and at login count together). Otherwise a stolen access token would buy
    unlimited guesses at the password, and any account holder unlimited argon2 hashes."""
    svc = services(request)
    caller = await svc.bearer.authenticate(request)
    ip = await throttle_ip(svc, request, "account")
    data = await read_json_object(request)
    password = check_password_shape(data["password"], new=False) if "password" in data else _missing("password")
    try:
        async with svc.lockout.guard(caller.user.email, svc.clock()):
            # A wrong password leaves the attempt counted.
            await svc.accounts.delete(caller.user, password, now=svc.clock())
    except TooManyRequests:
        svc.metrics.throttled.labels("account", "account").inc()
        audit("account_delete_locked", "failure", user_id=caller.user.id, ip=ip)
        raise
    except InvalidCredentials:
        audit("account_deleted", "failure", user_id=caller.user.id, ip=ip, reason="wrong password")
        raise
    audit("account_deleted", "success", user_id=caller.user.id, ip=ip)
    response = Response(status_code=204, headers=NO_STORE)
    _clear_cookie(response, svc)
    return response


def _require_signing_key(svc: Services) -> LoadedKey:
    """The key to sign with, chosen before anything is written: a session started or a token rotated with
    no way to sign the access token would cost the client its refresh token for nothing. The key stays
    published for the whole access-token lifetime, so using it a few milliseconds later is safe."""
    key = svc.keys.signing_key(svc.clock())
    if key is None:
        raise ServiceUnavailable("No signing key is active.")
    return key


def token_response(
    svc: Services, key: LoadedKey, user: User, refresh: IssuedRefresh, now: datetime, transport: str
) -> Response:
    settings = svc.settings
    access = mint_access_token(
        key,
        issuer=settings.issuer_url,
        audience=settings.audience,
        ttl=settings.access_token_ttl,
        now=now,
        user_id=user.id,
        email=user.email,
        role=user.role,
        token_version=user.token_version,
        session_id=refresh.family_id,
    )
    body: dict[str, Any] = {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": settings.access_token_ttl,
        "user": user_json(user),
    }
    if transport == "body":
        body["refresh_token"] = refresh.token
        return JSONResponse(body, headers=NO_STORE)
    response = JSONResponse(body, headers=NO_STORE)
    max_age = max(0, math.floor((refresh.expires_at - now).total_seconds()))
    response.set_cookie(
        COOKIE_NAME,
        refresh.token,
        max_age=max_age,
        path=COOKIE_PATH,
        secure=settings.cookie_secure,
        httponly=True,
        samesite="strict",
    )
    return response


def _clear_cookie(response: Response, svc: Services) -> None:
    response.set_cookie(
        COOKIE_NAME,
        "",
        max_age=0,
        path=COOKIE_PATH,
        secure=svc.settings.cookie_secure,
        httponly=True,
        samesite="strict",
    )


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


# Most requested first (the router tries them in order).
routes = [
    Route("/auth/me", UserInfo(), methods=["GET"]),
    Route("/auth/refresh", refresh, methods=["POST"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/auth/register", register, methods=["POST"]),
    Route("/auth/logout", logout, methods=["POST"]),
    Route("/auth/logout-all", logout_all, methods=["POST"]),
    Route("/auth/sessions", list_sessions, methods=["GET"]),
    Route("/auth/sessions/{session_id}", revoke_session, methods=["DELETE"]),
    Route("/auth/account", delete_account, methods=["DELETE"]),
]
