"""Schemathesis against a live issuer: every described operation, requests derived from issuer/http/openapi.json.

The issuer runs under uvicorn on a free loopback port, on a database of its own on the suite's PostgreSQL, with the wall
clock. Per operation Schemathesis sends the description's examples, its coverage cases (the boundaries and
near misses of every constraint, valid and invalid) and FUZZ_EXAMPLES generated requests, with the
credentials the operation's security names: ``bearerAuth`` and ``refreshCookie`` by logging in a registered
user (body and cookie transport; fetched again after a 401, which logout-all, account deletion and a reused
cookie cause), ``clientBasic`` from ``issuer clients add``.

Every response must pass Schemathesis's checks: no 5xx, a documented status, content type and headers, a
body that matches its documented schema, invalid input refused, valid input accepted. Afterwards no
refresh-token family may hold two live tokens (the invariant of contract section 4).

The schema is built at import from the packaged file (the served copy differs only in ``servers``, which
tests/http/test_openapi.py checks): Schemathesis's fixture-loaded schemas do not work with this pytest.
Bounded: FUZZ_EXAMPLES (default 75) generated requests per operation plus the coverage cases; a fixed seed
(FUZZ_SEED to change it), so CI sends the same requests every run. The requests sent are counted and printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
import uvicorn

from issuer.http.app import create_app
from issuer.http.openapi import load_document
from issuer.settings import Argon2Params, Secret, Settings
from issuer.storage.migrations import upgrade
from tests.conftest import run_blocking
from tests.support.clock import FakeClock
from tests.support.database import admin_dsn
from tests.support.http import PASSWORD
from tests.support.keys import Cli

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "75"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "21"))
USER_EMAIL = "fuzz@example.org"
CLIENT_SCOPES = "introspect,events,revoke"
START_TIMEOUT = 30.0

# Unconsumed, unexpired tokens per family that is neither revoked nor past its absolute expiry.
LIVE_TOKENS_PER_FAMILY = """
SELECT f.id, count(t.token_hash) AS live
FROM refresh_families f JOIN refresh_tokens t ON t.family_id = f.id
WHERE f.revoked_at IS NULL AND f.expires_at > now() AND t.consumed_at IS NULL AND t.expires_at > now()
GROUP BY f.id HAVING count(t.token_hash) > 1
"""


@dataclass
class LiveIssuer:
    base_url: str
    settings: Settings
    client_credentials: tuple[str, str] | None = None
    statuses: Counter[int] = field(default_factory=Counter)


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def fuzz_database() -> Iterator[str]:
    """A database of this module's own, kept for all its operations: the suite's shared one is truncated
    after every test (tests/conftest.py), which would pull the user and the keys from under the issuer."""
    name = f"issuer_fuzz_{secrets.token_hex(6)}"
    run_blocking(lambda: asyncio.run(_admin(f'CREATE DATABASE "{name}"')))
    url = f"{admin_dsn().rsplit('/', 1)[0]}/{name}"
    try:
        run_blocking(lambda: upgrade(url))
        yield url
    finally:
        run_blocking(lambda: asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))


async def _admin(query: str) -> None:
    conn = await asyncpg.connect(admin_dsn(), timeout=5)
    try:
        await conn.execute(query)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def live_issuer(fuzz_database: str) -> Iterator[LiveIssuer]:
    """The issuer under uvicorn in a thread of its own (its own event loop, pool and key manager) and a
    registered user, for all the operations. Afterwards: the request count, and the family invariant."""
    sock = _free_socket()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        issuer_url=base_url,
        audience="api",
        database_url=fuzz_database,
        kek=Secret(secrets.token_bytes(32)),
        kek_is_dev=False,
        cookie_secure=False,  # over plain http a Secure cookie would never be sent back
        argon2=Argon2Params(memory_cost_kib=1024, time_cost=1, parallelism=1),
        # Throttling and lock-out answers are documented (429), but left on they would answer most requests.
        rate_limit_per_ip=0,
        login_lockout_threshold=0,
        cleanup_interval=0,
        account_page=True,
    )
    settings.validate()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fuzzed-issuer", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        assert thread.is_alive(), "the issuer's server thread ended before it started"
        assert time.monotonic() < deadline, "the issuer did not start"
        time.sleep(0.05)
    live = LiveIssuer(base_url, settings)
    try:
        registered = httpx.post(f"{base_url}/auth/register", json={"email": USER_EMAIL, "password": PASSWORD})
        assert registered.status_code == 201, registered.text
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT)
        sock.close()
    print(f"\nfuzz: {sum(live.statuses.values())} requests, by status: {dict(sorted(live.statuses.items()))}")
    doubled = asyncio.run(_families_with_two_live_tokens(fuzz_database))
    assert not doubled, f"refresh-token families with more than one live token: {doubled}"


async def _families_with_two_live_tokens(database_url: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        return [(row["id"], row["live"]) for row in await conn.fetch(LIVE_TOKENS_PER_FAMILY)]
    finally:
        await conn.close()


DOCUMENT = load_document()
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": FUZZ_SEED,
        "generation": {"max-examples": FUZZ_EXAMPLES, "database": "none"},
        # No links between operations are described, so the stateful phase would have nothing to chain.
        "phases": {"stateful": {"enabled": False}},
        # A body over 16 KiB is refused with 413 before it is parsed: a rejection like 400.
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429],
            }
        },
        "operations": [
            # The cursor is opaque and minted by the feed: a generated string is refused (400) by design, so
            # "valid" poll requests with a cursor cannot be expected to succeed. Every other check applies.
            {"include-path": "/events/poll", "checks": {"positive_data_acceptance": {"enabled": False}}}
        ],
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
# Valid addresses the issuer accepts: Hypothesis's default domains include special-use ones (.test, .local),
# which registration refuses by design and which a JSON Schema pattern cannot exclude.
schemathesis.openapi.format(
    "email", st.emails(domains=st.sampled_from(["example.com", "example.org", "a.example.net"]))
)


def scheme_of(case: schemathesis.Case) -> str:
    """The security scheme an operation's credentials come from ("" for none)."""
    requirements = case.operation.definition.raw.get("security", DOCUMENT.get("security", []))
    names = [name for requirement in requirements for name in requirement]
    return names[0] if names else ""


# Placeholders the auth provider puts where credentials go; the test swaps in real ones just before the call.
BEARER_MARK = "fuzz-bearer-placeholder"
COOKIE_MARK = "fuzz-cookie-placeholder"
BASIC_MARK = "Basic fuzz-client-placeholder"


@schema.auth(refresh_interval=None)
class CredentialSlots:
    """Schemathesis applies auth while it generates cases, and the explicit examples are generated at
    collection, before the issuer is up. So the provider only marks where the credentials go; Schemathesis
    then knows the case is authenticated (its checks compare it with copies without credentials, and it
    leaves the cases it generates without them, or with invalid ones, alone)."""

    def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str:
        return scheme_of(case)

    def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
        if data == "bearerAuth":
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {BEARER_MARK}"}
        elif data == "refreshCookie":
            case.cookies = {**(case.cookies or {}), "refresh_token": COOKIE_MARK}
        elif data == "clientBasic":
            case.headers = {**(case.headers or {}), "Authorization": BASIC_MARK}


class Credentials:
    """The registered user's Bearer token and refresh cookie, and the client's Basic credentials, put in the
    slots the provider marked. A Bearer token is fetched again after a 401 (logout-all or account deletion
    killed it); a cookie follows the rotation and is fetched again once spent or revoked."""

    def __init__(self, live: LiveIssuer) -> None:
        self.live = live
        self.bearer: str | None = None
        self.cookie: str | None = None

    def fill(self, case: schemathesis.Case) -> str | None:
        """Put real credentials in the marked slots; which kind, if any."""
        headers = case.headers or {}
        if headers.get("Authorization") == f"Bearer {BEARER_MARK}":
            self.bearer = self.bearer or self._login("body").json()["access_token"]
            headers["Authorization"] = f"Bearer {self.bearer}"
            return "bearer"
        if headers.get("Authorization") == BASIC_MARK:
            assert self.live.client_credentials is not None, "no client credentials for a client endpoint"
            client_id, secret = self.live.client_credentials
            basic = httpx.BasicAuth(client_id, secret).auth_flow(httpx.Request("POST", self.live.base_url))
            headers["Authorization"] = next(basic).headers["Authorization"]
            return "basic"
        if (case.cookies or {}).get("refresh_token") == COOKIE_MARK:
            self.cookie = self.cookie or self._login("cookie").cookies["refresh_token"]
            case.cookies = {**(case.cookies or {}), "refresh_token": self.cookie}
            return "cookie"
        return None

    def after(self, kind: str | None, response: schemathesis.Response) -> None:
        if kind == "bearer" and response.status_code == 401:
            self.bearer = None
        elif kind == "cookie":
            # Rotated: the successor; spent, revoked or refused: log in again next time.
            self.cookie = _refresh_cookie(response) if response.status_code < 400 else None

    def _login(self, transport: str) -> httpx.Response:
        body = {"email": USER_EMAIL, "password": PASSWORD, "token_transport": transport}
        response = httpx.post(f"{self.live.base_url}/auth/login", json=body)
        assert response.status_code == 200, response.text
        return response


@pytest.fixture
def credentials(
    live_issuer: LiveIssuer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Credentials:
    """Fresh per operation (and shared by its examples). The client with every scope is made once, by
    `issuer clients add` on the fuzzed issuer's database."""
    if live_issuer.client_credentials is None:
        monkeypatch.chdir(tmp_path)
        cli = Cli(live_issuer.settings, FakeClock(), monkeypatch, capsys)
        added = asyncio.run(cli("clients", "add", "fuzzer", "--scope", CLIENT_SCOPES))
        assert added.code == 0, added
        created = json.loads(added.out)
        live_issuer.client_credentials = (created["client_id"], created["client_secret"])
    return Credentials(live_issuer)


@schema.parametrize()
# The credentials fixture is meant to span an operation's examples (its tokens are reused until refused).
# No deadline: a request's time depends on the machine's load, and Hypothesis would call it a failure.
@hypothesis.settings(suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture], deadline=None)
def test_every_operation_conforms(case: schemathesis.Case, live_issuer: LiveIssuer, credentials: Credentials) -> None:
    kind = credentials.fill(case)
    response = case.call(base_url=live_issuer.base_url)
    live_issuer.statuses[response.status_code] += 1
    credentials.after(kind, response)
    case.validate_response(response)


def _refresh_cookie(response: schemathesis.Response) -> str | None:
    """The refresh token a response sets (None when it sets none or clears it)."""
    for line in response.headers.get("set-cookie", []):
        name, _, rest = line.partition("=")
        value = rest.split(";", 1)[0]
        if name == "refresh_token" and value not in ("", '""'):
            return value
    return None


async def test_the_family_check_sees_two_live_tokens(pg_url: str) -> None:
    """The check the fuzzing ends with can fail: one live token per family passes, a second is reported."""
    conn = await asyncpg.connect(pg_url, timeout=5)
    try:
        await conn.execute(
            "INSERT INTO users (id, email, password_hash, role, token_version, created_at)"
            " VALUES ('u1', 'a@example.com', 'x', 'user', 0, now())"
        )
        await conn.execute(
            "INSERT INTO refresh_families (id, user_id, created_at, last_used_at, expires_at, idle_expires_at)"
            " VALUES ('f1', 'u1', now(), now(), now() + interval '1 day', now() + interval '1 day')"
        )
        token = (
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at)"
            " VALUES ($1, 'f1', 'u1', now(), $2)"
        )
        await conn.execute(token, b"\x01" * 32, datetime.now(UTC) + timedelta(days=1))
        await conn.execute(token, b"\x02" * 32, datetime.now(UTC) - timedelta(seconds=1))  # expired: not live
        assert await _families_with_two_live_tokens(pg_url) == []
        await conn.execute(token, b"\x03" * 32, datetime.now(UTC) + timedelta(days=1))
        assert await _families_with_two_live_tokens(pg_url) == [("f1", 2)]
    finally:
        await conn.close()
