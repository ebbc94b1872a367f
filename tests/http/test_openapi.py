"""The OpenAPI description (issuer/http/openapi.json): valid OpenAPI 3.1, the same paths and methods as the
app's route table, consistent in what every operation documents, and served at GET /openapi.json with
``servers`` set to ISSUER_URL and an ETag.

The route comparison is what keeps the description from drifting: a route added without its description,
or a description left behind by a removed route, fails ``test_every_route_is_described_and_nothing_else``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
from openapi_spec_validator import validate
from starlette.routing import BaseRoute, Mount, Route

from issuer.http import openapi
from issuer.http.app import create_app
from issuer.http.wellknown import metadata_document
from issuer.settings import Settings
from tests.support.http import login, register
from tests.support.issuer import ISSUER_URL, with_settings
from tests.support.keys import Cli

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def described() -> dict[str, Any]:
    return openapi.load_document()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method.upper(), operation


def routed(routes: list[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    """(path template, method) of every route. Starlette answers HEAD on every GET route by itself: the
    description documents the GET (and says so in its info), so an implied HEAD is not listed separately."""
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            methods = route.methods or {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
            for method in methods:
                if method == "HEAD" and "GET" in methods:
                    continue
                found.add((prefix + route.path, method))
        elif isinstance(route, Mount):
            found |= routed(list(route.routes), prefix + route.path)
        else:
            pytest.fail(f"a route of an unknown kind: {route!r}; teach this test how to list it")
    return found


@pytest.fixture
def app_routes(settings: Settings) -> set[tuple[str, str]]:
    """The route table of an app with the optional account page turned on."""
    return routed(create_app(with_settings(settings, account_page=True)).routes)


def test_the_document_is_valid_openapi_3_1() -> None:
    document = described()
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises with the offending pointer


def test_every_route_is_described_and_nothing_else(app_routes: set[tuple[str, str]]) -> None:
    documented = {(path, method) for path, method, _ in operations(described())}
    undocumented = app_routes - documented
    assert not undocumented, f"routes missing from issuer/http/openapi.json: {sorted(undocumented)}"
    unrouted = documented - app_routes
    assert not unrouted, f"described in issuer/http/openapi.json but not routed: {sorted(unrouted)}"


def _resolve(document: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"].removeprefix("#/").split("/")
        node = document
        for part in pointer:
            node = node[part]
    return node


def _error_schema_refs(document: dict[str, Any], schema: Any) -> bool:
    """Whether a response schema is the Error schema, or an allOf narrowing it."""
    if schema == {"$ref": "#/components/schemas/Error"}:
        return True
    return any(_error_schema_refs(document, part) for part in schema.get("allOf", []))


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            yield node["pattern"]
        for value in node.values():
            yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def test_every_pattern_is_an_ecma_262_regex() -> None:
    """JSON Schema patterns are ECMA-262 regexes (with the u flag), stricter than Python's: a pattern only
    Python accepts (a range of lone surrogates did) is skipped by validators and generators alike, so it
    constrains nothing. Regression: the fuzzer's valid passwords carried NUL until this held."""
    patterns = list(_patterns(described()))
    assert patterns
    for pattern in patterns:
        jsonschema_rs.validator_for({"type": "string", "pattern": pattern})  # raises on a pattern it cannot compile
    password = described()["components"]["schemas"]["RegisterRequest"]["properties"]["password"]
    validator = jsonschema_rs.validator_for(password)
    assert validator.is_valid("correct horse")
    assert not validator.is_valid("correct\x00horse")


def _arrays(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "array":
            yield node
        for value in node.values():
            yield from _arrays(value)
    elif isinstance(node, list):
        for value in node:
            yield from _arrays(value)


def test_every_array_says_what_it_holds() -> None:
    """Client generators (openapi-python-client) drop a schema whose array has no ``items``, and with it the
    operation. Regression: POST /events/poll was missing from the generated client."""
    for array in _arrays(described()):
        assert "items" in array or "prefixItems" in array, array


def test_every_error_answer_has_the_error_shape() -> None:
    document = described()
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")) or (status == "503" and path == "/readyz"):
                continue
            content = _resolve(document, response).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            assert schema is not None, (method, path, status)
            assert _error_schema_refs(document, schema), (method, path, status)


def test_what_each_kind_of_operation_must_document() -> None:
    """Credentials imply their 401 and its challenge; a body implies 400 and 413; a Retry-After wherever a
    429 or 503 can come."""
    document = described()
    for path, method, operation in operations(document):
        responses = {status: _resolve(document, r) for status, r in operation["responses"].items()}
        schemes = {name for requirement in operation.get("security", []) for name in requirement}
        challenge = {"bearerAuth": "Bearer", "clientBasic": "Basic"}
        for scheme in schemes & challenge.keys():
            header = _resolve(document, responses["401"]["headers"]["WWW-Authenticate"])
            assert header["schema"]["pattern"] == f"^{challenge[scheme]}", (method, path)
        if "requestBody" in operation:
            assert {"400", "413"} <= responses.keys(), (method, path)
        for status in {"429", "503"} & responses.keys():
            assert "Retry-After" in responses[status]["headers"], (method, path, status)
        assert any(status.startswith("2") for status in responses), (method, path)


def test_every_endpoint_the_metadata_names_is_described(settings: Settings) -> None:
    metadata = json.loads(metadata_document(settings))
    paths = set(described()["paths"])
    for name, url in metadata.items():
        if name.endswith(("_endpoint", "_uri")):
            assert url.startswith(ISSUER_URL), (name, url)
            assert url.removeprefix(ISSUER_URL) in paths, name


async def test_served_with_the_issuer_url_and_an_etag(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == openapi.CACHE_CONTROL
    served = response.json()
    assert served["servers"] == [{"url": ISSUER_URL}]
    assert {**served, "servers": None} == {**described(), "servers": None}
    validate(served)

    etag = response.headers["etag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert len(etag) > 10
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await client.get("/openapi.json", headers={"If-None-Match": header})
        assert again.status_code == 304, header
        assert again.content == b""
        assert again.headers["etag"] == etag
    stale = await client.get("/openapi.json", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200
    assert stale.content == response.content

    head = await client.head("/openapi.json")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


def test_another_issuer_url_gets_its_own_servers_and_etag() -> None:
    first, first_tag = openapi.rendered("https://a.example")
    second, second_tag = openapi.rendered("https://b.example/issuer")
    assert json.loads(second)["servers"] == [{"url": "https://b.example/issuer"}]
    assert first_tag != second_tag
    assert first != second


def _validator(document: dict[str, Any], name: str) -> Any:
    """A validator of one component schema, its references resolved within the document."""
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": document["components"]})


async def test_live_answers_of_the_client_endpoints_match_their_schemas(client: httpx.AsyncClient, cli: Cli) -> None:
    """The fuzzer only ever holds random tokens and cursors; these are the answers it cannot reach: active
    introspections of both kinds, and a poll that carries SETs."""
    document = described()
    added = await cli("clients", "add", "schema-check", "--scope", "introspect,events,revoke")
    created = json.loads(added.out)
    auth = httpx.BasicAuth(created["client_id"], created["client_secret"])
    await register(client)
    tokens = await login(client)
    introspection = _validator(document, "Introspection")
    for token in (tokens["access_token"], tokens["refresh_token"]):
        answer = await client.post("/oauth2/introspect", data={"token": token}, auth=auth)
        assert answer.status_code == 200
        assert answer.json()["active"] is True
        introspection.validate(answer.json())
    revoked = await client.post("/oauth2/revoke", data={"token": tokens["refresh_token"]}, auth=auth)
    assert revoked.status_code == 200
    inactive = await client.post("/oauth2/introspect", data={"token": tokens["access_token"]}, auth=auth)
    assert inactive.json() == {"active": False}
    polled = await client.post("/events/poll", json={"returnImmediately": True}, auth=auth)
    assert polled.status_code == 200
    assert polled.json()["sets"], "the revocation's event"
    _validator(document, "PollResponse").validate(polled.json())
