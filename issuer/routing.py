"""A Starlette router that finds the route of a fixed path by one dictionary lookup.

Starlette's router tries every route's regular expression in order until one matches; with fifteen routes
that costs a request to one of the last ones about 5 µs of an 18 µs request (measured in-process on
/healthz), and /auth/me, the sixth, about 2 µs. This router keeps, for each path that some route matches
without parameters, the routes whose pattern matches that exact path, in their order, and applies
Starlette's own rule to just those: the first full match, else the first partial one (a 405). That is
the choice Starlette's scan makes, since every other route's pattern fails on that path. Any other path
(one with parameters, an unknown one, a trailing slash to redirect) takes Starlette's scan unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.routing import BaseRoute, Match, Route, Router, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send


class StaticPathRouter(Router):
    _index: dict[str, tuple[Route, ...]] | None = None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            index = self._index if self._index is not None else self._build_index()
            candidates = index.get(get_route_path(scope))
            if candidates is not None:
                if "router" not in scope:
                    scope["router"] = self
                chosen: tuple[Route, Scope] | None = None
                for route in candidates:
                    match, child_scope = route.matches(scope)
                    if match is Match.FULL:
                        chosen = route, child_scope
                        break
                    if match is Match.PARTIAL and chosen is None:
                        chosen = route, child_scope
                if chosen is not None:
                    route, child_scope = chosen
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)

    def _build_index(self) -> dict[str, tuple[Route, ...]]:
        """Built on the first request, when the route list is final; empty when a route is not a plain
        ``Route`` (a mount or a host route matches by other rules), so that every path takes the scan."""
        routes: list[BaseRoute] = self.routes
        index: dict[str, tuple[Route, ...]] = {}
        if all(type(route) is Route for route in routes):
            plain = [route for route in routes if isinstance(route, Route)]
            for route in plain:
                if not route.param_convertors:
                    index[route.path] = tuple(r for r in plain if r.path_regex.match(route.path))
        self._index = index
        return index


class DirectRoutes:
    """GET and HEAD of a few fixed paths, handed straight to an endpoint ahead of the router.

    For the hottest reads (the JWKS and metadata, /auth/me): under load, a /auth/me call cost the issuer
    69 µs of CPU through the exception layer, the router and the route, and 63 µs handed to its endpoint
    here behind an exception layer of its own (``docs/performance.md``). Each entry names the route it
    stands for: its path is the latency label, and every other method still goes through the router to
    that route (a 405 with Allow). This middleware sits inside the ones that add headers and CORS, so
    those apply as for every route; an endpoint that raises must come with its own exception handling
    (``issuer.http.app`` wraps it in the app's handlers).
    """

    def __init__(self, app: ASGIApp, routes: Mapping[str, tuple[Route, ASGIApp]]) -> None:
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            direct = self.routes.get(scope["path"])
            if direct is not None:
                route, endpoint = direct
                scope["route"] = route  # the latency label, as if the router had matched it
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)
