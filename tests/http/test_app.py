"""The app is built in one place (``create_app``) and its route table is the whole truth: every request goes
through the one router, and the handlers get the process's services from the lifespan, per request."""

from __future__ import annotations

import httpx
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from issuer.http.app import JsonCORSMiddleware, ResponseHeaders, create_app
from issuer.services import Services
from issuer.settings import Settings
from tests.http._http import APP_ORIGIN, JWKS, OAUTH, OIDC, current_etag, me_tokens
from tests.support.clock import FakeClock
from tests.support.http import bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.operations import scrape, value

GET = {"GET", "HEAD"}
ROUTES = [
    ("/auth/register", {"POST"}),
    ("/auth/login", {"POST"}),
    ("/auth/refresh", {"POST"}),
    ("/auth/logout", {"POST"}),
    ("/auth/logout-all", {"POST"}),
    ("/auth/me", GET),
    ("/auth/sessions", GET),
    ("/auth/sessions/{session_id}", {"DELETE"}),
    ("/auth/account", {"DELETE"}),
    (JWKS, GET),
    (OAUTH, GET),
    (OIDC, GET),
    ("/healthz", GET),
    ("/readyz", GET),
    ("/metrics", GET),
    ("/oauth2/introspect", {"POST"}),
    ("/oauth2/revoke", {"POST"}),
    ("/events/poll", {"POST"}),
    ("/openapi.json", GET),
    ("/sdk/auth-client.js", GET),
    # Routed always; they answer 404 unless ACCOUNT_PAGE is on.
    ("/account", GET),
    ("/account/account.js", GET),
    ("/account/account.css", GET),
]


async def test_register_login_me_refresh(client: httpx.AsyncClient) -> None:
    user = await register(client)
    tokens = await login(client)
    me = await client.get("/auth/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200
    assert me.json() == {**user, "tokenVersion": 0}
    rotated = await refresh_body(client, tokens["refresh_token"])
    assert rotated.status_code == 200
    assert rotated.json()["refresh_token"] != tokens["refresh_token"]


def test_the_route_table(settings: Settings) -> None:
    app = create_app(settings)
    table = []
    for route in app.routes:
        assert isinstance(route, Route), route  # no Mount, no WebSocketRoute: nothing routes on its own
        table.append((route.path, route.methods))
    assert len({path for path, _ in table}) == len(table), "one route per path"
    assert dict(table) == dict(ROUTES)


def test_one_plain_router_and_no_middleware_that_answers(settings: Settings) -> None:
    """Starlette's own router, without trailing-slash redirects; the middleware only adds headers (and CORS
    when ALLOWED_ORIGINS is set): nothing answers a request ahead of the router."""
    plain = create_app(settings)
    assert type(plain.router) is Router
    assert plain.router.redirect_slashes is False
    middleware: list[object] = [m.cls for m in plain.user_middleware]
    assert middleware == [ResponseHeaders]
    browsers = create_app(with_settings(settings, allowed_origins=(APP_ORIGIN,)))
    assert browsers.router.redirect_slashes is False
    middleware = [m.cls for m in browsers.user_middleware]
    assert middleware == [ResponseHeaders, JsonCORSMiddleware]


async def test_the_lifespan_hands_the_services_to_each_request(settings: Settings, clock: FakeClock) -> None:
    app = create_app(settings, clock=clock)
    assert not hasattr(app.state, "services")
    async with running_issuer(settings, clock) as a, running_issuer(settings, clock) as b:
        for harness in (a, b):
            assert set(harness.state) == {"services", "metadata"}
            assert isinstance(harness.state["services"], Services)
            assert not hasattr(harness.starlette.state, "services")
            assert not hasattr(harness.starlette.state, "metadata")
        assert a.services is not b.services
        async with b.client() as client:
            await register(client)
            await login(client)
        # a's app, served with b's state: its handlers answer with b's services and b's documents.
        marked = {**b.state, "metadata": b'{"issuer":"from the request state"}'}
        async with IssuerHarness(a.starlette, marked, clock).client() as crossed, a.client() as own:
            assert value(await scrape(crossed), "issuer_logins_total", outcome="success") == 1
            assert value(await scrape(own), "issuer_logins_total", outcome="success") == 0
            assert (await crossed.get(OIDC)).json() == {"issuer": "from the request state"}
            assert (await own.get(OIDC)).json()["jwks_uri"].endswith(JWKS)


class ScopeRecorder:
    """Outermost middleware: keeps every request's scope, as the app left it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http":
            self.scopes.append(scope)


async def test_every_request_reaches_its_handler_through_the_router(issuer: IssuerHarness) -> None:
    """The router records the route it chose in the scope: /auth/me and the documents (GET, HEAD, 200, 304,
    401) get there like every other route, and the endpoint that answered is that route's."""
    app = issuer.starlette
    recorders: list[ScopeRecorder] = []

    def recording(inner: ASGIApp) -> ScopeRecorder:
        recorders.append(ScopeRecorder(inner))
        return recorders[-1]

    app.add_middleware(recording)
    routes = {route.path: route for route in app.routes if isinstance(route, Route)}
    async with issuer.client() as client:
        access = (await me_tokens(client))["access"]
        recorders[0].scopes.clear()
        requests = [
            ("GET", "/auth/me", bearer(access), 200),
            ("HEAD", "/auth/me", bearer(access), 200),
            ("GET", "/auth/me", {}, 401),
            ("GET", JWKS, {}, 200),
            ("HEAD", JWKS, {}, 200),
            ("GET", JWKS, {"If-None-Match": current_etag(issuer)}, 304),
            ("GET", OAUTH, {}, 200),
            ("HEAD", OIDC, {}, 200),
            ("POST", JWKS, {}, 405),
            ("GET", "/healthz", {}, 200),
            ("GET", "/auth/sessions", bearer(access), 200),
        ]
        for method, path, headers, status in requests:
            assert (await client.request(method, path, headers=headers)).status_code == status, (method, path)
        assert (await client.get("/auth/me/")).status_code == 404
    [recorder] = recorders
    assert len(recorder.scopes) == len(requests) + 1
    for (method, path, _, _), scope in zip(requests, recorder.scopes, strict=False):
        assert (scope["method"], scope["path"]) == (method, path)
        assert scope["router"] is app.router, (method, path)
        assert scope["route"] is routes[path], (method, path)
        assert scope["endpoint"] is routes[path].endpoint, (method, path)
    unmatched = recorder.scopes[-1]
    assert unmatched["path"] == "/auth/me/"
    assert unmatched["router"] is app.router
    assert "route" not in unmatched
