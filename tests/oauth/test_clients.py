"""Client credentials: `issuer clients add | list | remove`, and HTTP Basic authentication on the
client-authenticated endpoints (RFC 6749 section 2.3.1), attacked."""

from __future__ import annotations

import base64
import hashlib
import json
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import text

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import assert_error, assert_throttled
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.keys import Cli, assert_refused
from tests.support.oauth import Credentials, basic, new_client

ENDPOINTS = (
    ("/oauth2/introspect", "introspect", {"data": {"token": "x"}}),
    ("/oauth2/revoke", "revoke", {"data": {"token": "x"}}),
    ("/events/poll", "events", {"json": {"returnImmediately": True}}),
)


async def test_add_prints_the_secret_once_as_one_json_line_and_stores_only_its_hash(
    cli: Cli, issuer: IssuerHarness
) -> None:
    result = await cli("clients", "add", "edge-gateway", "--scope", "introspect,events")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert len(lines) == 1
    created = json.loads(lines[0])
    assert set(created) == {"client_id", "client_secret", "scope"}
    assert created["scope"] == "events introspect"
    assert len(base64.urlsafe_b64decode(created["client_secret"] + "=")) == 32  # 256 bits

    async with issuer.engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM clients"))).mappings().one()
    assert row["client_id"] == created["client_id"]
    assert row["name"] == "edge-gateway"
    assert bytes(row["secret_hash"]) == hashlib.sha256(created["client_secret"].encode()).digest()
    assert created["client_secret"] not in json.dumps({k: str(v) for k, v in row.items()})

    listing = await cli("clients", "list")
    assert listing.code == 0
    assert created["client_id"] in listing.out
    assert "edge-gateway" in listing.out
    assert created["client_secret"] not in listing.out

    async with issuer.client() as http:
        who = Credentials(created["client_id"], created["client_secret"])
        assert (await http.post("/oauth2/introspect", data={"token": "x"}, headers=who.headers)).status_code == 200
        assert (await cli("clients", "remove", created["client_id"])).code == 0
        # Removed: the secret stops working at once.
        gone = await http.post("/oauth2/introspect", data={"token": "x"}, headers=who.headers)
        assert_error(gone, 401, "invalid_client")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("clients", "add", "x", "--scope", "admin"), "--scope"),
        (("clients", "add", "x", "--scope", ""), "--scope"),
        (("clients", "add", "   ", "--scope", "events"), "name"),
        (("clients", "remove", "no-such-client"), "no client"),
    ],
)
async def test_bad_client_commands_are_refused_in_one_line(cli: Cli, argv: tuple[str, ...], needle: str) -> None:
    assert_refused(await cli(*argv), needle)


@pytest.mark.parametrize(("path", "scope", "body"), ENDPOINTS)
async def test_every_client_endpoint_refuses_missing_and_wrong_credentials(
    issuer: IssuerHarness, client: httpx.AsyncClient, path: str, scope: str, body: dict[str, object]
) -> None:
    good = await new_client(issuer, scope)
    attempts = {
        "no header": {},
        "bearer instead": {"Authorization": "Bearer abc"},
        "not base64": {"Authorization": "Basic !!!"},
        "no colon": {"Authorization": "Basic " + base64.b64encode(good.client_id.encode()).decode()},
        "wrong secret": {
            "Authorization": basic(good.client_id, good.secret[:-1] + ("A" if good.secret[-1] != "A" else "B"))
        },
        "unknown client": {"Authorization": basic("nobody", good.secret)},
        "NUL in the id": {"Authorization": basic("a\x00b", good.secret)},
        "empty secret": {"Authorization": basic(good.client_id, "")},
    }
    for name, headers in attempts.items():
        response = await client.post(path, headers=headers, **body)  # type: ignore[arg-type]
        assert_error(response, 401, "invalid_client")
        assert response.headers["www-authenticate"].startswith("Basic realm="), name
        assert response.headers["cache-control"] == "no-store"
    assert (await client.post(path, headers=good.headers, **body)).status_code == 200  # type: ignore[arg-type]


@pytest.mark.parametrize(("path", "scope", "body"), ENDPOINTS)
async def test_a_client_without_the_scope_gets_403(
    issuer: IssuerHarness, client: httpx.AsyncClient, path: str, scope: str, body: dict[str, object]
) -> None:
    others = [s for s in ("introspect", "revoke", "events") if s != scope]
    limited = await new_client(issuer, *others)
    assert_error(await client.post(path, headers=limited.headers, **body), 403, "insufficient_scope")  # type: ignore[arg-type]


async def test_form_encoded_credentials_are_decoded(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    """RFC 6749 section 2.3.1: id and secret are form-urlencoded before they are joined with ':'."""
    good = await new_client(issuer, "introspect")
    encoded = basic(quote(good.client_id, safe=""), quote(good.secret, safe=""))
    assert (await client.post("/oauth2/introspect", data={"token": "x"}, headers={"Authorization": encoded})).is_success


async def test_failed_client_authentication_is_rate_limited_per_address(settings: Settings, clock: FakeClock) -> None:
    """Failures cost a budget (RATE_LIMIT_PER_IP a minute, like login): once spent, failures from that address
    get 429. Good credentials are checked first and always pass, so a stranger's bad guesses from a shared
    address (a NAT, a /64) never lock a gateway out of the feed."""
    limited = with_settings(settings, rate_limit_per_ip=5)
    async with running_issuer(limited, clock, monotonic=clock.monotonic) as issuer:
        good = await new_client(issuer, "introspect")
        bad = Credentials(good.client_id, "wrong")
        async with issuer.client(ip="198.51.100.9") as attacker, issuer.client(ip="198.51.100.9") as gateway:
            for _ in range(5):
                response = await attacker.post("/oauth2/introspect", data={"token": "x"}, headers=bad.headers)
                assert_error(response, 401, "invalid_client")
            assert_throttled(await attacker.post("/oauth2/introspect", data={"token": "x"}, headers=bad.headers))
            assert_throttled(await attacker.post("/oauth2/introspect", data={"token": "x"}))
            for _ in range(10):
                assert (await gateway.post("/oauth2/introspect", data={"token": "x"}, headers=good.headers)).is_success
            clock.advance(60)
            response = await attacker.post("/oauth2/introspect", data={"token": "x"}, headers=bad.headers)
            assert_error(response, 401, "invalid_client")


@pytest.mark.parametrize("header", [b"Basic \xc3\xa9\xc3\xa9", b"Basic \xff\xfe", b"Basic \xef\xbc\xa1\xef\xbc\xa2"])
async def test_non_ascii_basic_credentials_are_a_401_not_a_500(issuer: IssuerHarness, header: bytes) -> None:
    async with issuer.client(raise_app_exceptions=False) as raw:
        for path in ("/oauth2/introspect", "/oauth2/revoke", "/events/poll"):
            response = await raw.post(
                path,
                content=b"token=x",
                headers={"Authorization": header, "Content-Type": "application/x-www-form-urlencoded"},  # type: ignore[dict-item]
            )
            assert_error(response, 401, "invalid_client")
