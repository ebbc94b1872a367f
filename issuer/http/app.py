"""``create_app(settings) -> Starlette``: routes, middleware, error handlers and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any, TypedDict

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from issuer.clock import Clock, system_clock
from issuer.errors import (
    Forbidden,
    IssuerError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    error_response,
    render_error,
)
from issuer.events.feed import event_retention
from issuer.http import auth, health, oauth, openapi, sdk, wellknown
from issuer.services import Services
from issuer.settings import Settings
from issuer.storage.cleanup import cleanup
from issuer.storage.database import ConstraintViolation, DatabaseUnavailable, describe
from issuer.tasks import cancelled

log = logging.getLogger("issuer")


# How long start-up waits to read the kept revocation events before serving anyway (they keep coming).
STARTUP_SYNC_SECONDS = 5.0


class AppState(TypedDict):
    """What the lifespan hands to every request (``request.state``; ``scope["state"]`` for ASGI endpoints)."""

    services: Services
    # The server metadata document, rendered once.
    metadata: bytes


# On every response: added by ResponseHeaders, and by the 500 handler (which runs outside all middleware).
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock = system_clock,
    monotonic: Callable[[], float] = time.monotonic,
    freeze_startup_heap: bool = False,
) -> Starlette:
    """The issuer as one Starlette app. Nothing is connected or loaded here: the lifespan builds the services
    (pool, keys, hashing threads) and hands them to every request as ``request.state.services``."""
    settings = settings or Settings.from_environ()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[AppState]:
        if settings.kek_is_dev:
            log.warning(
                "USING THE GENERATED DEVELOPMENT KEY-ENCRYPTION KEY (keys/dev-kek); "
                "set ISSUER_KEK or ISSUER_KEK_FILE for anything but a laptop"
            )
        services = Services.build(settings, clock, monotonic)
        cleaner: asyncio.Task[None] | None = None
        try:
            await services.keys.ensure_signing_key()
            services.keys.start_background()
            services.listener.start()
            try:
                async with asyncio.timeout(STARTUP_SYNC_SECONDS):
                    await services.revoked_sessions.sync()
            except (DatabaseUnavailable, TimeoutError):
                log.warning("could not read revocation events at start-up; will retry in the background")
            services.revoked_sessions.start()
            services.metrics.signing_key_age.set_function(lambda: _signing_key_age(services))
            if settings.cleanup_interval > 0:
                cleaner = asyncio.create_task(_clean_periodically(services), name="issuer-cleanup")
            if freeze_startup_heap:
                _freeze_startup_heap()
            yield {"services": services, "metadata": wellknown.metadata_document(settings)}
        finally:
            await cancelled(cleaner)
            await services.close()

    middleware = [Middleware(ResponseHeaders)]
    if settings.allowed_origins:
        # Browsers on these origins may call the cookie endpoints with credentials; others get no CORS
        # headers, and their cookie requests are refused by the Origin check in the routes.
        middleware.append(
            Middleware(
                JsonCORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_credentials=True,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["authorization", "content-type"],
                # Without these a cross-origin page cannot read a 429's back-off or a 401's error code.
                expose_headers=["Retry-After", "WWW-Authenticate"],
                max_age=600,
            )
        )
    app = Starlette(
        # Starlette tries routes in order, so the most requested come first: the documents every gateway
        # fetches, then /auth/me and refresh (``auth.routes`` is ordered the same way).
        routes=[*wellknown.routes, *auth.routes, *health.routes, *oauth.routes, *openapi.routes, *sdk.routes],
        middleware=middleware,
        exception_handlers={
            IssuerError: render_error,
            HTTPException: _http_exception,
            DatabaseUnavailable: _database_down,
            # A violation no storage module expected (each turns the ones it expects into domain errors):
            # nothing was written, and the client may retry, as after any database fault.
            ConstraintViolation: _database_down,
            500: _server_error,
        },
        lifespan=lifespan,
    )
    # No trailing-slash redirects: behind a TLS proxy they would point at http:// and at whatever Host the
    # client sent, and a client that follows a 307 would resend the password there.
    app.router.redirect_slashes = False
    return app


def create_served_app() -> Starlette:
    """The app as ``issuer serve`` runs it (uvicorn's factory, in each worker)."""
    return create_app(freeze_startup_heap=True)


def _freeze_startup_heap() -> None:
    """Keep what start-up built (modules, tables, keys) out of every later collection.

    Under load, request objects with reference cycles (uvicorn's, asyncio's) keep the collector busy, and
    each full collection walked that whole heap with the event loop stopped, which set the p99 of /auth/me
    (docs/performance.md). The frozen objects live as long as the process anyway. Not done for apps built
    by tests, which would keep every earlier app's garbage for the rest of the session.
    """
    gc.collect()
    gc.freeze()


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with refused preflights in the contract's error shape, not plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode("ascii", "replace")  # e.g. "Disallowed CORS origin, headers"
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        return error_response(Forbidden(f"CORS preflight refused: {reason.removeprefix('Disallowed CORS ')}."), headers)


def _signing_key_age(services: Services) -> float:
    now = services.clock()
    key = services.keys.signing_key(now)
    return 0.0 if key is None else (now - key.record.activate_at).total_seconds()


async def _clean_periodically(services: Services) -> None:
    settings = services.settings
    while True:
        await asyncio.sleep(settings.cleanup_interval)
        try:
            report = await cleanup(
                services.db,
                now=services.clock(),
                retention=timedelta(seconds=settings.cleanup_retention),
                failure_window=services.lockout.policy.window,
                event_retention=event_retention(settings),
            )
        except Exception:
            log.exception("periodic cleanup failed; will retry at the next interval")
            continue
        for kind in ("tokens", "families", "login_failures", "events"):
            services.metrics.cleanup_deleted.labels(kind).inc(getattr(report, kind))


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # RFC 9110 section 15.5.6: a 405 lists the allowed methods; Starlette put them in exc.headers.
        return error_response(MethodNotAllowed(), dict(exc.headers or {}))
    if exc.status_code == 404:
        return error_response(NotFound())
    return error_response(_GenericHTTPError(exc.status_code, exc.detail))


class _GenericHTTPError(IssuerError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        # One class for whatever status Starlette raised: the class-level defaults are overridden per instance.
        self.status_code = status  # type: ignore[misc]  # a ClassVar in IssuerError, per instance here
        self.error = "invalid_request" if status < 500 else "server_error"  # type: ignore[misc]  # likewise


async def _database_down(request: Request, exc: Exception) -> Response:
    services: Services = request.state.services
    services.metrics.db_errors.inc()
    # The driver's error class and message (DatabaseUnavailable carries them; never the URL or a password).
    cause = str(exc) if isinstance(exc, DatabaseUnavailable) and str(exc) else describe(exc)
    log.error("database error on %s %s: %s", request.method, request.url.path, cause)
    return error_response(ServiceUnavailable("The database is unavailable; retry shortly."))


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette calls this from ServerErrorMiddleware, outside every user middleware: add the headers here.
    response = error_response(IssuerError())
    for name, value in SECURITY_HEADERS:
        response.headers[name.decode()] = value.decode()
    return response


class ResponseHeaders:
    """Security headers on every response, and per-route latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # One histogram child per (route, method), looked up in a dict rather than through labels().
        self._latency: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # Mounted in another app, the scope arrives with the parent's route (its Mount) already in it.
        outer_route = scope.get("route")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(SECURITY_HEADERS)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            # The router records the matched route in the scope: no second matching pass per request.
            matched = scope.get("route")
            route = "unmatched" if matched is None or matched is outer_route else getattr(matched, "path", "unmatched")
            key = (route, scope["method"])
            child = self._latency.get(key)
            if child is None:
                services: Services = scope["state"]["services"]
                child = self._latency[key] = services.metrics.latency.labels(*key)
            child.observe(time.perf_counter() - started)
