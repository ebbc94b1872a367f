"""The forward-auth sidecar in-process, on the fake issuer's JWKS (and its fake revocation feed): what each answer
carries, and how the feed is wired in (revoked tokens refused, readiness, metrics, configuration).

The real gateways in front of it (and the real issuer behind it) are in test_gateways.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator

import httpx
import pytest

from issuer.verifier import AccessTokenVerifier, RevocationFeed, TokenError
from issuer.verifier.sidecar import IDENTITY_HEADERS, Sidecar, SidecarConfig, build_verifier, parse_args
from tests.support.clock import FakeClock
from tests.support.verifier import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    FakeFeed,
    FakeIssuer,
    account_purged,
    feed_error,
    feed_verifier_for,
    mint,
    session_revoked,
    verifier_for,
    version_raised,
)
from tests.support.waiting import eventually
from tests.verifier._forgeries import IN_A_HEADER, Attack, Forge, forge_for


@pytest.fixture
def fake() -> FakeIssuer:
    return FakeIssuer()


@pytest.fixture
async def http(fake: FakeIssuer) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client() as client:
        yield client


@pytest.fixture
def verifier(http: httpx.AsyncClient, clock: FakeClock) -> AccessTokenVerifier:
    return verifier_for(http, clock)


def sidecar_client(verifier: AccessTokenVerifier | Sidecar, **config: object) -> httpx.AsyncClient:
    sidecar = (
        verifier
        if isinstance(verifier, Sidecar)
        else Sidecar(SidecarConfig(issuer=ISSUER, audience=AUDIENCE, **config), verifier)  # type: ignore[arg-type]
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=sidecar), base_url="http://sidecar")


@pytest.fixture
async def sidecar(verifier: AccessTokenVerifier) -> AsyncIterator[httpx.AsyncClient]:
    async with sidecar_client(verifier) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_valid_token_answers_200_with_the_identity(sidecar: httpx.AsyncClient, clock: FakeClock) -> None:
    token = mint(clock, sub="user-7", sid="family-9", role="admin", email="a.b@example.com", tokenVersion=3)
    response = await sidecar.get("/auth", headers=bearer(token))
    assert response.status_code == 200
    assert response.headers["x-auth-subject"] == "user-7"
    assert response.headers["x-auth-session"] == "family-9"
    assert response.headers["x-auth-role"] == "admin"
    assert response.headers["x-auth-email"] == "a.b@example.com"
    assert response.headers["x-auth-token-version"] == "3"
    assert "x-auth-scope" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    assert response.content == b""


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/auth", "/", "/any/original/path?x=1"])
async def test_every_method_and_path_is_a_check(
    sidecar: httpx.AsyncClient, clock: FakeClock, method: str, path: str
) -> None:
    """Caddy's forward_auth may send the client's method; a check must never fall through to another answer."""
    assert (await sidecar.request(method, path, headers=bearer(mint(clock)))).status_code == 200
    assert (await sidecar.request(method, path)).status_code == 401


async def test_identity_values_outside_printable_ascii_are_percent_encoded(
    sidecar: httpx.AsyncClient, clock: FakeClock
) -> None:
    token = mint(clock, email="j\u00fcrgen%x@example.com", role="r\u00f4le\r\nX-Injected: 1")
    response = await sidecar.get("/auth", headers=bearer(token))
    assert response.status_code == 200
    assert response.headers["x-auth-email"] == "j%C3%BCrgen%25x@example.com"
    assert response.headers["x-auth-role"] == "r%C3%B4le%0D%0AX-Injected: 1"
    assert "x-injected" not in response.headers


async def test_no_credentials_get_the_bare_challenge(sidecar: httpx.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Basic dTpw"}):
        response = await sidecar.get("/auth", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == "invalid_token"
        assert not set(IDENTITY_HEADERS) & {name.title() for name in response.headers}


@pytest.mark.parametrize(("attack", "expected"), IN_A_HEADER)
async def test_every_forged_token_is_a_401(
    sidecar: httpx.AsyncClient, clock: FakeClock, attack: Attack, expected: type[TokenError]
) -> None:
    forge: Forge = forge_for(clock)
    # As bytes: a gateway passes on whatever octets the client sent.
    response = await sidecar.get("/auth", headers={b"Authorization": f"Bearer {attack(forge)}".encode()})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert response.json()["error"] == "invalid_token"
    assert "x-auth-subject" not in response.headers
    assert response.json()["error_description"]


async def test_a_role_path_refuses_other_roles_with_403(sidecar: httpx.AsyncClient, clock: FakeClock) -> None:
    user, admin = bearer(mint(clock, role="user")), bearer(mint(clock, role="admin"))
    assert (await sidecar.get("/require-role/admin", headers=admin)).status_code == 200
    assert (await sidecar.get("/require-role/ops,admin", headers=admin)).status_code == 200
    refused = await sidecar.get("/require-role/admin", headers=user)
    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"
    assert refused.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
    assert "x-auth-subject" not in refused.headers
    assert (await sidecar.get("/require-role/admin")).status_code == 401


async def test_require_role_holds_on_every_path_and_a_role_path_cannot_weaken_it(
    verifier: AccessTokenVerifier, clock: FakeClock
) -> None:
    user, admin = bearer(mint(clock, role="user")), bearer(mint(clock, role="admin"))
    async with sidecar_client(verifier, require_roles=frozenset({"admin"})) as sidecar:
        assert (await sidecar.get("/auth", headers=admin)).status_code == 200
        assert (await sidecar.get("/auth", headers=user)).status_code == 403
        assert (await sidecar.get("/require-role/user", headers=user)).status_code == 403
        assert (await sidecar.get("/require-role/user", headers=admin)).status_code == 403


async def test_no_usable_keys_is_503_not_401(fake: FakeIssuer, sidecar: httpx.AsyncClient, clock: FakeClock) -> None:
    fake.failure = lambda request: httpx.Response(500)
    response = await sidecar.get("/auth", headers=bearer(mint(clock)))
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert (await sidecar.get("/readyz")).status_code == 503


async def test_health_readiness_and_metrics(sidecar: httpx.AsyncClient, clock: FakeClock) -> None:
    assert (await sidecar.get("/healthz")).status_code == 200
    not_ready = await sidecar.get("/readyz")
    assert not_ready.status_code == 503  # nothing fetched yet
    assert not_ready.json()["ready"] is False
    await sidecar.get("/auth", headers=bearer(mint(clock)))
    await sidecar.get("/auth", headers=bearer(mint(clock, aud="other")))
    await sidecar.get("/auth")
    await sidecar.get("/require-role/admin", headers=bearer(mint(clock)))
    ready = await sidecar.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert ready.json()["jwks"]["kids"] == 1
    assert "events" not in ready.json()  # no feed credentials, no feed
    text = (await sidecar.get("/metrics")).text
    for line in (
        'sidecar_checks_total{outcome="allowed"} 1.0',
        'sidecar_checks_total{outcome="invalid_token"} 1.0',
        'sidecar_checks_total{outcome="anonymous"} 1.0',
        'sidecar_checks_total{outcome="forbidden"} 1.0',
        'sidecar_token_refusals_total{reason="wrong_audience"} 1.0',
        "sidecar_check_duration_seconds_count 4.0",
        "sidecar_jwks_fetches 1.0",
        "sidecar_jwks_keys 1.0",
    ):
        assert line in text.splitlines(), line
    assert "sidecar_feed_" not in text


async def test_a_method_no_gateway_sends_gets_the_error_shape(sidecar: httpx.AsyncClient) -> None:
    response = await sidecar.request("TRACE", "/auth")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


# ---------------------------------------------------------------- configuration


def test_configuration_from_flags_and_environment(tmp_path: object) -> None:
    config = parse_args(
        ["--audience", "orders", "--require-role", "admin, ops", "--port", "9999"],
        {"ISSUER_URL": "https://issuer.example", "SIDECAR_LEEWAY": "2"},
    )
    assert (config.issuer, config.audience, config.leeway, config.port) == ("https://issuer.example", "orders", 2, 9999)
    assert config.require_roles == frozenset({"admin", "ops"})
    assert not config.follows_feed


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "--issuer (or ISSUER_URL) is required"),
        (["--port", "http"], {"ISSUER_URL": "https://i"}, "--port must be a whole number"),
        (["--leeway", "-1"], {"ISSUER_URL": "https://i"}, "--leeway must be between 0 and 300"),
        (["--client-id", "c"], {"ISSUER_URL": "https://i"}, "needs both --client-id and a client secret"),
        (["--client-secret-file", "/nonexistent/secret"], {"ISSUER_URL": "https://i"}, "--client-secret-file"),
        (["--token-lifetime", "0"], {"ISSUER_URL": "https://i"}, "--token-lifetime must be between 1 and"),
        ([], {"ISSUER_URL": "https://i", "SIDECAR_TOKEN_LIFETIME": "15m"}, "--token-lifetime must be a whole number"),
        (["--on-stale", "ignore"], {"ISSUER_URL": "https://i"}, "--on-stale must be accept or reject"),
    ],
)
def test_bad_configuration_stops_with_one_line(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv, environ)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_the_client_secret_comes_from_a_file_or_the_environment(tmp_path: object) -> None:
    from pathlib import Path

    secret = Path(str(tmp_path)) / "secret"
    secret.write_text("s3cret\n")
    config = parse_args(["--client-id", "gw", "--client-secret-file", str(secret)], {"ISSUER_URL": "https://i"})
    assert (config.client_id, config.client_secret, config.follows_feed) == ("gw", "s3cret", True)
    config = parse_args([], {"ISSUER_URL": "https://i", "SIDECAR_CLIENT_ID": "gw", "SIDECAR_CLIENT_SECRET": "x"})
    assert config.follows_feed


# ---------------------------------------------------------------- the verifier-only install

ISOLATED = """
import sys

BLOCKED = {"sqlalchemy", "asyncpg", "argon2", "alembic"}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None

sys.meta_path.insert(0, Refuse())

import issuer.verifier.sidecar
from issuer.verifier.sidecar import Sidecar, SidecarConfig
Sidecar(SidecarConfig(issuer="https://issuer.test"))
Sidecar(SidecarConfig(issuer="https://issuer.test", client_id="gw", client_secret="s"))  # and the feed
server_side = [m for m in sys.modules if m.startswith(("issuer.http", "issuer.storage", "issuer.access"))]
assert not server_side, server_side
print("sidecar-ok")
"""


def test_the_sidecar_imports_nothing_of_the_server() -> None:
    """``issuer[sidecar]`` brings Starlette, uvicorn and prometheus-client; never the database or password code."""
    done = subprocess.run(  # noqa: S603  # this interpreter on a fixed script
        [sys.executable, "-c", textwrap.dedent(ISOLATED)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sidecar-ok"


# ---------------------------------------------------------------- the revocation feed

LIFETIME = 900


def test_feed_settings_from_flags_and_environment() -> None:
    base = {"ISSUER_URL": "https://i", "SIDECAR_CLIENT_ID": "gw", "SIDECAR_CLIENT_SECRET": "x"}
    config = parse_args([], base)
    assert (config.token_lifetime, config.on_stale) == (900, "accept")
    config = parse_args([], {**base, "SIDECAR_TOKEN_LIFETIME": "1800", "SIDECAR_ON_STALE": "reject"})
    assert (config.token_lifetime, config.on_stale) == (1800, "reject")
    config = parse_args(["--token-lifetime", "300", "--on-stale", "accept"], {**base, "SIDECAR_ON_STALE": "reject"})
    assert (config.token_lifetime, config.on_stale) == (300, "accept")


def test_credentials_build_a_verifier_that_follows_the_feed() -> None:
    config = SidecarConfig(
        issuer=ISSUER, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_lifetime=1800, on_stale="reject"
    )
    verifier = build_verifier(config)
    feed = verifier.events
    assert isinstance(feed, RevocationFeed)
    assert (feed.client_id, feed.token_lifetime, feed.on_stale) == (CLIENT_ID, 1800.0, "reject")
    assert build_verifier(SidecarConfig(issuer=ISSUER)).events is None


def test_credentials_with_a_verifier_that_follows_no_feed_are_refused(verifier: AccessTokenVerifier) -> None:
    """Taking credentials and then letting revoked tokens through would be worse than not starting."""
    with pytest.raises(ValueError, match="follows no feed"):
        Sidecar(SidecarConfig(issuer=ISSUER, client_id=CLIENT_ID, client_secret=CLIENT_SECRET), verifier)


@pytest.fixture
def feed(fake: FakeIssuer) -> FakeFeed:
    fake.feed = FakeFeed()
    return fake.feed


def feed_sidecar(verifier: AccessTokenVerifier) -> Sidecar:
    config = SidecarConfig(issuer=ISSUER, audience=AUDIENCE, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    return Sidecar(config, verifier)


@contextlib.asynccontextmanager
async def serving(sidecar: Sidecar) -> AsyncIterator[httpx.AsyncClient]:
    """The sidecar's own lifespan (as uvicorn runs it: JWKS warmed, feed started and synchronised), and a client."""
    async with sidecar.app.router.lifespan_context(sidecar.app), sidecar_client(sidecar) as client:
        yield client


async def until_status(client: httpx.AsyncClient, token: str, status: int) -> None:
    async def answered() -> int:
        return (await client.get("/auth", headers=bearer(token))).status_code

    async with asyncio.timeout(10):
        while await answered() != status:  # noqa: ASYNC110  # no Event announces a merged SET
            await asyncio.sleep(0.005)


async def test_revoked_tokens_are_refused_through_the_feed(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock)
    session, other_session = mint(clock, sid="family-1"), mint(clock, sid="family-2")
    old_version = mint(clock, sub="user-2", sid="family-3", tokenVersion=1)
    new_version = mint(clock, sub="user-2", sid="family-4", tokenVersion=2)
    purged = mint(clock, sub="user-3", sid="family-5")
    async with serving(feed_sidecar(verifier)) as sidecar:
        for token in (session, other_session, old_version, new_version, purged):
            assert (await sidecar.get("/auth", headers=bearer(token))).status_code == 200
        await feed.publish(session_revoked("e1", clock.wall(), "user-1", "family-1"))
        await feed.publish(version_raised("e2", clock.wall(), "user-2", 2))
        await feed.publish(account_purged("e3", clock.wall(), "user-3"))
        for token in (session, old_version, purged):
            await until_status(sidecar, token, 401)
        refused = await sidecar.get("/auth", headers=bearer(session))
        assert refused.json() == {"error": "invalid_token", "error_description": "The access token has been revoked."}
        assert refused.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert "x-auth-subject" not in refused.headers
        # a role path refuses it too (401, not 403: the token is not valid at all)
        assert (await sidecar.get("/require-role/user", headers=bearer(session))).status_code == 401
        for token in (other_session, new_version):
            assert (await sidecar.get("/auth", headers=bearer(token))).status_code == 200
        metrics = (await sidecar.get("/metrics")).text.splitlines()
    for line in (
        'sidecar_token_refusals_total{reason="revoked"} 5.0',
        'sidecar_feed_tokens_revoked{rule="session_revoked"} 3.0',
        'sidecar_feed_tokens_revoked{rule="token_version"} 1.0',
        'sidecar_feed_tokens_revoked{rule="account_purged"} 1.0',
        "sidecar_feed_sets_applied 3.0",
        "sidecar_feed_entries 3.0",
        "sidecar_feed_ready 1.0",
        "sidecar_feed_stale 0.0",
        "sidecar_feed_sets_refused 0.0",
    ):
        assert line in metrics, line


async def test_readyz_waits_for_the_first_sync_of_the_feed(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    """Keys alone are not enough: a sidecar that has not read the feed yet would pass revoked tokens."""
    feed.failure = lambda request: feed_error(503, "temporarily_unavailable")
    verifier = feed_verifier_for(http, clock, startup_wait=0.0)
    async with serving(feed_sidecar(verifier)) as sidecar:
        not_ready = await sidecar.get("/readyz")
        assert not_ready.status_code == 503
        body = not_ready.json()
        assert body["jwks"]["usable"] is True
        assert (body["events"]["ready"], body["events"]["synced"]) == (False, False)
        assert "sidecar_feed_ready 0.0" in (await sidecar.get("/metrics")).text.splitlines()
        feed.failure = None
        await eventually(lambda: verifier.ready)
        ready = await sidecar.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["events"]["synced"] is True
        metrics = (await sidecar.get("/metrics")).text.splitlines()
    assert "sidecar_feed_ready 1.0" in metrics
    errors = next(line for line in metrics if line.startswith("sidecar_feed_errors "))
    assert float(errors.split()[1]) >= 1


async def test_a_stale_feed_is_503_under_on_stale_reject_and_lag_is_exported(
    http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    verifier = feed_verifier_for(http, clock, on_stale="reject", max_lag=60)
    token = mint(clock)
    async with serving(feed_sidecar(verifier)) as sidecar:
        assert (await sidecar.get("/auth", headers=bearer(token))).status_code == 200
        # The feed goes away; once the open long poll ends, the verifier is behind by the fake clock's time.
        feed.failure = lambda request: feed_error(503, "temporarily_unavailable")
        clock.advance(120)
        await eventually(lambda: verifier.events is not None and verifier.events.stale)
        refused = await sidecar.get("/auth", headers=bearer(token))
        assert refused.status_code == 503
        assert refused.json()["error"] == "temporarily_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert (await sidecar.get("/readyz")).status_code == 503
        metrics = (await sidecar.get("/metrics")).text.splitlines()
    lag = next(line for line in metrics if line.startswith("sidecar_feed_lag_seconds "))
    assert float(lag.split()[1]) >= 60
    assert "sidecar_feed_stale 1.0" in metrics
    assert 'sidecar_checks_total{outcome="unavailable"} 1.0' in metrics
