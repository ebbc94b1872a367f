"""The indexed router picks exactly the route Starlette's own scan picks, for every kind of path.

Each request goes to two routers built from the same routes: Starlette's ``Router`` and
``StaticPathRouter``. Both must call the same endpoint with the same path parameters and leave the same
``route`` in the scope (the latency label), or give the same answer when no route matches.
"""

from __future__ import annotations

from typing import Any

import pytest
from issuer.routing import StaticPathRouter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Message, Scope

from issuer.http.app import create_app
from issuer.settings import Settings


def _endpoint(name: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(f"{name} {sorted(request.path_params.items())}")

    endpoint.__name__ = name
    return endpoint


def _routes() -> list[BaseRoute]:
    return [
        Route("/auth/login", _endpoint("login"), methods=["POST"]),
        # A parameter route ahead of a fixed path it also matches: Starlette takes the first full match.
        Route("/items/{item}", _endpoint("item"), methods=["GET"]),
        Route("/items/new", _endpoint("new_item"), methods=["GET", "POST"]),
        # Two routes on one path, split by method: GET must find the second one, PUT gets the 405.
        Route("/things", _endpoint("create_thing"), methods=["POST"]),
        Route("/things", _endpoint("list_things"), methods=["GET"]),
        Route("/healthz", _endpoint("healthz"), methods=["GET"]),
        Route("/any", _endpoint("any_method")),
    ]


REQUESTS = [
    ("POST", "/auth/login"),
    ("GET", "/auth/login"),  # 405
    ("GET", "/items/new"),  # the parameter route, which comes first
    ("POST", "/items/new"),  # the parameter route is a partial match; the fixed one is full
    ("PUT", "/items/new"),  # both partial: the first one's 405
    ("GET", "/items/42"),
    ("GET", "/things"),
    ("POST", "/things"),
    ("PUT", "/things"),
    ("DELETE", "/any"),
    ("GET", "/healthz"),
    ("HEAD", "/healthz"),
    ("GET", "/healthz/"),  # redirect to the slash-less path
    ("GET", "/nowhere"),  # 404
    ("GET", "/"),
]


async def _call(router: Router, method: str, path: str, root_path: str = "") -> tuple[Any, ...]:
    scope: Scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "server": ("testserver", 80),
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
    }
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    try:
        await router(scope, receive, send)
    except HTTPException as exc:  # only without an app in the scope would Starlette answer these itself
        return ("raised", exc.status_code, exc.headers)
    start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
    route = scope.get("route")
    return (start["status"], dict(start["headers"]).get(b"allow"), body, None if route is None else id(route))


@pytest.mark.parametrize(("method", "path"), REQUESTS)
@pytest.mark.parametrize("root_path", ["", "/prefix"])
async def test_indexed_router_picks_what_starlette_picks(method: str, path: str, root_path: str) -> None:
    routes = _routes()
    plain = Router(routes)
    indexed = StaticPathRouter(routes)
    assert await _call(indexed, method, path, root_path) == await _call(plain, method, path, root_path)


async def test_the_index_holds_every_route_that_matches_a_fixed_path_in_order() -> None:
    router = StaticPathRouter(_routes())
    await _call(router, "GET", "/healthz")
    index = router._index
    assert index is not None
    assert [r.name for r in index["/items/new"]] == ["item", "new_item"]
    assert [r.name for r in index["/things"]] == ["create_thing", "list_things"]
    assert "/items/{item}" not in index


async def test_a_mount_turns_the_index_off() -> None:
    routes = [*_routes(), Mount("/sub", routes=[Route("/x", _endpoint("x"))])]
    router = StaticPathRouter(routes)
    assert await _call(router, "GET", "/things") == await _call(Router(routes), "GET", "/things")
    assert router._index == {}


def test_the_issuer_uses_the_indexed_router(settings: Settings) -> None:
    app = create_app(settings)
    assert isinstance(app.router, StaticPathRouter)
    assert {getattr(r, "path", None) for r in app.routes} >= {"/auth/me", "/auth/login", "/healthz"}


async def test_fixed_paths_never_reach_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    router = StaticPathRouter(_routes())
    scanned: list[str] = []
    scan = Router.app

    async def counting_scan(self: Router, scope: Scope, receive: Any, send: Any) -> None:
        scanned.append(scope["path"])
        await scan(self, scope, receive, send)

    monkeypatch.setattr(Router, "app", counting_scan)
    for _ in range(2):  # the first request builds the index, the second uses the stored one
        for method, path in [("GET", "/healthz"), ("PUT", "/things"), ("GET", "/items/new")]:
            await _call(router, method, path)
    await _call(router, "GET", "/items/42")
    assert scanned == ["/items/42"]
