"""Client credentials for resource servers and gateways (``client_secret_basic``, RFC 6749 section 2.3.1).

A secret is 256 bits from the CSPRNG, shown once (``issuer clients add``) and stored only as its SHA-256:
with that much entropy a slow password hash adds nothing but cost on every poll and introspection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from issuer.clock import Clock
from issuer.errors import InsufficientScope, InvalidClient, InvalidRequest
from issuer.storage import clients
from issuer.storage.clients import Client
from issuer.storage.database import Database

SCOPES = ("introspect", "revoke", "events")
# The shape of the ids this registry hands out; anything else is unknown without asking the database.
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_NAME_LENGTH = 200
# Compared against when the client id is unknown, so that answer takes as long as a wrong secret.
_NO_SUCH_CLIENT = hashlib.sha256(b"no such client").digest()


@dataclass(frozen=True)
class NewClient:
    client_id: str
    client_secret: str
    scopes: frozenset[str]

    def as_json(self) -> dict[str, str]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "scope": " ".join(sorted(self.scopes)),
        }


def parse_scopes(text: str) -> frozenset[str]:
    """``introspect,events`` (commas or spaces) -> the set; an unknown or empty scope is refused."""
    names = frozenset(part for part in text.replace(",", " ").split() if part)
    unknown = sorted(names - set(SCOPES))
    if unknown or not names:
        raise InvalidRequest(f"scope must be a comma-separated list of {', '.join(SCOPES)}")
    return names


def _secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class ClientRegistry:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def add(self, name: str, scopes: Iterable[str]) -> NewClient:
        name = name.strip()
        if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InvalidRequest(f"the client's name must be 1 to {MAX_NAME_LENGTH} printable characters")
        chosen = frozenset(scopes)
        # Hex, not base64url: an id that starts with '-' would read as an option on every command line.
        client_id = secrets.token_hex(16)
        secret = secrets.token_urlsafe(32)
        await clients.insert(self._db, Client(client_id, name, _secret_hash(secret), chosen, self._clock()))
        return NewClient(client_id, secret, chosen)

    async def list(self) -> list[Client]:
        return await clients.all_clients(self._db)

    async def remove(self, client_id: str) -> bool:
        return await clients.delete(self._db, client_id)

    async def authenticate(self, authorization: str | None, scope: str) -> Client:
        """The client named by an ``Authorization: Basic`` header, if its secret matches and it has ``scope``.

        Raises :class:`InvalidClient` (401) for a missing, malformed, unknown or wrong credential, and
        :class:`InsufficientScope` (403) for a good one without the scope.
        """
        client_id, secret = _basic_credentials(authorization)
        client = await clients.by_id(self._db, client_id) if _CLIENT_ID.fullmatch(client_id) else None
        expected = _NO_SUCH_CLIENT if client is None else client.secret_hash
        if not hmac.compare_digest(expected, _secret_hash(secret)) or client is None:
            raise InvalidClient()
        if scope not in client.scopes:
            raise InsufficientScope(f"This client does not have the '{scope}' scope.")
        return client


def _basic_credentials(authorization: str | None) -> tuple[str, str]:
    """``(client_id, secret)`` from ``Basic base64(urlencode(id):urlencode(secret))``."""
    if authorization is None:
        raise InvalidClient("This endpoint needs client credentials (HTTP Basic).")
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        raise InvalidClient("This endpoint needs client credentials (HTTP Basic).")
    try:
        # ValueError: binascii.Error, and non-ASCII text (Starlette decodes header bytes as latin-1).
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError:
        raise InvalidClient("The Basic credentials are not valid base64 of UTF-8 text.") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise InvalidClient("The Basic credentials must be 'client_id:client_secret'.")
    # RFC 6749 section 2.3.1: both are form-urlencoded before they are joined.
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
