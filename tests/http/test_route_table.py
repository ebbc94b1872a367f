"""The route table as a client meets it: the metadata names only endpoints that exist, the documents and
probes answer, and an unknown path or a wrong method gets the contract's error shape (405 with Allow)."""

from __future__ import annotations

import re

import httpx

from issuer.settings import Settings
from tests.support.http import assert_error, login, register
from tests.support.issuer import ISSUER_URL, IssuerHarness
from tests.support.jwt import token_kid


async def test_jwks(client: httpx.AsyncClient, settings: Settings) -> None:
    await register(client)
    tokens = await login(client)
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    etag = response.headers["etag"]
    assert re.fullmatch(r'(W/)?"[^"]+"', etag), etag
    keys = response.json()["keys"]
    assert keys
    for key in keys:
        assert set(key) == {"kty", "kid", "use", "alg", "n", "e"}, key
        assert key["kty"] == "RSA"
        assert key["use"] == "sig"
        assert key["alg"] == "RS256"
    assert token_kid(tokens["access_token"]) in {key["kid"] for key in keys}

    cached = await client.get("/.well-known/jwks.json", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    assert cached.headers["etag"] == etag
    assert cached.headers["cache-control"] == f"public, max-age={settings.jwks_max_age}"
    listed = await client.get("/.well-known/jwks.json", headers={"If-None-Match": f'"other", {etag}'})
    assert listed.status_code == 304
    stale = await client.get("/.well-known/jwks.json", headers={"If-None-Match": '"not-the-etag"'})
    assert stale.status_code == 200
    assert stale.json() == response.json()


async def test_metadata_documents(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    route_paths = {getattr(route, "path", None) for route in issuer.starlette.routes}
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        document = response.json()
        assert document["issuer"] == ISSUER_URL
        assert document["jwks_uri"] == f"{ISSUER_URL}/.well-known/jwks.json"
        assert document["access_token_signing_alg_values_supported"] == ["RS256"]
        for name in ("login_endpoint", "refresh_endpoint", "logout_endpoint"):
            assert name in document
        for name, value in document.items():
            if name.endswith("_endpoint"):
                assert value.startswith(ISSUER_URL + "/"), (name, value)
                assert value.removeprefix(ISSUER_URL) in route_paths, (name, value)
    assert (await client.get(f"{ISSUER_URL}/.well-known/jwks.json")).status_code == 200


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200


async def test_unknown_route_and_wrong_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    missing = await client.get("/no/such/route")
    assert_error(missing, 404, "not_found")
    assert set(missing.json()) == {"error", "error_description"}
    assert missing.headers["content-type"].startswith("application/json")
    for method, path in (("GET", "/auth/login"), ("PUT", "/auth/refresh"), ("POST", "/auth/me")):
        wrong = await client.request(method, path)
        assert wrong.status_code == 405, (method, path, wrong.text)
        body = wrong.json()
        assert set(body) == {"error", "error_description"}
        assert isinstance(body["error"], str)
        assert body["error"]
        assert wrong.headers["content-type"].startswith("application/json")
        allowed = {m.strip() for m in wrong.headers["allow"].split(",")}
        assert method not in allowed
        assert allowed & {"GET", "POST"}
