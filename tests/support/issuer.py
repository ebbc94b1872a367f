"""An issuer app with its lifespan running, served in-process as uvicorn would serve it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from issuer.http.app import create_app
from issuer.services import Services
from issuer.settings import Settings
from issuer.storage.database import sqlalchemy_url
from tests.support.clock import FakeClock

ISSUER_URL = "https://issuer.test"
CLIENT_IP = "203.0.113.7"


class IssuerHarness:
    """A running issuer: ``app`` is what a server would call (each request gets the lifespan's state, as
    uvicorn hands it), ``starlette`` the application object, ``engine`` a separate SQLAlchemy engine on the
    same database for the tests' own checks of the tables."""

    def __init__(self, starlette: Starlette, state: Mapping[str, Any], clock: FakeClock) -> None:
        self.starlette = starlette
        self.state = state
        self.clock = clock
        self._engine: AsyncEngine | None = None

    @property
    def services(self) -> Services:
        services: Services = self.state["services"]
        return services

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "state": dict(self.state)}
        await self.starlette(scope, receive, send)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            url = sqlalchemy_url(self.services.settings.database_url)
            self._engine = create_async_engine(url, pool_size=2)
        return self._engine

    def client(self, ip: str = CLIENT_IP, **transport: Any) -> httpx.AsyncClient:
        asgi = httpx.ASGITransport(app=self.app, client=(ip, 40000), **transport)
        return httpx.AsyncClient(transport=asgi, base_url=ISSUER_URL)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()


@contextlib.asynccontextmanager
async def running_issuer(settings: Settings, clock: FakeClock, **options: Any) -> AsyncIterator[IssuerHarness]:
    """``create_app(settings, clock=clock, **options)`` with its lifespan (pool, keys, background tasks)
    running for the block."""
    starlette = create_app(settings, clock=clock, **options)
    async with starlette.router.lifespan_context(starlette) as state:
        harness = IssuerHarness(starlette, state, clock)
        try:
            yield harness
        finally:
            await harness.close()


def with_settings(settings: Settings, **changes: object) -> Settings:
    changed = replace(settings, **changes)  # type: ignore[arg-type]
    changed.validate()
    return changed


# A LISTEN URL nothing answers: a replica that hears no notification and learns changes only by re-reading,
# the worst case the periodic reload still covers.
UNREACHABLE_LISTEN_URL = "postgresql://postgres@127.0.0.1:1/nothing"


def without_listen(settings: Settings) -> Settings:
    return with_settings(settings, database_listen_url=UNREACHABLE_LISTEN_URL)
