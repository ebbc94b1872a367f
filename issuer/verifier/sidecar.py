"""A forward-auth sidecar: gateways that cannot verify RS256 tokens themselves ask it, once per request.

nginx ``auth_request``, Caddy ``forward_auth``, Traefik ``forwardAuth`` and the like send the client's headers
to an authorization service and let the request through only on a 2xx, copying chosen response headers
upstream. This is that service, built on :class:`~issuer.verifier.AccessTokenVerifier` and its Starlette
integration (:mod:`issuer.verifier.starlette`): it follows the issuer's JWKS (and, given client credentials,
its revocation feed) and answers every request from its ``Authorization`` header alone, with no call to the
issuer per request::

    issuer-sidecar --issuer https://issuer.example --audience api --port 9180

Answers (the bodies in the contract's ``{"error", "error_description"}`` shape, ``Cache-Control: no-store``):

- 200 with the identity in ``X-Auth-Subject``, ``X-Auth-Session``, ``X-Auth-Role``, ``X-Auth-Email``,
  ``X-Auth-Token-Version``, ``X-Auth-Scope`` (a header is absent when the token lacks the claim);
- 401 ``invalid_token`` with the RFC 6750 challenge (a bare ``WWW-Authenticate: Bearer`` without credentials);
- 403 ``insufficient_scope`` when the token's role is not one the path or ``--require-role`` asks for;
- 503 ``temporarily_unavailable`` with ``Retry-After`` when there are no usable keys (or the revocation feed is
  stale and ``--on-stale reject`` was chosen).

Paths: ``/healthz`` (200 while the process lives), ``/readyz`` (200 when the verifier is ready: keys usable and,
with feed credentials, the revocation feed synchronised once; else 503; ``verifier.status()`` as the body) and
``/metrics`` (Prometheus text) are the sidecar's own; ``/require-role/<role>[,<role>...]`` checks a token and
asks for one of those roles (so one sidecar serves locations with different policies, and the policy lives in
the gateway's configuration where no client can touch it); every other path and method is a plain check.
Gateways should send their checks to ``/auth`` so that no client path can reach the sidecar's own.

Identity values are percent-encoded UTF-8 (RFC 3986) outside printable ASCII, and ``%`` itself is ``%25``:
HTTP header values are bytes, and an email or role may hold any character the issuer accepted.

Configuration is by flag or environment variable (flags win): ``--issuer``/``ISSUER_URL``,
``--audience``/``ISSUER_AUDIENCE`` (default ``api``), ``--jwks-uri``/``SIDECAR_JWKS_URI`` (default: discovered
from the issuer's metadata), ``--require-role``/``SIDECAR_REQUIRE_ROLE`` (comma-separated; default: any role),
``--leeway``/``SIDECAR_LEEWAY`` (seconds, default 5), ``--client-id``/``SIDECAR_CLIENT_ID`` with the secret in
``SIDECAR_CLIENT_SECRET`` or a file named by ``--client-secret-file``/``SIDECAR_CLIENT_SECRET_FILE`` (never a
flag: command lines are visible to every user of the machine), ``--token-lifetime``/``SIDECAR_TOKEN_LIFETIME``
(the issuer's ``ACCESS_TOKEN_TTL``, default 900), ``--on-stale``/``SIDECAR_ON_STALE`` (``accept`` or ``reject``,
default ``accept``), ``--host``/``--port`` (127.0.0.1:9180).

**The revocation feed.** With a client id and secret (a client of scope ``events``: ``issuer clients add
sidecar --scope events``) the verifier follows the issuer's feed (:class:`~issuer.verifier.events.RevocationFeed`):
a revoked session, a logout-all and a deleted account are refused (401 ``invalid_token``) within about a second
of the issuer's answer to the revoking request. ``--token-lifetime`` must be at least the issuer's
``ACCESS_TOKEN_TTL``: revocations are remembered that long (plus leeway and margin), and tokens that live longer
are refused. ``--on-stale`` is the feed's stale policy: ``accept`` keeps answering from what is known while the
feed is unreachable, ``reject`` answers 503 instead (see :mod:`issuer.verifier.events`). Start-up waits up to
10 s for the first sync; ``/readyz`` answers 503 until it happened.

It is served by uvicorn with uvloop and httptools: ``pip install "issuer[sidecar]"`` (Starlette, uvicorn,
prometheus-client; none of the server's database or password dependencies).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.authentication import AuthenticationError
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Message, Receive, Scope, Send

from issuer.verifier.errors import VerificationError
from issuer.verifier.events import OnStale, RevocationFeed
from issuer.verifier.jwks import JWKSCache
from issuer.verifier.starlette import (
    BearerAuthBackend,
    BearerAuthError,
    TokenUser,
    on_auth_error,
    readiness,
    requires_role,
)
from issuer.verifier.starlette import requires_token as guard_token
from issuer.verifier.verifier import AccessTokenVerifier

log = logging.getLogger("issuer.sidecar")

DEFAULT_PORT = 9180
# The response headers a gateway copies upstream. Upstreams trust them, so every gateway configuration in
# examples/gateways/ also strips any the client sent (tests/gateways checks that it does).
SUBJECT, SESSION, ROLE, EMAIL, TOKEN_VERSION, SCOPE = (
    "X-Auth-Subject",
    "X-Auth-Session",
    "X-Auth-Role",
    "X-Auth-Email",
    "X-Auth-Token-Version",
    "X-Auth-Scope",
)
IDENTITY_HEADERS = (SUBJECT, SESSION, ROLE, EMAIL, TOKEN_VERSION, SCOPE)
ROLE_PATH = "/require-role/"
# Printable ASCII but "%": the characters a header value keeps as they are (see the module docstring).
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@dataclass(frozen=True)
class SidecarConfig:
    issuer: str
    audience: str = "api"
    jwks_uri: str | None = None
    require_roles: frozenset[str] = frozenset()
    leeway: int = 5
    client_id: str | None = None
    client_secret: str | None = None
    token_lifetime: int = 900
    on_stale: OnStale = "accept"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    @property
    def follows_feed(self) -> bool:
        return self.client_id is not None and self.client_secret is not None


class SidecarMetrics:
    """The sidecar's Prometheus metrics, in a registry of its own (two sidecars in one process do not clash)."""

    def __init__(self, verifier: AccessTokenVerifier) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.checks = Counter(
            "sidecar_checks_total",
            "Forward-auth checks answered, by outcome (allowed, anonymous, forbidden, invalid_token, unavailable).",
            ["outcome"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "sidecar_token_refusals_total",
            "Bearer tokens refused, by reason (expired, bad_signature, unknown_kid, wrong_audience, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sidecar_check_duration_seconds",
            "Time to answer one check, inside the process.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )
        self.registry.register(_JWKSCollector(verifier.jwks))
        if verifier.events is not None:
            self.registry.register(_FeedCollector(verifier.events))
        # Outcomes appear at 0 before the first check, so that rate() and alerts see every series.
        for outcome in ("allowed", "anonymous", "forbidden", "invalid_token", "unavailable"):
            self.checks.labels(outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JWKSCollector(Collector):
    """The JWKS cache's own counters (``JWKSCache.stats``), read at scrape time."""

    def __init__(self, jwks: JWKSCache) -> None:
        self.jwks = jwks

    def collect(self) -> list[Metric]:
        stats = self.jwks.stats
        families: list[Metric] = []
        for name, value, text in (
            ("sidecar_jwks_fetches", stats.jwks_fetches, "Requests to jwks_uri, 304s included."),
            ("sidecar_jwks_not_modified", stats.not_modified, "JWKS fetches answered 304."),
            ("sidecar_jwks_failures", stats.failures, "JWKS fetches that failed (the cached keys were kept)."),
            ("sidecar_jwks_unknown_kid_refetches", stats.unknown_kid_refetches, "Refetches for an unknown kid."),
            ("sidecar_jwks_keys", len(self.jwks.kids), "Signing keys in the cached key set."),
        ):
            family = GaugeMetricFamily(name, text)
            family.add_metric([], float(value))
            families.append(family)
        return families


class _FeedCollector(Collector):
    """The revocation feed's gauges and counters (``RevocationFeed.status()``), read at scrape time.

    ``sidecar_feed_lag_seconds`` is the one to alert on: above the feed's ``max_lag`` (60 s) the sidecar is
    stale, and revocations made meanwhile are not refused (``on_stale=accept``) or every check is a 503
    (``on_stale=reject``)."""

    def __init__(self, feed: RevocationFeed) -> None:
        self.feed = feed

    def collect(self) -> list[Metric]:
        status = self.feed.status()
        families: list[Metric] = []
        for name, key, text in _FEED_GAUGES:
            family = GaugeMetricFamily(name, text)
            family.add_metric([], float(status[key]))
            families.append(family)
        for name, key, label, text in _FEED_LABELLED:
            family = GaugeMetricFamily(name, text, labels=[label])
            for value, count in sorted(status[key].items()):
                family.add_metric([value], float(count))
            families.append(family)
        return families


# (metric, key of RevocationFeed.status(), help): booleans as 0/1.
_FEED_GAUGES = (
    ("sidecar_feed_ready", "ready", "1 once the feed synchronised (and, with on_stale=reject, is not stale)."),
    ("sidecar_feed_stale", "stale", "1 when never synchronised or behind by more than max_lag."),
    ("sidecar_feed_lag_seconds", "lag_seconds", "How far behind the issuer the feed may be (0 while long-polling)."),
    ("sidecar_feed_entries", "entries", "Revocations remembered."),
    ("sidecar_feed_evictions", "evictions", "Entries dropped at max_entries (should stay 0)."),
    ("sidecar_feed_polls", "polls", "Poll requests sent."),
    ("sidecar_feed_sets_applied", "sets_applied", "Security Event Tokens verified and merged."),
    ("sidecar_feed_sets_refused", "sets_refused", "Security Event Tokens refused (see sidecar_feed_refused_sets)."),
    ("sidecar_feed_errors", "errors", "Polls that failed (the loop backs off and retries)."),
    ("sidecar_feed_cursor_resets", "cursor_resets", "Times the kept window was read again from its start."),
    ("sidecar_feed_accepted_while_stale", "accepted_while_stale", "Tokens accepted while stale (on_stale=accept)."),
)
_FEED_LABELLED = (
    ("sidecar_feed_refused_sets", "refused_sets", "reason", "Security Event Tokens refused, by reason."),
    ("sidecar_feed_tokens_revoked", "tokens_revoked", "rule", "Tokens refused as revoked, by the rule that matched."),
)


class Sidecar:
    """The ASGI application: the checks, the sidecar's own paths, and the metrics of every check."""

    def __init__(self, config: SidecarConfig, verifier: AccessTokenVerifier | None = None) -> None:
        """``verifier`` defaults to :func:`build_verifier` (tests pass one on a fake issuer). A verifier given
        with feed credentials in ``config`` must follow a feed itself: credentials taken and then ignored would
        let revoked tokens through."""
        if config.follows_feed and verifier is not None and verifier.events is None:
            raise ValueError("the configuration has feed credentials, and the verifier follows no feed")
        self.config = config
        self.verifier = verifier if verifier is not None else build_verifier(config)
        self.metrics = SidecarMetrics(self.verifier)
        self._guards: dict[frozenset[str], Callable[[Request], Awaitable[Response]]] = {}
        errors = {HTTPException: _http_error}
        checks = Starlette(
            routes=[
                Route(ROLE_PATH + "{roles}", self._check_roles, methods=_ALL_METHODS),
                Route("/{path:path}", self._check, methods=_ALL_METHODS),
            ],
            exception_handlers=errors,
        )
        self.app = Starlette(
            routes=[
                Route("/healthz", self._healthz, methods=["GET", "HEAD"]),
                Route("/readyz", readiness(self.verifier), methods=["GET", "HEAD"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                # The Starlette integration authenticates every check; only the sidecar's own paths skip it.
                Mount(
                    "",
                    app=AuthenticationMiddleware(
                        checks, backend=BearerAuthBackend(self.verifier), on_error=self._refused
                    ),
                ),
            ],
            exception_handlers=errors,
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, with each check's latency and outcome counted from the status it answered."""
        if scope["type"] != "http" or scope["path"] in _OWN_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.checks.labels(_outcome(message["status"], scope)).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            self.metrics.latency.observe(time.perf_counter() - started)

    # ------------------------------------------------------------ checks

    async def _check(self, request: Request) -> Response:
        return await self._guard_for(frozenset())(request)

    async def _check_roles(self, request: Request) -> Response:
        roles = frozenset(role for role in request.path_params["roles"].split(",") if role)
        return await self._guard_for(roles)(request)

    def _guard_for(self, roles: frozenset[str]) -> Callable[[Request], Awaitable[Response]]:
        """The Starlette integration's guards over the allowed answer: the path's roles (one of them), then
        ``--require-role`` (one of those too), so a path never weakens the sidecar's own requirement. Built
        once per set of roles: role paths are written in gateway configurations, a handful."""
        guard = self._guards.get(roles)
        if guard is None:
            guard = requires_role(*sorted(roles))(self._allowed) if roles else guard_token(self._allowed)
            if self.config.require_roles:
                guard = requires_role(*sorted(self.config.require_roles))(guard)
            if len(self._guards) >= _MAX_GUARDS:  # a client inventing role paths must not grow this forever
                self._guards.clear()
            self._guards[roles] = guard
        return guard

    async def _allowed(self, request: Request) -> Response:
        user = request.user
        assert isinstance(user, TokenUser)
        token = user.token
        headers = {"Cache-Control": "no-store", SUBJECT: _header_value(token.sub)}
        for name, value in (
            (SESSION, token.sid),
            (ROLE, token.role),
            (EMAIL, token.email),
            (TOKEN_VERSION, None if token.token_version is None else str(token.token_version)),
            (SCOPE, " ".join(token.scopes) or None),
        ):
            if value is not None:
                headers[name] = _header_value(value)
        return Response(status_code=200, headers=headers)

    def _refused(self, conn: HTTPConnection, exc: AuthenticationError) -> Response:
        """``on_error`` of the authentication middleware: the Starlette integration's answer, counted."""
        error = exc.error if isinstance(exc, BearerAuthError) else None
        self.metrics.refusals.labels(error.reason if isinstance(error, VerificationError) else "invalid").inc()
        return on_auth_error(conn, exc)

    # ------------------------------------------------------------ the sidecar's own paths

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: object) -> AsyncIterator[None]:
        async with self.verifier.lifespan(app):
            yield


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_OUTCOMES = {200: "allowed", 403: "forbidden", 503: "unavailable"}
_MAX_GUARDS = 1000


def _outcome(status: int, scope: Scope) -> str:
    if status == 401:
        sent_credentials = any(name == b"authorization" for name, _ in scope["headers"])
        return "invalid_token" if sent_credentials else "anonymous"
    return _OUTCOMES.get(status, "error")


def _header_value(value: str) -> str:
    return quote(value, safe=_HEADER_SAFE)


async def _http_error(request: Request, exc: Exception) -> Response:
    """405 (a method no gateway sends) and the like, in the contract's error shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    body = {"error": code, "error_description": str(exc.detail)}
    return JSONResponse(body, status_code=exc.status_code, headers={"Cache-Control": "no-store", **(exc.headers or {})})


def build_verifier(config: SidecarConfig) -> AccessTokenVerifier:
    """The verifier the configuration describes: the JWKS, and the revocation feed when it has credentials."""
    jwks = JWKSCache(jwks_uri=config.jwks_uri) if config.jwks_uri else JWKSCache(issuer=config.issuer)
    events = None
    if config.client_id is not None and config.client_secret is not None:
        events = RevocationFeed(
            config.client_id, config.client_secret, token_lifetime=config.token_lifetime, on_stale=config.on_stale
        )
    return AccessTokenVerifier(
        issuer=config.issuer, audience=config.audience, jwks=jwks, leeway=config.leeway, events=events
    )


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> SidecarConfig:
    parser = argparse.ArgumentParser(
        prog="issuer-sidecar",
        description="Forward-auth sidecar: answers each request from its Authorization header (200, 401, 403, 503).",
    )
    parser.add_argument("--issuer", default=environ.get("ISSUER_URL"), help="the issuer URL, exactly as in 'iss'")
    parser.add_argument("--audience", default=environ.get("ISSUER_AUDIENCE", "api"))
    parser.add_argument("--jwks-uri", default=environ.get("SIDECAR_JWKS_URI") or None)
    parser.add_argument("--require-role", default=environ.get("SIDECAR_REQUIRE_ROLE", ""), help="comma-separated")
    parser.add_argument("--leeway", default=environ.get("SIDECAR_LEEWAY", "5"), help="seconds of clock skew")
    parser.add_argument("--client-id", default=environ.get("SIDECAR_CLIENT_ID") or None)
    parser.add_argument("--client-secret-file", default=environ.get("SIDECAR_CLIENT_SECRET_FILE") or None)
    parser.add_argument(
        "--token-lifetime",
        default=environ.get("SIDECAR_TOKEN_LIFETIME", "900"),
        help="seconds: the issuer's ACCESS_TOKEN_TTL (revocations are remembered that long)",
    )
    parser.add_argument(
        "--on-stale",
        default=environ.get("SIDECAR_ON_STALE", "accept"),
        help="accept (default) or reject: what checks answer while the revocation feed is unreachable",
    )
    parser.add_argument("--host", default=environ.get("SIDECAR_HOST", "127.0.0.1"))
    parser.add_argument("--port", default=environ.get("SIDECAR_PORT", str(DEFAULT_PORT)))
    args = parser.parse_args(argv)
    if not args.issuer:
        parser.error("--issuer (or ISSUER_URL) is required")
    leeway, port = _number(parser, "--leeway", args.leeway, 0, 300), _number(parser, "--port", args.port, 1, 65535)
    token_lifetime = _number(parser, "--token-lifetime", args.token_lifetime, 1, 31_536_000)
    on_stale = args.on_stale.strip()
    if on_stale not in ("accept", "reject"):
        parser.error(f"--on-stale must be accept or reject, not {args.on_stale!r}")
    secret = environ.get("SIDECAR_CLIENT_SECRET") or None
    if args.client_secret_file:
        try:
            secret = Path(args.client_secret_file).read_text().strip()
        except OSError as exc:
            parser.error(f"--client-secret-file: {exc.strerror}: {args.client_secret_file}")
    if (args.client_id is None) != (secret is None):
        parser.error("the revocation feed needs both --client-id and a client secret (or neither)")
    return SidecarConfig(
        issuer=args.issuer,
        audience=args.audience,
        jwks_uri=args.jwks_uri,
        require_roles=frozenset(role.strip() for role in args.require_role.split(",") if role.strip()),
        leeway=leeway,
        client_id=args.client_id,
        client_secret=secret,
        token_lifetime=token_lifetime,
        on_stale="reject" if on_stale == "reject" else "accept",
        host=args.host,
        port=port,
    )


def _number(parser: argparse.ArgumentParser, flag: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        parser.error(f"{flag} must be a whole number, not {text!r}")
    if not low <= value <= high:
        parser.error(f"{flag} must be between {low} and {high}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    """``issuer-sidecar``: parse the configuration, then serve with uvicorn (one process; run more behind the
    gateway's upstream list for more cores)."""
    config = parse_args(argv, os.environ)
    try:
        import uvicorn
    except ImportError:
        print("issuer-sidecar: needs: pip install 'issuer[sidecar]'", file=sys.stderr)
        raise SystemExit(1) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: each long poll of the feed and each JWKS revalidation, forever.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    sidecar = Sidecar(config)
    log.info(
        "issuer-sidecar: listening on http://%s:%d for %s (audience %s; %s)",
        config.host,
        config.port,
        config.issuer,
        config.audience,
        f"following the revocation feed as {config.client_id}" if config.follows_feed else "no revocation feed",
    )
    uvicorn.run(
        sidecar,
        host=config.host,
        port=config.port,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
