"""The direct routes answer exactly what the Starlette routes answer, ahead of the router.

``DirectRoutes`` serves GET and HEAD of the JWKS and the two metadata documents from pre-rendered bytes
(``wellknown.direct_routes``), and of ``/auth/me`` through its plain ASGI endpoint behind the app's own
exception handlers. Their definition is the routes: every answer is compared with the answer the routes
give to the same request, both bare (raw ASGI messages, exact header lists; the documents) and inside the
issuer's middleware (security headers, CORS, latency, errors and faults). Everything else still reaches
the router.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from issuer.routing import DirectRoutes
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from issuer.http import wellknown
from issuer.http.app import create_app
from issuer.settings import Settings
from issuer.storage.database import DatabaseUnavailable
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, login, register
from tests.support.issuer import CLIENT_IP, ISSUER_URL, IssuerHarness, running_issuer, with_settings

JWKS = "/.well-known/jwks.json"
OAUTH = "/.well-known/oauth-authorization-server"
OIDC = "/.well-known/openid-configuration"
PATHS = (JWKS, OAUTH, OIDC)
APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"
SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}

OUTER_MARK = (b"x-outer-middleware", b"1")

Headers = list[tuple[str, str]]


def current_etag(harness: IssuerHarness) -> str:
    return harness.services.keys.ring.jwks(harness.clock()).etag


def conditional_cases(etag: str) -> list[tuple[str, Headers]]:
    """(name, request headers): no condition, matching, weak, listed, wildcard and non-matching ones."""
    return [
        ("no If-None-Match", []),
        ("matching", [("If-None-Match", etag)]),
        ("weak matching", [("If-None-Match", f"W/{etag}")]),
        ("list with match", [("If-None-Match", f'"other", {etag}')]),
        ("weak list with match", [("If-None-Match", f' W/"other" ,W/{etag} ')]),
        ("wildcard", [("If-None-Match", "*")]),
        ("not matching", [("If-None-Match", '"not-the-etag"')]),
        ("weak not matching", [("If-None-Match", 'W/"not-the-etag", "x"')]),
        ("prefix of the etag", [("If-None-Match", etag[:-3] + '"')]),
        ("unquoted etag", [("If-None-Match", etag.strip('"'))]),
        ("empty", [("If-None-Match", "")]),
    ]


# ---------------------------------------------------------------- raw ASGI, without any middleware


class Recorder:
    """An ASGI app in front of ``app`` that counts the requests reaching it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


async def call_asgi(
    app: Any, method: str, path: str, headers: Headers, query: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One request as a server would make it; returns (status, header lines, body) exactly as sent."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"issuer.test"), *((k.lower().encode(), v.encode()) for k, v in headers)],
        "server": ("issuer.test", 443),
        "client": (CLIENT_IP, 40000),
    }
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            # An outer middleware may add to the header list in place (ASGI hands the message over).
            message["headers"].append(OUTER_MARK)
        messages.append(message)

    await app(scope, receive, send)
    start, *body_messages = messages
    assert start["type"] == "http.response.start"
    lines = list(start["headers"])
    assert lines.count(OUTER_MARK) == 1, "a header list was shared between responses"
    lines.remove(OUTER_MARK)
    assert body_messages, "no body message"
    assert all(m["type"] == "http.response.body" for m in body_messages)
    assert not body_messages[-1].get("more_body", False)
    return start["status"], lines, b"".join(m.get("body", b"") for m in body_messages)


def bare_routes(harness: IssuerHarness) -> Starlette:
    """The routes alone, as the definition of what the fast path must answer."""
    app = Starlette(routes=wellknown.routes)
    app.state.services = harness.services
    app.state.metadata = harness.app.state.metadata
    return app


def documents_ahead_of(below: ASGIApp, harness: IssuerHarness) -> ASGIApp:
    """The documents' direct routes in front of ``below``, called as Starlette calls its middleware: with
    the app whose state holds the services and the metadata in the scope."""
    fast = DirectRoutes(below, wellknown.direct_routes())
    owner = bare_routes(harness)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = owner
        await fast(scope, receive, send)

    return app


async def test_fast_path_sends_exactly_what_the_routes_send(issuer: IssuerHarness) -> None:
    routes = bare_routes(issuer)
    below = Recorder(routes)
    fast = documents_ahead_of(below, issuer)
    etag = current_etag(issuer)
    compared = 0
    for path in PATHS:
        for query in (b"", b"v=1"):
            for name, headers in conditional_cases(etag):
                get = await call_asgi(routes, "GET", path, headers, query)
                for method in ("GET", "HEAD"):
                    what = (method, path, query, name)
                    expected = await call_asgi(routes, method, path, headers, query)
                    status, lines, body = await call_asgi(fast, method, path, headers, query)
                    assert status == expected[0], what
                    assert sorted(lines) == sorted(expected[1]), what
                    assert len(lines) == len({name for name, _ in lines}), (what, "a header line twice", lines)
                    if method == "GET":
                        assert body == expected[2], what
                    else:
                        # A server drops the routes' HEAD body; the fast path sends none. Headers as for GET.
                        assert body == b"", what
                        assert sorted(lines) == sorted(get[1]), what
                    compared += 1
    assert below.calls == [], "GET and HEAD of the well-known documents must not reach the router"
    assert compared == len(PATHS) * 2 * 11 * 2


async def test_fast_path_answers_304_only_for_the_jwks(issuer: IssuerHarness) -> None:
    """A spot check of the answers the equivalence above takes from the routes."""
    fast = documents_ahead_of(bare_routes(issuer), issuer)
    etag = current_etag(issuer)
    statuses = {}
    for name, headers in conditional_cases(etag):
        statuses[name] = (await call_asgi(fast, "GET", JWKS, headers))[0]
        assert (await call_asgi(fast, "GET", OIDC, headers))[0] == 200
    assert {name for name, status in statuses.items() if status == 304} == {
        "matching",
        "weak matching",
        "list with match",
        "weak list with match",
        "wildcard",
    }
    assert set(statuses.values()) == {200, 304}
    status, lines, body = await call_asgi(fast, "GET", JWKS, [("If-None-Match", etag)])
    assert (status, body) == (304, b"")
    max_age = issuer.services.keys.jwks_max_age(issuer.services.settings)
    assert sorted(lines) == [(b"cache-control", f"public, max-age={max_age}".encode()), (b"etag", etag.encode())]


async def test_everything_but_get_and_head_of_the_documents_goes_to_the_router(issuer: IssuerHarness) -> None:
    below = Recorder(bare_routes(issuer))
    fast = documents_ahead_of(below, issuer)
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in PATHS:
            status, _, _ = await call_asgi(fast, method, path, [])
            assert status == 405, (method, path)
    for path in ("/.well-known/jwks.json/", "/.well-known/JWKS.json", "/.well-known/other", "/"):
        await call_asgi(fast, "GET", path, [])
    assert len(below.calls) == 5 * len(PATHS) + 4


# ---------------------------------------------------------------- inside the issuer's middleware


def without_fast_path(harness: IssuerHarness) -> Starlette:
    """The same issuer (same services, settings and middleware) with the fast path taken out."""
    app = create_app(harness.services.settings, clock=harness.clock, services=harness.services)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not DirectRoutes]
    assert len(app.user_middleware) == len(harness.app.user_middleware) - 1
    return app


def client_for(app: Starlette, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 40000), raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url=ISSUER_URL)


def normalized(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = sorted((name.lower(), value) for name, value in response.headers.multi_items())
    return response.status_code, response.content, headers


@pytest.fixture(params=[(), (APP_ORIGIN,)], ids=["no-cors", "cors"])
async def either_issuer(
    request: pytest.FixtureRequest, settings: Settings, clock: FakeClock
) -> AsyncIterator[IssuerHarness]:
    async with running_issuer(with_settings(settings, allowed_origins=request.param), clock) as harness:
        yield harness


async def test_the_issuer_answers_as_it_would_without_the_fast_path(either_issuer: IssuerHarness) -> None:
    etag = current_etag(either_issuer)
    origins: list[Headers] = [[], [("Origin", APP_ORIGIN)], [("Origin", EVIL_ORIGIN)]]
    async with either_issuer.client() as fast, client_for(without_fast_path(either_issuer)) as routed:
        for path in PATHS:
            for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"):
                for name, conditional in conditional_cases(etag):
                    for origin in origins:
                        what = (method, path, name, origin)
                        headers = [*conditional, *origin]
                        expected = await routed.request(method, path, headers=headers)
                        got = await fast.request(method, path, headers=headers)
                        assert normalized(got) == normalized(expected), what


async def test_every_if_none_match_line_counts(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """RFC 9110 section 5.3: several If-None-Match lines are one list."""
    etag = current_etag(issuer)
    split = await client.get(JWKS, headers=[("If-None-Match", '"other"'), ("If-None-Match", etag)])
    assert split.status_code == 304
    assert split.headers["etag"] == etag
    neither = await client.get(JWKS, headers=[("If-None-Match", '"a"'), ("If-None-Match", 'W/"b"')])
    assert neither.status_code == 200


async def test_other_methods_get_the_contracts_405(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    for path in PATHS:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            response = await client.request(method, path, json={"x": 1})
            assert_error(response, 405, "method_not_allowed")
            assert set(response.json()) == {"error", "error_description"}
            assert response.headers["content-type"].startswith("application/json")
            allowed = {m.strip() for m in response.headers["allow"].split(",")}
            assert allowed == {"GET", "HEAD"}, (method, path, allowed)
            for name, value in SECURITY.items():
                assert response.headers.get_list(name) == [value], (method, path, name)


async def test_fast_path_answers_carry_the_security_headers_once(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    etag = current_etag(issuer)
    for _ in range(3):  # the pre-rendered header lists must not collect the outer middleware's additions
        for path in PATHS:
            for method in ("GET", "HEAD"):
                for headers in ({}, {"If-None-Match": etag}):
                    response = await client.request(method, path, headers=headers)
                    assert response.status_code in (200, 304)
                    for name, value in SECURITY.items():
                        assert response.headers.get_list(name) == [value], (method, path, headers, name)
    document = await client.get(JWKS)
    assert document.headers["cache-control"] == f"public, max-age={issuer.services.settings.jwks_max_age}"
    assert document.headers["content-type"] == "application/json"
    assert int(document.headers["content-length"]) == len(document.content)
    assert {key["kid"] for key in document.json()["keys"]}
    head = await client.head(JWKS)
    assert head.content == b""
    assert head.headers["content-length"] == document.headers["content-length"]
    metadata = await client.get(OIDC)
    assert json.loads(metadata.content)["jwks_uri"] == f"{ISSUER_URL}{JWKS}"
    assert metadata.headers["cache-control"] == wellknown.METADATA_CACHE_CONTROL


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def test_fast_path_requests_are_timed_under_their_route(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    etag = current_etag(issuer)
    for _ in range(3):
        assert (await client.get(JWKS)).status_code == 200
    assert (await client.get(JWKS, headers={"If-None-Match": etag})).status_code == 304
    assert (await client.head(JWKS)).status_code == 200
    assert (await client.get(OAUTH)).status_code == 200
    assert (await client.head(OIDC)).status_code == 200
    assert (await client.post(JWKS)).status_code == 405
    samples = await scrape(client)

    def count(route: str, method: str) -> float:
        key = ("issuer_request_duration_seconds_count", frozenset({("route", route), ("method", method)}))
        return samples.get(key, 0.0)

    assert count(JWKS, "GET") == 4
    assert count(JWKS, "HEAD") == 1
    assert count(JWKS, "POST") == 1
    assert count(OAUTH, "GET") == 1
    assert count(OIDC, "HEAD") == 1
    assert count("unmatched", "GET") == 0


async def test_allowed_origins_get_cors_headers_on_the_fast_path(settings: Settings, clock: FakeClock) -> None:
    configured = with_settings(settings, allowed_origins=(APP_ORIGIN,))
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        etag = current_etag(harness)
        for path in PATHS:
            for headers in ({}, {"If-None-Match": etag}):
                allowed = await client.get(path, headers={**headers, "Origin": APP_ORIGIN})
                assert allowed.status_code in (200, 304)
                assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
                assert allowed.headers["access-control-allow-credentials"] == "true"
                assert "origin" in allowed.headers.get("vary", "").lower()
                assert allowed.headers["x-content-type-options"] == "nosniff"
                refused = await client.get(path, headers={**headers, "Origin": EVIL_ORIGIN})
                assert refused.status_code == allowed.status_code
                assert "access-control-allow-origin" not in refused.headers
                assert refused.content == allowed.content
        preflight = await client.options(JWKS, headers={"Origin": APP_ORIGIN, "Access-Control-Request-Method": "GET"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN


# ---------------------------------------------------------------- the pre-rendered JWKS follows the key set


async def assert_same_as_routes(fast: httpx.AsyncClient, routed: httpx.AsyncClient, etags: Sequence[str]) -> None:
    for method in ("GET", "HEAD"):
        for headers in ([], *([("If-None-Match", etag)] for etag in etags)):
            expected = await routed.request(method, JWKS, headers=headers)
            got = await fast.request(method, JWKS, headers=headers)
            assert normalized(got) == normalized(expected), (method, headers)


async def test_the_fast_path_follows_rotation_and_time(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    services = issuer.services
    async with client_for(without_fast_path(issuer)) as routed:
        first = (await client.get(JWKS)).headers["etag"]
        await assert_same_as_routes(client, routed, [first])

        await services.keys.rotate(immediate=True)  # a reload: a second key is published
        second = (await client.get(JWKS)).headers["etag"]
        assert second != first
        assert len((await client.get(JWKS)).json()["keys"]) == 2
        assert (await client.get(JWKS, headers={"If-None-Match": first})).status_code == 200
        await assert_same_as_routes(client, routed, [first, second])

        # No reload: only time passes, and the retired key leaves the JWKS.
        issuer.clock.advance(services.keys.retire_grace(services.settings).total_seconds())
        third = (await client.get(JWKS)).headers["etag"]
        assert third not in (first, second)
        assert len((await client.get(JWKS)).json()["keys"]) == 1
        assert (await client.get(JWKS, headers={"If-None-Match": second})).status_code == 200
        assert (await client.get(JWKS, headers={"If-None-Match": third})).status_code == 304
        await assert_same_as_routes(client, routed, [first, second, third])


# ---------------------------------------------------------------- /auth/me, with the app's error handling


def me_cases(tokens: dict[str, str]) -> list[tuple[str, Headers]]:
    """(name, request headers): every way a Bearer check can end, each with its own answer."""
    access = tokens["access"]
    head, payload, signature = access.split(".")
    return [
        ("valid", [("Authorization", f"Bearer {access}")]),
        ("valid, lower-case scheme", [("Authorization", f"bearer {access}")]),
        ("no Authorization", []),
        ("Basic", [("Authorization", "Basic YWxpY2U6cHc=")]),
        ("empty Bearer", [("Authorization", "Bearer ")]),
        ("not a JWT", [("Authorization", "Bearer abc.def.ghi")]),
        ("signature of another token", [("Authorization", f"Bearer {head}.{payload}.{signature[::-1]}")]),
        ("revoked by logout-all", [("Authorization", f"Bearer {tokens['revoked']}")]),
        ("account deleted", [("Authorization", f"Bearer {tokens['deleted']}")]),
    ]


async def me_tokens(client: httpx.AsyncClient) -> dict[str, str]:
    """A live access token, one revoked by logout-all, and one whose account is gone."""
    await register(client)
    revoked = (await login(client))["access_token"]
    assert (await client.post("/auth/logout-all", headers=bearer(revoked))).status_code == 204
    access = (await login(client))["access_token"]
    await register(client, email="gone@example.com")
    deleted = (await login(client, email="gone@example.com"))["access_token"]
    gone = await client.request("DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(deleted))
    assert gone.status_code == 204
    return {"access": access, "revoked": revoked, "deleted": deleted}


async def test_me_answers_as_it_would_without_the_fast_path(either_issuer: IssuerHarness) -> None:
    origins: list[Headers] = [[], [("Origin", APP_ORIGIN)], [("Origin", EVIL_ORIGIN)]]
    async with either_issuer.client() as fast, client_for(without_fast_path(either_issuer)) as routed:
        cases = me_cases(await me_tokens(fast))
        statuses = set()
        for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"):
            for name, authorization in cases:
                for origin in origins:
                    what = (method, name, origin)
                    headers = [*authorization, *origin]
                    expected = await routed.request(method, "/auth/me", headers=headers)
                    got = await fast.request(method, "/auth/me", headers=headers)
                    assert normalized(got) == normalized(expected), what
                    statuses.add((method, name, got.status_code))
        # The comparison covered the answers that matter, not only one kind.
        assert ("GET", "valid", 200) in statuses
        assert ("HEAD", "valid", 200) in statuses
        refused = {status for method, name, status in statuses if method == "GET" and "valid" not in name}
        assert refused == {401}
        assert ("POST", "valid", 405) in statuses


async def test_me_answers_bodies_and_errors_in_the_contracts_shape(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    tokens = await me_tokens(client)
    me = await client.get("/auth/me", headers=bearer(tokens["access"]))
    assert me.status_code == 200
    assert set(me.json()) == {"id", "email", "role", "tokenVersion"}
    assert me.json()["email"] == "alice@example.com"
    assert me.headers["content-type"] == "application/json"
    assert me.headers["cache-control"] == "no-store"
    assert int(me.headers["content-length"]) == len(me.content)
    for name, value in SECURITY.items():
        assert me.headers.get_list(name) == [value]
    head = await client.head("/auth/me", headers=bearer(tokens["access"]))
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == me.headers["content-length"]
    for token in (tokens["revoked"], tokens["deleted"]):
        refused = await client.get("/auth/me", headers=bearer(token))
        assert_error(refused, 401, "invalid_token")
        assert refused.headers["www-authenticate"].startswith("Bearer")
        for name, value in SECURITY.items():
            assert refused.headers.get_list(name) == [value]


async def test_get_and_head_of_me_do_not_reach_the_router(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    tokens = await me_tokens(client)
    counting = Recorder(issuer.app.router.middleware_stack)
    issuer.app.router.middleware_stack = counting
    for method in ("GET", "HEAD"):
        assert (await client.request(method, "/auth/me", headers=bearer(tokens["access"]))).status_code == 200
        assert (await client.request(method, "/auth/me")).status_code == 401
    assert counting.calls == []
    assert (await client.post("/auth/me", headers=bearer(tokens["access"]))).status_code == 405
    assert (await client.get("/auth/me/", headers=bearer(tokens["access"]))).status_code == 404
    assert counting.calls == [("POST", "/auth/me"), ("GET", "/auth/me/")]


@pytest.mark.parametrize(
    ("failure", "status", "error"),
    [
        (DatabaseUnavailable("connection refused"), 503, "temporarily_unavailable"),
        (ConnectionRefusedError("connection refused"), 503, "temporarily_unavailable"),
        (RuntimeError("a bug"), 500, "server_error"),
    ],
    ids=["database-unavailable", "socket-error", "bug"],
)
async def test_me_faults_are_answered_as_through_the_router(
    issuer: IssuerHarness, monkeypatch: pytest.MonkeyPatch, failure: Exception, status: int, error: str
) -> None:
    """The user read fails: 503 (retry) for the database, 500 for anything else, in the error shape, with
    the security headers, and the same through the router."""
    # A server answers the 500 and logs the exception; httpx would raise it after the answer.
    fast = client_for(issuer.app, raise_app_exceptions=False)
    routed = client_for(without_fast_path(issuer), raise_app_exceptions=False)
    async with fast, routed:
        access = (await me_tokens(fast))["access"]

        async def failing(user_id: str) -> None:
            raise failure

        monkeypatch.setattr(issuer.services.bearer, "_users", type("Users", (), {"get": staticmethod(failing)})())
        for http in (fast, routed):
            response = await http.get("/auth/me", headers=bearer(access))
            assert_error(response, status, error)
            for name, value in SECURITY.items():
                assert response.headers.get_list(name) == [value]
        expected = await routed.get("/auth/me", headers=bearer(access))
        assert normalized(await fast.get("/auth/me", headers=bearer(access))) == normalized(expected)


async def test_me_is_timed_under_its_route(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    tokens = await me_tokens(client)
    for _ in range(3):
        assert (await client.get("/auth/me", headers=bearer(tokens["access"]))).status_code == 200
    assert (await client.head("/auth/me")).status_code == 401
    samples = await scrape(client)

    def count(method: str) -> float:
        key = ("issuer_request_duration_seconds_count", frozenset({("route", "/auth/me"), ("method", method)}))
        return samples.get(key, 0.0)

    assert (count("GET"), count("HEAD")) == (3, 1)
