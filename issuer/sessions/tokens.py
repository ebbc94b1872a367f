"""The refresh token's text: ``<route><256 random bits>``, opaque to clients.

- the rest: 256 bits from the OS CSPRNG, base64url (43 characters).
- ``route``: the user's id (the 16 bytes of its UUID, base64url: 22 characters). Every statement that finds a
  token by its hash also names the token's user, the column a distributed PostgreSQL (Citus) routes by, so
  a refresh stays one single-shard statement there (docs/scaling.md). It tells the holder nothing the access
  token's ``sub`` does not.

Only SHA-256 of the whole text is stored. Tokens issued before the route existed (the 43 characters alone)
are still accepted, with no route, and so are their successors, until their session ends; every login since
issues routed ones.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass

ROUTE_LENGTH = 22
_RANDOM_PART = r"[A-Za-z0-9_-]{43}"
_SHAPE = re.compile(rf"(?P<route>[A-Za-z0-9_-]{{{ROUTE_LENGTH}}})?(?P<random>{_RANDOM_PART})")


@dataclass(frozen=True)
class RefreshToken:
    text: str
    # SHA-256 of the whole text: what the database stores and finds it by.
    hash: bytes
    # The user the token names, or None for a token from before routes.
    user_id: str | None


def parse(text: str) -> RefreshToken | None:
    """The token, if ``text`` has a refresh token's shape (None: it cannot be one of ours)."""
    match = _SHAPE.fullmatch(text)
    if match is None:
        return None
    route = match.group("route")
    user_id = None if route is None else _user_of(route)
    if route is not None and user_id is None:
        return None
    return RefreshToken(text, hashlib.sha256(text.encode("ascii")).digest(), user_id)


@functools.lru_cache(maxsize=65536)
def _user_of(route: str) -> str | None:
    """The user id a route encodes (a user refreshes every few minutes: cached)."""
    try:
        return str(uuid.UUID(bytes=base64.urlsafe_b64decode(route + "==")))
    except (binascii.Error, ValueError):
        return None


def new(user_id: str) -> RefreshToken:
    token = parse(_route(user_id) + secrets.token_urlsafe(32))
    assert token is not None
    return token


def successor(presented: RefreshToken, key: bytes) -> RefreshToken:
    """The token that follows ``presented``: ``HMAC(key, presented)``, under the same route. Derived rather than
    random, so that a benign repeat inside the reuse grace gets the same successor (issuer.sessions.families)."""
    mac = hmac.new(key, b"refresh-successor\x00" + presented.text.encode("ascii"), hashlib.sha256).digest()
    route = presented.text[:ROUTE_LENGTH] if presented.user_id is not None else ""
    text = route + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
    return RefreshToken(text, hashlib.sha256(text.encode("ascii")).digest(), presented.user_id)


def _route(user_id: str) -> str:
    return base64.urlsafe_b64encode(uuid.UUID(user_id).bytes).rstrip(b"=").decode("ascii")
