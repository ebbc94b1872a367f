"""The client-authenticated endpoints: RFC 7662 introspection, RFC 7009 revocation, and the RFC 8936
security-event feed. Clients authenticate with HTTP Basic (``client_secret_basic``)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from issuer.audit import audit
from issuer.errors import InvalidClient, InvalidRequest, TooManyRequests
from issuer.events.feed import DEFAULT_MAX_EVENTS, MAX_EVENTS
from issuer.http.auth import NO_STORE, services
from issuer.http.requests import client_ip, read_form, read_json_object
from issuer.services import Services
from issuer.storage.clients import Client

INTROSPECTION_PATH = "/oauth2/introspect"
REVOCATION_PATH = "/oauth2/revoke"
POLL_PATH = "/events/poll"
# token_type_hint is not needed (issuer.oauth.introspection) and, like any unknown parameter, ignored.
TOKEN_FIELDS = ("token",)


async def authenticate_client(svc: Services, request: Request, scope: str) -> Client:
    """The calling client, with ``scope``. Failures take from a per-address budget (RATE_LIMIT_PER_IP a
    minute): once it is spent, failures get 429 instead of 401. The credentials are
    checked first (one hash and one indexed read), so a stranger's bad guesses from a shared address (a NAT,
    a /64, a proxy not in TRUSTED_PROXIES) never lock a valid gateway out of the feed; against 256-bit
    secrets the budget is about the log and the CPU, not about guessing."""
    try:
        return await svc.clients.authenticate(request.headers.get("authorization"), scope)
    except InvalidClient:
        ip = client_ip(request, svc.settings)
        audit("client_auth", "failure", ip=ip, reason="bad or missing client credentials")
        wait = svc.client_failures.acquire(ip)
        if wait:
            svc.metrics.throttled.labels("client", "ip").inc()
            raise TooManyRequests(int(wait), "Too many failed client authentications from this address.") from None
        raise


def _token(form: dict[str, str]) -> str:
    token = form.get("token")
    if not token:
        raise InvalidRequest("'token' is required.")
    return token


async def introspect(request: Request) -> Response:
    svc = services(request)
    await authenticate_client(svc, request, "introspect")
    form = await read_form(request, TOKEN_FIELDS)
    answer = await svc.introspection.introspect(_token(form), now=svc.clock())
    return JSONResponse(answer, headers=NO_STORE)


async def revoke(request: Request) -> Response:
    svc = services(request)
    client = await authenticate_client(svc, request, "revoke")
    form = await read_form(request, TOKEN_FIELDS)
    await svc.introspection.revoke(_token(form), now=svc.clock())
    audit("token_revoked", "success", client_id=client.client_id)
    return Response(status_code=200, headers=NO_STORE)


async def poll(request: Request) -> Response:
    svc = services(request)
    client = await authenticate_client(svc, request, "events")
    data = await read_json_object(request, allow_empty=True)
    max_events = _integer(data, "maxEvents", DEFAULT_MAX_EVENTS, 0, MAX_EVENTS)
    return_immediately = _boolean(data, "returnImmediately", default=False)
    cursor = data.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise InvalidRequest("'cursor' must be a string.")
    delivery = await svc.feed.poll(
        client.client_id, cursor=cursor, max_events=max_events, return_immediately=return_immediately
    )
    body = {"sets": delivery.sets, "moreAvailable": delivery.more_available, "cursor": delivery.cursor}
    return JSONResponse(body, headers=NO_STORE)


def _integer(data: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = data.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}.")
    return value


def _boolean(data: dict[str, Any], name: str, *, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false.")
    return value


routes = [
    Route(INTROSPECTION_PATH, introspect, methods=["POST"]),
    Route(REVOCATION_PATH, revoke, methods=["POST"]),
    Route(POLL_PATH, poll, methods=["POST"]),
]
