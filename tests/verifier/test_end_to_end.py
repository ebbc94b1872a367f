"""The issuer and a resource service together: the resource service trusts the issuer's tokens with no call
to the issuer per request, through logout-all, key rotation under traffic, and real HTTP.

The resource service is ``examples/resource_service.py``, the program the README shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

from issuer.http.app import create_app
from issuer.settings import Settings
from issuer.verifier import AccessTokenVerifier, JWKSCache, VerificationError
from tests.support.clock import FakeClock
from tests.support.http import bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import jwt_claims, token_kid
from tests.support.verifier import CountingTransport

ROOT = Path(__file__).resolve().parents[2]
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
EXAMPLE = "examples.resource_service"


@pytest.fixture
def load_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], ModuleType]]:
    """Import the example afresh with ISSUER_URL / ISSUER_AUDIENCE set, as `uvicorn examples.resource_service:app`
    would."""

    def load(issuer_url: str, audience: str) -> ModuleType:
        monkeypatch.setenv("ISSUER_URL", issuer_url)
        monkeypatch.setenv("ISSUER_AUDIENCE", audience)
        sys.modules.pop(EXAMPLE, None)
        return importlib.import_module(EXAMPLE)

    yield load
    sys.modules.pop(EXAMPLE, None)


@contextlib.asynccontextmanager
async def verifier_on(
    issuer: IssuerHarness, clock: FakeClock, **cache_options: Any
) -> AsyncIterator[tuple[AccessTokenVerifier, CountingTransport]]:
    """A verifier that reaches the issuer app in-process, on the issuer's fake clock; its traffic is counted."""
    counting = CountingTransport(httpx.ASGITransport(app=issuer.app))
    settings = issuer.services.settings
    async with httpx.AsyncClient(transport=counting) as http:
        jwks = JWKSCache(issuer=settings.issuer_url, http_client=http, monotonic=clock.monotonic, **cache_options)
        yield (
            AccessTokenVerifier(
                issuer=settings.issuer_url,
                audience=settings.audience,
                jwks=jwks,
                leeway=settings.clock_leeway,
                clock=clock.wall,
            ),
            counting,
        )


# ---------------------------------------------------------------- logout-all: a bounded delay, zero calls


async def test_logout_all_reaches_resource_services_when_the_token_expires_without_a_call(
    settings: Settings, clock: FakeClock, load_example: Callable[[str, str], ModuleType]
) -> None:
    settings = with_settings(settings, access_token_ttl=120)
    example = load_example(settings.issuer_url, settings.audience)
    async with (
        running_issuer(settings, clock) as issuer,
        issuer.client() as idp,
        verifier_on(issuer, clock) as (v, counting),
    ):
        resource_app = example.create_app(v)
        async with resource_app.router.lifespan_context(resource_app):
            assert counting.paths == [METADATA_PATH, JWKS_PATH]  # warmed at start-up, before any request
            transport = httpx.ASGITransport(app=resource_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://resource.test") as resource:
                user = await register(idp)
                token = (await login(idp))["access_token"]
                exp = jwt_claims(token)["exp"]
                response = await resource.get("/whoami", headers=bearer(token))
                assert response.status_code == 200, response.text
                assert response.json() == {"sub": user["id"], "role": "user"}

                assert (await idp.post("/auth/logout-all", headers=bearer(token))).status_code == 204
                # The issuer's own endpoints refuse the token at once...
                assert (await idp.get("/auth/me", headers=bearer(token))).status_code == 401
                # ...a resource service keeps accepting it until exp + leeway (documented: at most
                # ACCESS_TOKEN_TTL + leeway), and never asks the issuer about it.
                leeway = settings.clock_leeway
                for moment in (0, 60, 120, 120 + leeway - 1):
                    clock.advance(exp - 120 + moment - clock.wall())  # wall and monotonic time move together
                    response = await resource.get("/whoami", headers=bearer(token))
                    assert response.status_code == 200, (moment, response.text)

                clock.advance(exp + leeway - clock.wall())
                response = await resource.get("/whoami", headers=bearer(token))
                assert response.status_code == 401
                assert response.json()["error_description"] == "The access token has expired."
                assert 'error="invalid_token"' in response.headers["www-authenticate"]

            # Zero calls for the token: the only requests the resource service ever made were the warm-up.
            assert counting.paths == [METADATA_PATH, JWKS_PATH]


# ---------------------------------------------------------------- rotation under traffic


async def test_key_rotation_during_traffic_rejects_no_valid_token(issuer: IssuerHarness, clock: FakeClock) -> None:
    settings = issuer.services.settings
    step, total, rotations = 20, 3400, {100, 1300, 2500}
    async with (
        issuer.client() as idp,
        verifier_on(issuer, clock) as (honest, honest_traffic),
        # Control: a cache that ignores max-age and never refetches for an unknown kid. It must be caught out,
        # or this test could not tell a correct cache from one that merely got lucky.
        verifier_on(issuer, clock, min_ttl=86400, default_ttl=86400, unknown_kid_cooldown=86400) as (stubborn, _),
    ):
        jwks_response = await idp.get(JWKS_PATH)
        cache_control = re.fullmatch(r"public, max-age=(\d+)", jwks_response.headers["cache-control"])
        assert cache_control is not None
        max_age = int(cache_control.group(1))
        await register(idp)
        refresh_token = (await login(idp))["refresh_token"]

        live: list[str] = []
        kids: set[str] = set()
        refused: dict[str, list[tuple[int, str]]] = {"honest": [], "stubborn": []}
        for elapsed in range(0, total + 1, step):
            if elapsed in rotations:
                await issuer.services.keys.rotate()  # what `issuer keys rotate` does
            response = await refresh_body(idp, refresh_token)
            assert response.status_code == 200, response.text
            refresh_token = response.json()["refresh_token"]
            live.append(response.json()["access_token"])
            now = clock.wall()
            live = [t for t in live if now < jwt_claims(t)["exp"] + settings.clock_leeway]  # the valid ones
            for token in live:
                kids.add(token_kid(token))
                for name, verifier in (("honest", honest), ("stubborn", stubborn)):
                    try:
                        await verifier.verify(token)
                    except VerificationError as exc:
                        refused[name].append((elapsed, exc.reason))
            clock.advance(step)

    assert len(kids) == 4, "the rotations did not put new keys into service"
    assert refused["honest"] == []
    stats = honest.jwks.stats
    assert stats.unknown_kid_refetches == 0  # every new kid was known from max-age alone
    assert stats.failures == 0
    fetches = honest_traffic.count(JWKS_PATH)
    assert fetches == stats.jwks_fetches
    assert fetches <= total / max_age + 1, fetches
    assert fetches >= total / (max_age + step), "the cache never revalidated"
    assert refused["stubborn"], "the control cache was never caught out"
    assert {reason for _, reason in refused["stubborn"]} == {"unknown_kid"}


# ---------------------------------------------------------------- the example over real HTTP


@contextlib.asynccontextmanager
async def serve_issuer(settings: Settings, clock: FakeClock) -> AsyncIterator[str]:
    """The issuer under a real uvicorn on 127.0.0.1 (a free port), in this event loop; yields its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(with_settings(settings, issuer_url=url), clock=clock)
    config = uvicorn.Config(app, lifespan="on", ws="none", log_config=None, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started or serving.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield url
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def test_the_example_verifies_tokens_of_a_live_issuer_over_http(
    settings: Settings, clock: FakeClock, load_example: Callable[[str, str], ModuleType]
) -> None:
    async with serve_issuer(settings, clock) as url:
        example = load_example(url, settings.audience)
        app = example.app
        async with app.router.lifespan_context(app):
            stats = example.verifier.jwks.stats
            assert (stats.metadata_fetches, stats.jwks_fetches, stats.failures) == (1, 1, 0), stats
            assert example.verifier.jwks.jwks_uri == f"{url}{JWKS_PATH}"

            async with httpx.AsyncClient(base_url=url) as idp:
                user = await register(idp)
                token = (await login(idp))["access_token"]
                assert (await idp.get("/auth/me", headers=bearer(token))).status_code == 200

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://resource.test") as resource:
                response = await resource.get("/whoami", headers=bearer(token))
                assert response.status_code == 200, response.text
                assert response.json() == {"sub": user["id"], "role": "user"}
                response = await resource.get("/admin/report", headers=bearer(token))
                assert response.status_code == 403
                assert response.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
                response = await resource.get("/whoami")
                assert response.status_code == 401
                assert response.headers["www-authenticate"] == "Bearer"
                response = await resource.get("/whoami", headers=bearer(token[:-4] + "AAAA"))
                assert response.status_code == 401
            assert stats.jwks_fetches == 1  # still only the warm-up


def test_the_readme_shows_the_example_verbatim() -> None:
    example = (ROOT / "examples" / "resource_service.py").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{example}```" in readme
