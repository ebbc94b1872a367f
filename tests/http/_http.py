"""Helpers shared by the HTTP tests of this folder (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import httpx

from tests.support.http import PASSWORD, bearer, login, register
from tests.support.issuer import IssuerHarness

JWKS = "/.well-known/jwks.json"
OAUTH = "/.well-known/oauth-authorization-server"
OIDC = "/.well-known/openid-configuration"
DOCUMENTS = (JWKS, OAUTH, OIDC)

APP_ORIGIN = "https://app.example"
EVIL_ORIGIN = "https://evil.example"

# The latency histogram's count, labelled by route template (or "unmatched") and method.
DURATION = "issuer_request_duration_seconds_count"

# On every response, exactly once.
SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def assert_security_headers(response: httpx.Response, what: object = None) -> None:
    for name, expected in SECURITY.items():
        assert response.headers.get_list(name) == [expected], (what, response.status_code, name, response.headers)


def assert_each_header_once(response: httpx.Response, what: object = None) -> None:
    """No header line twice (a pre-rendered header list that collected a middleware's additions would)."""
    names = [name.lower() for name, _ in response.headers.multi_items()]
    assert len(names) == len(set(names)), (what, names)


def current_etag(harness: IssuerHarness) -> str:
    """The ETag of the key set the issuer publishes now (an oracle next to the HTTP answer)."""
    return harness.services.keys.ring.jwks(harness.clock()).etag


async def me_tokens(client: httpx.AsyncClient) -> dict[str, str]:
    """Access tokens for alice: ``access`` live, ``revoked`` by logout-all; ``deleted``: its account is gone."""
    await register(client)
    revoked = (await login(client))["access_token"]
    assert (await client.post("/auth/logout-all", headers=bearer(revoked))).status_code == 204
    access = (await login(client))["access_token"]
    await register(client, email="gone@example.com")
    deleted = (await login(client, email="gone@example.com"))["access_token"]
    gone = await client.request("DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(deleted))
    assert gone.status_code == 204
    return {"access": access, "revoked": revoked, "deleted": deleted}


def allowed_methods(response: httpx.Response) -> set[str]:
    """The methods of a 405's ``Allow`` header."""
    return {method.strip() for method in response.headers["allow"].split(",")}
