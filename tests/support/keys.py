"""Helpers for the signing-key tests: running the `issuer` CLI in-process, reading keys, tokens and JWKS,
several replicas on one database. Base64url, thumbprints and token headers are in ``tests.support.jwt``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
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
from tests.support.issuer import IssuerHarness, running_issuer
from tests.support.jwt import token_kid

JWKS = "/.well-known/jwks.json"

# Every variable Settings.from_environ reads (tests/test_cli.py checks this list against it): the CLI gets
# exactly the test settings, nothing from the host.
CONFIG_VARIABLES = (
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
    "RATE_LIMIT_PER_IP",
    "LOGIN_LOCKOUT_THRESHOLD",
    "CLEANUP_INTERVAL",
    "CLEANUP_RETENTION",
    "DB_POOL_SIZE",
    "ACCESS_LOG",
    "ALLOWED_ORIGINS",
    "TRUSTED_PROXIES",
    "ISSUER_KEK",
    "ISSUER_KEK_FILE",
    "ARGON2_MEMORY_COST",
    "ARGON2_TIME_COST",
    "ARGON2_PARALLELISM",
    "REUSE_REVOKES",
    "REFRESH_BINDING",
    "DATABASE_LISTEN_URL",
    "ACCOUNT_PAGE",
)


def settings_environ(settings: Settings) -> dict[str, str]:
    """The environment from which ``Settings.from_environ`` builds ``settings`` again."""
    return {
        "ISSUER_URL": settings.issuer_url,
        "ISSUER_AUDIENCE": settings.audience,
        "DATABASE_URL": settings.database_url,
        "ACCESS_TOKEN_TTL": str(settings.access_token_ttl),
        "REFRESH_TOKEN_TTL": str(settings.refresh_token_ttl),
        "SESSION_MAX_AGE": str(settings.session_max_age),
        "REFRESH_REUSE_GRACE": str(settings.refresh_reuse_grace),
        "COOKIE_SECURE": str(settings.cookie_secure).lower(),
        "CLOCK_LEEWAY": str(settings.clock_leeway),
        "JWKS_MAX_AGE": str(settings.jwks_max_age),
        "KEY_PUBLISH_LEAD": str(settings.key_publish_lead),
        "KEY_ROTATION_INTERVAL": str(settings.key_rotation_interval),
        "KEY_RELOAD_INTERVAL": str(settings.key_reload_interval),
        "RATE_LIMIT_PER_IP": str(settings.rate_limit_per_ip),
        "LOGIN_LOCKOUT_THRESHOLD": str(settings.login_lockout_threshold),
        "CLEANUP_INTERVAL": str(settings.cleanup_interval),
        "CLEANUP_RETENTION": str(settings.cleanup_retention),
        "DB_POOL_SIZE": str(settings.db_pool_size),
        "ACCESS_LOG": str(settings.access_log).lower(),
        "ALLOWED_ORIGINS": ",".join(settings.allowed_origins),
        "TRUSTED_PROXIES": ",".join(settings.trusted_proxies),
        "ISSUER_KEK": encode_kek(settings.kek.reveal()),
        "ARGON2_MEMORY_COST": str(settings.argon2.memory_cost_kib),
        "ARGON2_TIME_COST": str(settings.argon2.time_cost),
        "ARGON2_PARALLELISM": str(settings.argon2.parallelism),
        "REUSE_REVOKES": settings.reuse_revokes,
        "REFRESH_BINDING": settings.refresh_binding,
        "DATABASE_LISTEN_URL": settings.database_listen_url,
        "ACCOUNT_PAGE": str(settings.account_page).lower(),
    }


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
        for name in CONFIG_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in settings_environ(settings).items():
            monkeypatch.setenv(name, value)
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


async def insert_key(database_url: str, record: KeyRecord) -> None:
    """Write ``record`` as it is (kid, schedule, generation), as no operator command would."""
    db = Database(database_url, size=1)
    try:
        await signing_keys.insert(db, record)
    finally:
        await db.close()


def by_kid(records: Sequence[KeyRecord]) -> dict[str, KeyRecord]:
    return {r.kid: r for r in records}


def only_new(after: Sequence[KeyRecord], before: Sequence[KeyRecord]) -> KeyRecord:
    """The one row of ``after`` whose kid ``before`` does not have."""
    known = {r.kid for r in before}
    fresh = [r for r in after if r.kid not in known]
    assert len(fresh) == 1, [r.kid for r in fresh]
    return fresh[0]


@contextlib.asynccontextmanager
async def replicas(settings: Settings, clock: FakeClock, count: int) -> AsyncIterator[list[IssuerHarness]]:
    """``count`` app instances on one database, started one after the other like a rolling deploy."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_issuer(settings, clock)) for _ in range(count)]


async def reload_all(instances: Sequence[IssuerHarness]) -> None:
    """What every replica does by itself once per KEY_RELOAD_INTERVAL."""
    await asyncio.gather(*(instance.services.keys.reload() for instance in instances))


async def jwks_kids(client: httpx.AsyncClient) -> set[str]:
    return {key["kid"] for key in (await fetch_jwks(client))["keys"]}


async def fetch_jwks(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get(JWKS)
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
