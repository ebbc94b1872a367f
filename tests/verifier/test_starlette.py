"""The Starlette integration: the authentication backend, the RFC 6750 answers, the route guards, the lifespan.

No issuer: tokens are signed with a local key and the JWKS comes from a fake (tests/support/verifier.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthenticationError, requires
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from issuer.verifier import AccessToken, AccessTokenVerifier, ExpiredToken, MalformedToken, TokenError
from issuer.verifier.starlette import (
    BearerAuthError,
    TokenUser,
    bearer_middleware,
    on_auth_error,
    quoted_string_safe,
    requires_role,
    requires_token,
)
from tests.support.clock import FakeClock
from tests.support.http import bearer
from tests.support.verifier import FakeIssuer, mint, verifier_for
from tests.verifier._forgeries import IN_A_HEADER, Attack, Forge

# RFC 6750 section 3: auth-param values are quoted strings of %x20-21 / %x23-5B / %x5D-7E.
CHALLENGE = re.compile(r'Bearer error="([a-z_]+)", error_description="([\x20\x21\x23-\x5b\x5d-\x7e]*)"')


async def open_page(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "authenticated": request.user.is_authenticated,
            "identity": request.user.identity,
            "display_name": request.user.display_name,
            "scopes": request.auth.scopes,
        }
    )


@requires_token
async def whoami(request: Request) -> JSONResponse:
    user = request.user
    assert isinstance(user, TokenUser)
    assert isinstance(user.token, AccessToken)
    return JSONResponse({"sub": user.identity, "email": user.display_name, "role": user.role, "sid": user.token.sid})


@requires_role("admin")
async def admin(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


@requires_role("admin", "auditor")
async def audit(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


@requires_token
def sync_page(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.user.identity)


class Things(HTTPEndpoint):
    @requires_role("admin")
    async def get(self, request: Request) -> JSONResponse:
        return JSONResponse({"things": []})


@requires("role:admin", status_code=403)
async def starlette_style(request: Request) -> JSONResponse:
    """Starlette's own decorator works with the scopes the backend grants."""
    return JSONResponse({"ok": True})


@requires_token
async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(websocket.user.identity)
    await websocket.close()


def build_app(verifier: AccessTokenVerifier, **options: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/open", open_page),
            Route("/whoami", whoami),
            Route("/admin", admin),
            Route("/audit", audit),
            Route("/sync", sync_page),
            Route("/things", Things),
            Route("/starlette", starlette_style),
            WebSocketRoute("/ws", websocket_echo),
        ],
        middleware=[bearer_middleware(verifier)],
        **options,
    )


@pytest.fixture
async def resource(verifier: AccessTokenVerifier) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``build_app`` (named apart from the suite's ``client``, which runs an issuer on a database)."""
    transport = httpx.ASGITransport(app=build_app(verifier))
    async with httpx.AsyncClient(transport=transport, base_url="http://resource.test") as http:
        yield http


def assert_bare_challenge(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "invalid_token"
    assert response.json()["error_description"]


def assert_challenge(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    match = CHALLENGE.fullmatch(response.headers["www-authenticate"])
    assert match, response.headers["www-authenticate"]
    assert match.group(1) == error
    body = response.json()
    assert body["error"] == error
    assert body["error_description"] == match.group(2)
    assert response.headers["cache-control"] == "no-store"
    return match.group(2)


# ---------------------------------------------------------------- who is the caller


async def test_a_valid_token_sets_request_user_and_auth(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    response = await resource.get("/open", headers=bearer(mint(clock)))
    assert response.json() == {
        "authenticated": True,
        "identity": "user-1",
        "display_name": "alice@example.com",
        "scopes": ["authenticated", "role:user"],
    }
    response = await resource.get("/whoami", headers=bearer(mint(clock)))
    assert response.status_code == 200
    assert response.json() == {"sub": "user-1", "email": "alice@example.com", "role": "user", "sid": "family-1"}


async def test_scope_claims_become_credentials(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    response = await resource.get("/open", headers=bearer(mint(clock, scope="read write")))
    assert response.json()["scopes"] == ["authenticated", "role:user", "scope:read", "scope:write"]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, id="basic"),
        pytest.param({"Authorization": "Digest username=alice"}, id="digest"),
        pytest.param({"Authorization": "Bearertoken"}, id="no-space"),
    ],
)
async def test_no_bearer_credentials_is_anonymous(resource: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await resource.get("/open", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"authenticated": False, "identity": "", "display_name": "", "scopes": []}
    for path in ("/whoami", "/admin", "/sync", "/things"):
        assert_bare_challenge(await resource.get(path, headers=headers))


async def test_the_scheme_is_case_insensitive(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    for scheme in ("bearer", "BEARER", "BeArEr"):
        response = await resource.get("/whoami", headers={"Authorization": f"{scheme} {mint(clock)}"})
        assert response.status_code == 200, scheme


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer    "])
async def test_an_empty_bearer_token_is_invalid_not_anonymous(resource: httpx.AsyncClient, value: str) -> None:
    description = assert_challenge(await resource.get("/open", headers={"Authorization": value}), 401, "invalid_token")
    assert "Bearer <access token>" in description


async def test_a_bad_token_is_refused_even_on_an_open_route(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    expired = mint(clock, ttl=60)
    clock.advance(65)
    description = assert_challenge(await resource.get("/open", headers=bearer(expired)), 401, "invalid_token")
    assert description == ExpiredToken.message
    # Control: a fresh token at the same moment passes.
    assert (await resource.get("/open", headers=bearer(mint(clock)))).status_code == 200


# ---------------------------------------------------------------- every forged token is a 401


@pytest.mark.parametrize(("attack", "expected"), IN_A_HEADER)
async def test_attack_is_a_401_at_the_resource_service(
    forge: Forge, verifier: AccessTokenVerifier, resource: httpx.AsyncClient, attack: Attack, expected: type[TokenError]
) -> None:
    token = attack(forge)
    response = await resource.get("/whoami", headers={b"Authorization": f"Bearer {token}".encode()})
    assert response.status_code == 401, response.text
    with pytest.raises(expected) as refused:
        await verifier.verify(token)
    assert response.json() == {"error": "invalid_token", "error_description": refused.value.detail}
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    assert token not in challenge


# ---------------------------------------------------------------- roles


async def test_requires_role(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    user, boss, auditor = mint(clock), mint(clock, role="admin"), mint(clock, role="auditor")
    description = assert_challenge(await resource.get("/admin", headers=bearer(user)), 403, "insufficient_scope")
    assert description == "This endpoint needs the role 'admin'."
    assert (await resource.get("/admin", headers=bearer(boss))).status_code == 200
    assert (await resource.get("/things", headers=bearer(boss))).status_code == 200
    assert_challenge(await resource.get("/things", headers=bearer(user)), 403, "insufficient_scope")
    assert (await resource.get("/audit", headers=bearer(auditor))).status_code == 200
    assert (await resource.get("/audit", headers=bearer(boss))).status_code == 200
    assert_challenge(await resource.get("/audit", headers=bearer(user)), 403, "insufficient_scope")
    assert_challenge(await resource.get("/admin", headers=bearer(mint(clock, role=None))), 403, "insufficient_scope")
    # A role that merely contains the name is not the role.
    admins = mint(clock, role="admins")
    assert_challenge(await resource.get("/admin", headers=bearer(admins)), 403, "insufficient_scope")


async def test_starlettes_own_requires_sees_the_same_scopes(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    assert (await resource.get("/starlette", headers=bearer(mint(clock, role="admin")))).status_code == 200
    assert (await resource.get("/starlette", headers=bearer(mint(clock)))).status_code == 403


async def test_sync_endpoints_are_guarded_too(resource: httpx.AsyncClient, clock: FakeClock) -> None:
    response = await resource.get("/sync", headers=bearer(mint(clock)))
    assert response.status_code == 200
    assert response.text == "user-1"


def test_guards_need_a_request_parameter() -> None:
    async def endpoint(req: Request) -> None: ...

    with pytest.raises(TypeError, match="request"):
        requires_token(endpoint)
    with pytest.raises(ValueError, match="role"):
        requires_role()


async def websocket_session(app: Starlette, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Drive one websocket connection through the ASGI app; return what the app sent."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": ("resource.test", 80),
        "client": ("203.0.113.9", 50000),
        "root_path": "",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "subprotocols": [],
    }
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


async def test_websocket_guard(verifier: AccessTokenVerifier, clock: FakeClock) -> None:
    """A token opens the websocket; an anonymous one is closed with 1008 (policy violation) before accept."""
    app = build_app(verifier)
    sent = await websocket_session(app, bearer(mint(clock)))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "user-1"
    sent = await websocket_session(app, {})
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1008)]


# ---------------------------------------------------------------- keys unavailable: 503, not 401


async def test_keys_unavailable_is_a_503_with_retry_after(
    fake: FakeIssuer, resource: httpx.AsyncClient, clock: FakeClock
) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=request)

    fake.failure = down
    response = await resource.get("/whoami", headers=bearer(mint(clock)))
    assert response.status_code == 503
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "No signing keys could be fetched from the issuer.",
    }
    assert "www-authenticate" not in response.headers  # not a statement about the token
    assert response.headers["retry-after"] == "10"  # the cache's back-off
    clock.advance(4)
    assert (await resource.get("/whoami", headers=bearer(mint(clock)))).headers["retry-after"] == "6"
    fake.failure = None
    clock.advance(6)
    assert (await resource.get("/whoami", headers=bearer(mint(clock)))).status_code == 200


# ---------------------------------------------------------------- the challenge is always well-formed


@pytest.mark.parametrize(
    "description",
    ['says "hi"', "back\\slash", "caf\u00e9 \u2603", "line\r\nX-Injected: 1", "\x00\x7f", ""],
)
def test_error_description_is_always_a_valid_quoted_string(description: str) -> None:
    response = on_auth_error(None, BearerAuthError(MalformedToken(description)))  # type: ignore[arg-type]
    header = response.headers["www-authenticate"]
    assert CHALLENGE.fullmatch(header), header
    assert "\r" not in header
    assert "\n" not in header
    assert quoted_string_safe('a "b" \\ c') == "a 'b' ? c"


def test_a_foreign_authentication_error_is_not_echoed() -> None:
    response = on_auth_error(None, AuthenticationError("internal detail: db password"))  # type: ignore[arg-type]
    assert response.status_code == 401
    assert b"internal detail" not in bytes(response.body)
    assert "internal detail" not in response.headers["www-authenticate"]


# ---------------------------------------------------------------- lifespan


async def test_lifespan_warms_the_cache_and_closes_it(fake: FakeIssuer, clock: FakeClock) -> None:
    async with fake.client() as http:
        verifier = verifier_for(http, clock)
        app = build_app(verifier, lifespan=verifier.lifespan)
        async with app.router.lifespan_context(app):
            assert len(fake.jwks_requests) == 1  # before any request
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r.test") as resource:
                assert (await resource.get("/whoami", headers=bearer(mint(clock)))).status_code == 200
            assert len(fake.jwks_requests) == 1
        assert not await verifier.jwks.refresh()  # closed
        assert len(fake.jwks_requests) == 1


async def test_an_issuer_down_at_start_up_is_logged_not_fatal(
    fake: FakeIssuer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake.failure = lambda request: httpx.Response(503)
    async with fake.client() as http:
        verifier = verifier_for(http, clock)
        app = build_app(verifier, lifespan=verifier.lifespan)
        with caplog.at_level(logging.WARNING, logger="issuer.verifier"):
            async with app.router.lifespan_context(app):
                fake.failure = None
                clock.advance(10)
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as resource:
                    assert (await resource.get("/whoami", headers=bearer(mint(clock)))).status_code == 200
        assert any("start-up" in r.getMessage() for r in caplog.records)
