"""Validators for the documents served from memory (JWKS, metadata, the OpenAPI description, the browser
client and the account page): a strong ETag from the content, and If-None-Match matched as RFC 9110 says."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from starlette.types import Scope, Send

Headers = Sequence[tuple[bytes, bytes]]


def strong_etag(body: bytes) -> str:
    """A quoted strong ETag: 144 bits of the body's SHA-256, base64url."""
    return '"' + base64.urlsafe_b64encode(hashlib.sha256(body).digest()[:18]).decode("ascii") + '"'


def if_none_match(scope: Scope) -> str | None:
    """Every If-None-Match line of the request, as one list (RFC 9110 section 5.3); None without the header."""
    values = [value.decode("latin-1") for name, value in scope["headers"] if name == b"if-none-match"]
    return ", ".join(values) if values else None


def etag_matches(header: str | None, etag: str) -> bool:
    """Whether If-None-Match names ``etag`` (weak comparison, RFC 9110 section 13.1.2) or is ``*``."""
    if header is None:
        return False
    candidates = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in candidates or etag in candidates


async def respond(send: Send, scope: Scope, status: int, body: bytes, headers: Headers) -> None:
    """Send a whole response from an ASGI endpoint; HEAD gets the headers only."""
    # A fresh list per response: the middleware outside appends its own headers to it.
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
