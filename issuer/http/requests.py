"""Request parsing shared by the routes: bounded JSON bodies, client address, origin check."""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request

from issuer.errors import BodyTooLarge, Forbidden, InvalidRequest
from issuer.settings import Settings

MAX_BODY_BYTES = 16 * 1024


async def read_body(request: Request) -> bytes:
    """The raw body, refusing more than MAX_BODY_BYTES without reading it all into memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY_BYTES:
                raise BodyTooLarge(f"The request body must be at most {MAX_BODY_BYTES} bytes.")
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise BodyTooLarge(f"The request body must be at most {MAX_BODY_BYTES} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read the answer; a 400 keeps it out of the error log (a 500 with a traceback per
        # half-sent request would let anyone flood the log and the 5xx alerts).
        raise InvalidRequest("The client closed the connection before sending the whole body.") from None
    return b"".join(chunks)


async def read_json_object(request: Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """Parse the body as one JSON object; an empty body is ``{}`` only where the endpoint allows it."""
    body = await read_body(request)
    if not body.strip():
        if allow_empty:
            return {}
        raise InvalidRequest("The request body must be a JSON object.")
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise InvalidRequest("The request body must be JSON (Content-Type: application/json).")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


async def read_form(request: Request, fields: tuple[str, ...]) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (RFC 6749 section 3.2, RFC 7662, RFC 7009): the named
    fields that are present; unknown ones are ignored, as those RFCs ask, and a repeated one is refused."""
    body = await read_body(request)
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("The request body must be form-encoded (application/x-www-form-urlencoded).")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body), max_num_fields=64)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid form encoding.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            if name in form:
                raise InvalidRequest(f"'{name}' must not be repeated.")
            form[name] = value
    return form


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def client_ip(request: Request, settings: Settings) -> str | None:
    """The socket peer, or the nearest untrusted X-Forwarded-For hop when the peer is a trusted proxy."""
    peer = request.client.host if request.client else None
    if peer is None or not settings.trusted_proxies or not _is_trusted(peer, settings.trusted_proxies):
        return peer
    # Several header lines are one comma-separated list in order (RFC 9110 section 5.3); a proxy may append
    # its own line after one the client sent, so reading only the first line would believe the client.
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, settings.trusted_proxies):
            return hop if _is_ip(hop) else peer
    return hops[0] if hops and _is_ip(hops[0]) else peer


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_trusted(address: str, trusted: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in trusted:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_origin(request: Request, settings: Settings) -> None:
    """Cookie endpoints (a login that sets the cookie, a refresh or logout that uses it): a browser request
    from a foreign origin is refused (no Origin: not a browser)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    origin = origin.rstrip("/")
    if origin == settings.issuer_origin or origin in settings.allowed_origins:
        return
    raise Forbidden("This origin may not use the refresh-token cookie.")


def user_agent(request: Request) -> str | None:
    value = request.headers.get("user-agent")
    return value[:512] if value else None
