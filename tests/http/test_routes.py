"""The route table answers every request: /auth/me (GET and HEAD, every credential, its faults), 405 with
``Allow`` on every route, 404 in the contract's shape and never a trailing-slash redirect, the latency label,
and all of it unchanged when the app is mounted under a path prefix (``root_path``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from issuer.storage import users
from issuer.storage.database import Database, DatabaseUnavailable
from tests.http._http import (
    APP_ORIGIN,
    DOCUMENTS,
    DURATION,
    EVIL_ORIGIN,
    JWKS,
    allowed_methods,
    assert_each_header_once,
    assert_security_headers,
    current_etag,
    me_tokens,
)
from tests.support.http import PASSWORD, assert_error, assert_invalid_token, bearer, login, register
from tests.support.issuer import CLIENT_IP, ISSUER_URL, IssuerHarness
from tests.support.operations import label_values, scrape, value

ME = "/auth/me"
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")

Headers = list[tuple[str, str]]


def normalized(response: httpx.Response, *, without_cors: bool = False) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Status, body and every header line (sorted); ``without_cors`` leaves out what CORS adds."""
    headers = sorted((name.lower(), value) for name, value in response.headers.multi_items())
    if without_cors:
        headers = [(n, v) for n, v in headers if not n.startswith("access-control-") and n != "vary"]
    return response.status_code, response.content, headers


def me_cases(tokens: dict[str, str]) -> list[tuple[str, Headers]]:
    """(name, request headers): every way a Bearer check can end."""
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


def assert_me_answer(response: httpx.Response, method: str, case: str, me: httpx.Response) -> None:
    """What /auth/me must answer ``method`` with the credentials of ``case`` (``me``: the valid GET)."""
    what = (method, case)
    assert_security_headers(response, what)
    if method not in ("GET", "HEAD"):
        # The router refuses the method before any credential is looked at.
        assert response.status_code == 405, what
        assert allowed_methods(response) == {"GET", "HEAD"}, what
        assert "www-authenticate" not in response.headers, what
        if method != "HEAD":
            assert_error(response, 405, "method_not_allowed")
        return
    if method == "HEAD":
        assert response.content == b"", what
    if case.startswith("valid"):
        assert response.status_code == 200, what
        assert response.headers["content-length"] == me.headers["content-length"], what
        if method == "GET":
            assert response.content == me.content, what
        return
    assert response.status_code == 401, what
    challenge = response.headers["www-authenticate"]
    if case in ("no Authorization", "Basic"):
        assert challenge == "Bearer", what  # RFC 6750 section 3.1: no credentials, no error code
        if method == "GET":
            assert_error(response, 401, "invalid_token")
    elif method == "GET":
        assert_invalid_token(response)
    else:
        assert challenge.startswith('Bearer error="invalid_token"'), what


async def test_get_and_head_of_me(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client)
    access = (await login(client))["access_token"]
    for _ in range(3):  # header lists are made per response: the middleware's additions never pile up
        me = await client.get(ME, headers=bearer(access))
        assert me.status_code == 200
        assert me.json() == {**user, "tokenVersion": 0}
        assert me.headers["content-type"] == "application/json"
        assert me.headers["cache-control"] == "no-store"
        assert int(me.headers["content-length"]) == len(me.content)
        assert_security_headers(me)
        assert_each_header_once(me)
        head = await client.head(ME, headers=bearer(access))
        assert (head.status_code, head.content) == (200, b"")
        assert normalized(head)[2] == normalized(me)[2], "HEAD must carry GET's headers"


async def test_me_answers_every_method_and_credential(either_issuer: IssuerHarness) -> None:
    """Each credential and method gets its own answer, and a browser Origin changes nothing but the CORS
    headers (granted only to an allowed origin, and only when ALLOWED_ORIGINS is set)."""
    cors = bool(either_issuer.services.settings.allowed_origins)
    origins: list[str | None] = [None, APP_ORIGIN, EVIL_ORIGIN]
    async with either_issuer.client() as client:
        tokens = await me_tokens(client)
        me = await client.get(ME, headers=bearer(tokens["access"]))
        assert me.status_code == 200
        for method in METHODS:
            for case, authorization in me_cases(tokens):
                answers = []
                for origin in origins:
                    headers = authorization if origin is None else [*authorization, ("Origin", origin)]
                    response = await client.request(method, ME, headers=headers)
                    assert_me_answer(response, method, case, me)
                    if cors and origin == APP_ORIGIN:
                        assert response.headers["access-control-allow-origin"] == APP_ORIGIN, (method, case)
                        assert response.headers["access-control-allow-credentials"] == "true", (method, case)
                    else:
                        assert "access-control-allow-origin" not in response.headers, (method, case, origin)
                    answers.append(normalized(response, without_cors=True))
                assert answers[1:] == answers[:1] * 2, (method, case)


def route_table(harness: IssuerHarness) -> list[tuple[str, set[str], str]]:
    """(template, methods, a path it matches) of every route (tests/http/test_app.py pins the table itself)."""
    table = []
    for route in harness.starlette.routes:
        assert isinstance(route, Route), route
        assert route.methods is not None, route
        path = route.path.replace("{session_id}", "c0ffee00-0000-4000-8000-000000000000")
        table.append((route.path, route.methods, path))
    return table


async def test_every_route_refuses_other_methods_with_405_and_allow(
    issuer: IssuerHarness, client: httpx.AsyncClient
) -> None:
    """RFC 9110 section 15.5.6: the 405 lists the route's methods; the body is the contract's error."""
    refused = 0
    for template, methods, path in route_table(issuer):
        for method in set(METHODS) - methods:
            response = await client.request(method, path, headers={"Content-Type": "application/json"})
            what = (method, template)
            assert response.status_code == 405, what
            assert allowed_methods(response) == methods, what
            assert response.headers["cache-control"] == "no-store", what
            assert_security_headers(response, what)
            if method != "HEAD":
                assert_error(response, 405, "method_not_allowed")
                assert set(response.json()) == {"error", "error_description"}, what
                assert response.headers["content-type"] == "application/json", what
            refused += 1
    assert refused >= 4 * len(issuer.starlette.routes)


NOT_FOUND = ("/", "/nope", "/auth", "/auth/", "/auth/ME", "/auth/me/x", "/.well-known/JWKS.json", "/.well-known/other")


async def test_unknown_paths_are_404_in_the_error_shape(client: httpx.AsyncClient) -> None:
    for path in NOT_FOUND:
        for method in ("GET", "HEAD", "POST", "DELETE"):
            response = await client.request(method, path)
            what = (method, path)
            assert response.status_code == 404, what
            assert "location" not in response.headers, what
            assert_security_headers(response, what)
            if method != "HEAD":
                assert_error(response, 404, "not_found")
                assert set(response.json()) == {"error", "error_description"}, what


async def test_a_trailing_slash_is_not_found_never_a_redirect(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """Starlette's default would answer 307 to http://<the client's Host>/auth/login/ without the slash: behind a
    TLS proxy a client that follows it resends the password in clear text, to whatever host the request named.
    Every route, with each of its methods."""
    body = {"email": "alice@example.com", "password": "correct horse battery staple"}
    for _, methods, path in route_table(issuer):
        for method in methods:
            response = await client.request(method, path + "/", json=body, headers={"Host": "evil.example"})
            what = (method, path)
            assert response.status_code == 404, what
            assert "location" not in response.headers, what
            if method != "HEAD":
                assert_error(response, 404, "not_found")


# ---------------------------------------------------------------- /auth/me when the user read fails


def unreachable_database() -> Database:
    """A Database on a port nothing listens on: its statements meet a real socket error."""
    return Database("postgresql://issuer@127.0.0.1:1/issuer", 1)


@pytest.fixture
async def user_read_failing_with(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[[str], None]]:
    """Makes the Bearer check's user read (``users.by_ids``) fail: ``"database"`` (the storage layer's own
    error), ``"socket"`` (the real statement, on a database that refuses connections), or ``"bug"``."""
    unreachable = unreachable_database()
    real = users.by_ids

    async def through_unreachable(db: Any, ids: list[str]) -> Any:
        return await real(unreachable, ids)

    async def database_down(db: Any, ids: list[str]) -> Any:
        raise DatabaseUnavailable("ConnectionDoesNotExistError")

    async def bug(db: Any, ids: list[str]) -> Any:
        raise RuntimeError("a bug with a secret detail")

    def fail(how: str) -> None:
        failures = {"socket": through_unreachable, "database": database_down, "bug": bug}
        monkeypatch.setattr(users, "by_ids", failures[how])

    yield fail
    await unreachable.close()


@pytest.mark.parametrize(
    ("how", "status", "error"),
    [
        ("database", 503, "temporarily_unavailable"),
        ("socket", 503, "temporarily_unavailable"),
        ("bug", 500, "server_error"),
    ],
)
async def test_me_faults_are_answered_in_the_contracts_shape(
    issuer: IssuerHarness,
    user_read_failing_with: Callable[[str], None],
    caplog: pytest.LogCaptureFixture,
    how: str,
    status: int,
    error: str,
) -> None:
    """The user read fails: 503 with Retry-After (the client retries) for the database, 500 for anything else;
    the contract's error body, the security headers, nothing of the exception in the answer."""
    # A server answers the 500 and logs the exception; httpx would raise it after the answer.
    async with issuer.client(raise_app_exceptions=False) as client:
        access = (await me_tokens(client))["access"]
        errors_before = value(await scrape(client), "issuer_database_errors_total")
        user_read_failing_with(how)
        for method in ("GET", "HEAD"):
            response = await client.request(method, ME, headers=bearer(access))
            assert response.status_code == status, (method, response.text)
            assert_security_headers(response, method)
            assert response.headers["cache-control"] == "no-store"
            if status == 503:
                assert response.headers["retry-after"].isdigit()
            if method == "GET":
                assert_error(response, status, error)
                assert set(response.json()) == {"error", "error_description"}
                assert "secret detail" not in response.text
                assert "Error" not in response.json()["error_description"]
        errors_after = value(await scrape(client), "issuer_database_errors_total")
    assert errors_after - errors_before == (2 if status == 503 else 0)
    if status == 503:
        logged = [r.getMessage() for r in caplog.records if r.name == "issuer" and r.levelno == logging.ERROR]
        # The line names the driver's error class (and its message), never just "DatabaseUnavailable".
        cause = {"database": "ConnectionDoesNotExistError", "socket": "ConnectionRefusedError"}[how]
        assert [line.split(": ", 2)[:2] for line in logged] == [
            [f"database error on {method} {ME}", cause] for method in ("GET", "HEAD")
        ], logged


async def test_me_is_timed_under_its_route(client: httpx.AsyncClient) -> None:
    tokens = await me_tokens(client)
    for _ in range(3):
        assert (await client.get(ME, headers=bearer(tokens["access"]))).status_code == 200
    assert (await client.head(ME)).status_code == 401
    assert (await client.post(ME)).status_code == 405
    before = value(await scrape(client), DURATION, route="unmatched", method="GET")
    assert (await client.get(ME + "/")).status_code == 404
    samples = await scrape(client)
    assert value(samples, DURATION, route=ME, method="GET") == 3
    assert value(samples, DURATION, route=ME, method="HEAD") == 1
    assert value(samples, DURATION, route=ME, method="POST") == 1
    assert value(samples, DURATION, route="unmatched", method="GET") == before + 1


# ---------------------------------------------------------------- mounted under a path prefix

PREFIX = "/issuer"


def prefixed_client(harness: IssuerHarness, how: str) -> httpx.AsyncClient:
    """A client of the issuer served under PREFIX: by the server (uvicorn --root-path: the scope's root_path,
    with the prefix in the path) or as a sub-application mounted in another Starlette app."""
    if how == "root_path":
        return harness.client(root_path=PREFIX)
    parent = Starlette(routes=[Mount(PREFIX, app=harness.app)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=parent, client=(CLIENT_IP, 40000)), base_url=ISSUER_URL)


@pytest.mark.parametrize("how", ["root_path", "mount"])
async def test_the_app_works_under_a_path_prefix(issuer: IssuerHarness, how: str) -> None:
    """The same route table answers under a prefix: /auth/me and the documents (GET, HEAD, 304), 405, 404
    without a redirect, the security headers, and the latency label (the route's template, not the path)."""
    credentials = {"email": "alice@example.com", "password": PASSWORD}
    async with prefixed_client(issuer, how) as client:
        user = await client.post(PREFIX + "/auth/register", json=credentials)
        assert user.status_code == 201, user.text
        logged_in = await client.post(PREFIX + "/auth/login", json={**credentials, "token_transport": "body"})
        assert logged_in.status_code == 200, logged_in.text
        access = logged_in.json()["access_token"]

        me = await client.get(PREFIX + ME, headers=bearer(access))
        assert me.status_code == 200, me.text
        assert me.json() == {**user.json()["user"], "tokenVersion": 0}
        head = await client.head(PREFIX + ME, headers=bearer(access))
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == me.headers["content-length"]
        bare = await client.get(PREFIX + ME)
        assert_error(bare, 401, "invalid_token")
        assert bare.headers["www-authenticate"] == "Bearer"
        wrong_method = await client.post(PREFIX + ME, headers=bearer(access))
        assert_error(wrong_method, 405, "method_not_allowed")
        assert allowed_methods(wrong_method) == {"GET", "HEAD"}
        slash = await client.get(PREFIX + ME + "/", headers=bearer(access))
        assert_error(slash, 404, "not_found")
        assert "location" not in slash.headers

        jwks = await client.get(PREFIX + JWKS)
        assert jwks.status_code == 200
        assert jwks.json()["keys"]
        assert jwks.headers["etag"] == current_etag(issuer)
        cached = await client.get(PREFIX + JWKS, headers={"If-None-Match": jwks.headers["etag"]})
        assert (cached.status_code, cached.content) == (304, b"")
        documents = []
        for path in DOCUMENTS:
            document = await client.get(PREFIX + path)
            assert document.status_code == 200, path
            assert (await client.head(PREFIX + path)).headers == document.headers, path
            documents.append(document)
        assert documents[-1].json()["jwks_uri"] == f"{ISSUER_URL}{JWKS}"

        renewed = await client.post(PREFIX + "/auth/refresh", json={"refresh_token": logged_in.json()["refresh_token"]})
        assert renewed.status_code == 200, renewed.text

        for response in (user, logged_in, me, head, bare, wrong_method, slash, jwks, cached, renewed, *documents):
            assert_security_headers(response, response.request.url)
    async with issuer.client() as client:
        samples = await scrape(client)
    assert value(samples, DURATION, route=ME, method="GET") == 2
    assert value(samples, DURATION, route=ME, method="HEAD") == 1
    assert value(samples, DURATION, route=ME, method="POST") == 1
    assert value(samples, DURATION, route=JWKS, method="GET") == 3
    assert value(samples, DURATION, route=JWKS, method="HEAD") == 1


@pytest.mark.parametrize("how", ["root_path", "mount"])
async def test_a_404_under_a_path_prefix_is_timed_as_unmatched(issuer: IssuerHarness, how: str) -> None:
    """The latency label is one of the issuer's own route templates or "unmatched": never a route of the
    application the issuer is mounted in (that one is in the scope too, under the same key)."""
    async with prefixed_client(issuer, how) as client:
        for path in ("/nope", ME + "/"):
            assert_error(await client.get(PREFIX + path), 404, "not_found")
    async with issuer.client() as client:
        samples = await scrape(client)
    routes = label_values(samples, DURATION, "route")
    assert not any(route.startswith(PREFIX) for route in routes), routes
    assert value(samples, DURATION, route="unmatched", method="GET") == 2
