"""``GET /openapi.json``: the OpenAPI 3.1 description of the HTTP API.

The description is ``openapi.json`` beside this module, shipped in the wheel as package data. It is the one
copy: this route serves it with ``servers`` set to ISSUER_URL, and tests/http/test_openapi.py compares its
paths and methods with the app's route table, so a route cannot be added or removed without the description
following (and it is fuzzed against the live issuer by tests/http/test_fuzz.py).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from issuer.http.caching import etag_matches, if_none_match, respond, strong_etag
from issuer.services import Services

PATH = "/openapi.json"
DOCUMENT_FILE = "openapi.json"
# Revalidated with If-None-Match after that: the document only changes with a release or a new ISSUER_URL.
CACHE_CONTROL = "public, max-age=3600"


def load_document() -> dict[str, Any]:
    """The description as kept in the package (``servers`` still the development default)."""
    text = resources.files("issuer.http").joinpath(DOCUMENT_FILE).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@functools.lru_cache(maxsize=4)
def rendered(issuer_url: str) -> tuple[bytes, str]:
    """The served body for one ISSUER_URL, and its strong ETag (a digest of the body), built once."""
    document = load_document()
    document["servers"] = [{"url": issuer_url}]
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return body, strong_etag(body)


class OpenAPIDocument:
    """The route's ASGI endpoint (GET and HEAD), with an ETag and a 304 on a matching If-None-Match."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services = scope["state"]["services"]
        body, etag = rendered(services.settings.issuer_url)
        cached = ((b"cache-control", CACHE_CONTROL.encode()), (b"etag", etag.encode()))
        if etag_matches(if_none_match(scope), etag):
            await respond(send, scope, 304, b"", cached)
            return
        headers = ((b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"), *cached)
        await respond(send, scope, 200, body, headers)


routes = [Route(PATH, OpenAPIDocument(), methods=["GET"])]
