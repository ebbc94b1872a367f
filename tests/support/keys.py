"""Helpers for the signing-key tests: running the `issuer` CLI in-process, reading keys, tokens and JWKS."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

import issuer.cli
from issuer.cli import main
from issuer.keys.records import KeyRecord
from issuer.settings import Settings, encode_kek
from issuer.storage import signing_keys
from issuer.storage.database import Database
from tests.support.clock import FakeClock

# Every variable Settings.from_environ reads; the CLI gets exactly the test settings, nothing from the host.
_CONFIG_VARIABLES = (
    "ISSUER_URL",
    "ISSUER_AUDIENCE",
    "DATABASE_URL",
    "ACCESS_TOKEN_TTL",
    "REFRESH_TOKEN_TTL",
    "SESSION_MAX_AGE",
    "REFRESH_REUSE_GRACE",
    "COOKIE_SECURE",
    "CLOCK_LEEWAY",
    "JWKS_MAX_AGE",
    "KEY_PUBLISH_LEAD",
    "KEY_ROTATION_INTERVAL",
    "KEY_RELOAD_INTERVAL",
    "ALLOWED_ORIGINS",
    "TRUSTED_PROXIES",
    "ISSUER_KEK",
    "ISSUER_KEK_FILE",
    "ARGON2_MEMORY_COST",
    "ARGON2_TIME_COST",
    "ARGON2_PARALLELISM",
)


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


class Cli:
    """Runs ``issuer.cli.main`` configured like the test app, on the test's FakeClock.

    ``main`` calls ``asyncio.run``, which cannot nest in the test's event loop, so it runs in a worker thread.
    """

    def __init__(self, settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
        self._monkeypatch = monkeypatch
        self._capsys = capsys
        for name in _CONFIG_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        values = {
            "ISSUER_URL": settings.issuer_url,
            "ISSUER_AUDIENCE": settings.audience,
            "DATABASE_URL": settings.database_url,
            "ACCESS_TOKEN_TTL": settings.access_token_ttl,
            "REFRESH_TOKEN_TTL": settings.refresh_token_ttl,
            "SESSION_MAX_AGE": settings.session_max_age,
            "CLOCK_LEEWAY": settings.clock_leeway,
            "JWKS_MAX_AGE": settings.jwks_max_age,
            "KEY_PUBLISH_LEAD": settings.key_publish_lead,
            "KEY_ROTATION_INTERVAL": settings.key_rotation_interval,
            "KEY_RELOAD_INTERVAL": settings.key_reload_interval,
            "ISSUER_KEK": encode_kek(settings.kek.reveal()),
        }
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
        # The CLI is a separate process in production and reads the wall clock; here it shares the app's clock.
        monkeypatch.setattr(issuer.cli, "system_clock", clock)

    def set_kek(self, raw: bytes) -> None:
        self._monkeypatch.setenv("ISSUER_KEK", encode_kek(raw))

    async def __call__(self, *argv: str) -> CliResult:
        self._capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = self._capsys.readouterr()
        return CliResult(code, out, err)


def assert_refused(result: CliResult, *needles: str) -> str:
    """Exit status 1, nothing on stdout, exactly one stderr line that contains every needle (case-insensitive)."""
    assert result.code == 1, result
    assert result.out == "", result
    assert len(result.err_lines) == 1, result
    line = result.err_lines[0]
    assert line.startswith("issuer: "), line
    assert "Traceback" not in line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


async def key_rows(database_url: str) -> list[KeyRecord]:
    """The signing_keys table as it is now, read through a fresh connection."""
    db = Database(database_url, size=1)
    try:
        return await signing_keys.all_keys(db)
    finally:
        await db.close()


def by_kid(records: Sequence[KeyRecord]) -> dict[str, KeyRecord]:
    return {r.kid: r for r in records}


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def b64url_uint(value: int) -> str:
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def rfc7638_thumbprint(n: int, e: int) -> str:
    """Computed here from the RFC, independently of joserfc."""
    members = json.dumps({"e": b64url_uint(e), "kty": "RSA", "n": b64url_uint(n)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(hashlib.sha256(members.encode()).digest()).rstrip(b"=").decode("ascii")


def token_kid(token: str) -> str:
    header = json.loads(b64url_decode(token.split(".")[0]))
    kid = header["kid"]
    assert isinstance(kid, str)
    return kid


async def jwks_kids(client: httpx.AsyncClient) -> set[str]:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200, response.text
    return {key["kid"] for key in response.json()["keys"]}


async def fetch_jwks(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200, response.text
    document = response.json()
    assert isinstance(document, dict)
    return document


def verify_with_jwks(document: dict[str, Any], token: str, *, audience: str, issuer: str) -> dict[str, Any]:
    """What a gateway does: pick the key by kid from the published JWKS and check the signature (PyJWT).

    Time claims are checked by the issuer's own tests against the FakeClock; PyJWT would use the wall clock.
    """
    keys = {key["kid"]: key for key in document["keys"]}
    kid = token_kid(token)
    assert kid in keys, f"kid {kid} is not in the JWKS {sorted(keys)}"
    public = jwt.PyJWK.from_dict(keys[kid]).key
    claims = jwt.decode(
        token,
        key=public,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert isinstance(claims, dict)
    return claims
