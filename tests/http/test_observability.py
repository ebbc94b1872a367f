"""What an operator sees: Prometheus metrics at /metrics and the JSON audit trail, with no secret in it."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt as jose_jwt

from issuer.http import health
from issuer.logs import JsonFormatter
from issuer.settings import Settings
from issuer.storage import users
from issuer.storage.database import Database, DatabaseUnavailable
from tests.http._http import DURATION
from tests.support.clock import FakeClock
from tests.support.families import refresh_cookie_request, set_cookie_attributes
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register, retry_after
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.jwt import jwt_claims
from tests.support.operations import label_values, scrape, value

WRONG = "definitely not it"
USER_AGENT = "TestBrowser/1.0 (audit)"
AUDIT_IP = "192.0.2.77"


# ---------------------------------------------------------------- metrics


@pytest.fixture
async def observed(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    configured = with_settings(settings, login_lockout_threshold=2, refresh_reuse_grace=0)
    async with running_issuer(configured, clock) as harness:
        yield harness


async def test_login_and_refresh_outcomes(observed: IssuerHarness) -> None:
    async with observed.client() as client:
        await register(client)
        before = await scrape(client)
        assert value(before, "issuer_logins_total", outcome="success") == 0

        tokens = await login(client)
        assert_error(
            await client.post("/auth/login", json={"email": "alice@example.com", "password": WRONG}),
            401,
            "invalid_credentials",
        )
        assert_error(
            await client.post("/auth/login", json={"email": "ghost@example.com", "password": WRONG}),
            401,
            "invalid_credentials",
        )
        assert_error(
            await client.post("/auth/login", json={"email": "alice@example.com", "password": WRONG}),
            401,
            "invalid_credentials",
        )
        locked = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
        assert_error(locked, 429, "too_many_requests")

        rotated = await refresh_body(client, tokens["refresh_token"])
        assert rotated.status_code == 200
        assert_error(await refresh_body(client, "A" * 43), 401, "invalid_grant")
        client.cookies.clear()
        assert_error(await client.post("/auth/refresh"), 401, "invalid_grant")
        assert_error(await refresh_body(client, tokens["refresh_token"]), 401, "invalid_grant")  # theft

        after = await scrape(client)
    assert value(after, "issuer_logins_total", outcome="success") == 1
    assert value(after, "issuer_logins_total", outcome="invalid_credentials") == 3
    assert value(after, "issuer_logins_total", outcome="locked") == 1
    assert value(after, "issuer_refreshes_total", outcome="success") == 1
    assert value(after, "issuer_refreshes_total", outcome="invalid_grant") == 1
    assert value(after, "issuer_refreshes_total", outcome="missing") == 1
    assert value(after, "issuer_refreshes_total", outcome="reuse") == 1
    assert value(after, "issuer_refresh_reuse_detections_total") == 1
    assert value(after, "issuer_throttled_requests_total", route="login", reason="account") == 1


async def test_replayed_refresh_outcome(settings: Settings, clock: FakeClock) -> None:
    configured = with_settings(settings, refresh_reuse_grace=10)
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        first = await refresh_body(client, token)
        second = await refresh_body(client, token)  # a second tab inside the grace window
        assert first.status_code == second.status_code == 200
        assert first.json()["refresh_token"] == second.json()["refresh_token"]
        samples = await scrape(client)
    assert value(samples, "issuer_refreshes_total", outcome="success") == 1
    assert value(samples, "issuer_refreshes_total", outcome="replayed") == 1
    assert value(samples, "issuer_refresh_reuse_detections_total") == 0


async def test_reuse_detection_counts_one_per_theft_when_ten_thieves_race(
    observed: IssuerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """REFRESH_REUSE_GRACE=0. Ten requests race with a stolen, already-consumed token: one theft, counted once."""
    caplog.set_level(logging.INFO, logger="issuer.audit")
    async with observed.client() as client:
        await register(client)
        stolen = (await login(client))["refresh_token"]
        assert (await refresh_body(client, stolen)).status_code == 200  # the victim rotated it

        async def thief(i: int, token: str) -> httpx.Response:
            async with observed.client(ip=f"198.51.100.{i + 1}") as other:
                return await other.post(
                    "/auth/refresh", json={"refresh_token": token}, headers={"User-Agent": f"thief/{i}"}
                )

        responses = await asyncio.gather(*(thief(i, stolen) for i in range(10)))
        for response in responses:
            assert_error(response, 401, "invalid_grant")
        samples = await scrape(client)
        assert value(samples, "issuer_refresh_reuse_detections_total") == 1
        reuse_records = [r for r in caplog.records if getattr(r, "event", None) == "refresh_reuse"]
        assert len(reuse_records) == 1
        assert reuse_records[0].ip in {f"198.51.100.{i + 1}" for i in range(10)}  # type: ignore[attr-defined]

        # A second theft, in another family, is a second detection.
        second = (await login(client))["refresh_token"]
        assert (await refresh_body(client, second)).status_code == 200
        racing = await asyncio.gather(*(thief(i, second) for i in range(10)))
        assert all(r.status_code == 401 for r in racing)
        samples = await scrape(client)
    assert value(samples, "issuer_refresh_reuse_detections_total") == 2
    assert len([r for r in caplog.records if getattr(r, "event", None) == "refresh_reuse"]) == 2


async def test_ten_concurrent_refreshes_of_a_fresh_token_one_success_one_detection(observed: IssuerHarness) -> None:
    async with observed.client() as client:
        await register(client)
        token = (await login(client))["refresh_token"]
        responses = await asyncio.gather(*(refresh_body(client, token) for _ in range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] + [401] * 9
        samples = await scrape(client)
    assert value(samples, "issuer_refreshes_total", outcome="success") == 1
    assert value(samples, "issuer_refresh_reuse_detections_total") == 1


def _forge(claims: dict[str, Any], header: dict[str, Any], key: Any) -> str:
    return jose_jwt.encode(header, claims, key, algorithms=[header["alg"]])


async def test_token_verification_failures_by_reason(observed: IssuerHarness) -> None:
    services, clock = observed.services, observed.clock
    settings = services.settings
    async with observed.client() as client:
        await register(client)
        tokens = await login(client)
        good = tokens["access_token"]
        signing = services.keys.signing_key(clock())
        assert signing is not None
        claims = jwt_claims(good)
        header = {"alg": "RS256", "typ": "at+jwt", "kid": signing.record.kid}

        head, body, signature = good.split(".")
        middle = len(signature) // 2
        flipped = signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        stranger_pem = stranger.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        unsigned = pyjwt.encode(claims, key=None, algorithm="none", headers={"typ": "at+jwt", "kid": header["kid"]})
        cases = {
            "malformed": "not-a-jwt",
            "bad_signature": f"{head}.{body}.{flipped}",
            "unknown_kid": pyjwt.encode(
                claims, stranger_pem, algorithm="RS256", headers={"typ": "at+jwt", "kid": "nope"}
            ),
            "wrong_audience": _forge({**claims, "aud": "another-api"}, header, signing.signing_key),
            "wrong_issuer": _forge({**claims, "iss": "https://evil.example"}, header, signing.signing_key),
            "wrong_typ": _forge(claims, {**header, "typ": "JWT"}, signing.signing_key),
            "unsupported_alg": unsigned,
        }
        for reason, token in cases.items():
            response = await client.get("/auth/me", headers=bearer(token))
            assert response.status_code == 401, reason
            assert_error(response, 401, "invalid_token")
        samples = await scrape(client)
        for reason in cases:
            assert value(samples, "issuer_token_verification_failures_total", reason=reason) == 1, reason

        # Expired: past exp plus the leeway on the issuer's clock.
        clock.advance(settings.access_token_ttl + settings.clock_leeway + 1)
        assert_error(await client.get("/auth/me", headers=bearer(good)), 401, "invalid_token")
        # Revoked by logout-all, and a deleted user's token.
        fresh = await login(client)
        assert (await client.post("/auth/logout-all", headers=bearer(fresh["access_token"]))).status_code == 204
        assert_error(await client.get("/auth/me", headers=bearer(fresh["access_token"])), 401, "invalid_token")
        last = await login(client)
        deleted = await client.request(
            "DELETE", "/auth/account", headers=bearer(last["access_token"]), json={"password": PASSWORD}
        )
        assert deleted.status_code == 204
        assert_error(await client.get("/auth/me", headers=bearer(last["access_token"])), 401, "invalid_token")
        samples = await scrape(client)
    assert value(samples, "issuer_token_verification_failures_total", reason="expired") == 1
    assert value(samples, "issuer_token_verification_failures_total", reason="revoked") == 1
    assert value(samples, "issuer_token_verification_failures_total", reason="unknown_user") == 1
    # A missing Authorization header is not a verification failure.
    async with observed.client() as client:
        assert (await client.get("/auth/me")).status_code == 401
        again = await scrape(client)
    assert (
        sum(v for (name, _), v in again.items() if name == "issuer_token_verification_failures_total") == len(cases) + 3
    )


async def test_request_duration_per_route_template(observed: IssuerHarness) -> None:
    async with observed.client() as client:
        await register(client)
        tokens = await login(client)
        for _ in range(3):
            await client.get("/auth/me", headers=bearer(tokens["access_token"]))
        session_id = str(uuid.uuid4())
        await client.delete(f"/auth/sessions/{session_id}", headers=bearer(tokens["access_token"]))
        await client.get(f"/no/such/{secrets.token_hex(8)}")
        await client.get("/.well-known/jwks.json")
        samples = await scrape(client)
    assert value(samples, DURATION, route="/auth/register", method="POST") == 1
    assert value(samples, DURATION, route="/auth/login", method="POST") == 1
    assert value(samples, DURATION, route="/auth/me", method="GET") == 3
    assert value(samples, DURATION, route="/auth/sessions/{session_id}", method="DELETE") == 1
    assert value(samples, DURATION, route="/.well-known/jwks.json", method="GET") == 1
    assert value(samples, DURATION, route="unmatched", method="GET") == 1
    assert value(samples, "issuer_request_duration_seconds_bucket", route="/auth/me", method="GET", le="+Inf") == 3
    # Label values are route templates, never raw paths: ids and junk cannot blow up the cardinality.
    routes = label_values(samples, DURATION, "route")
    assert not any(session_id in route or "/no/such" in route for route in routes), routes


async def test_signing_key_age(observed: IssuerHarness) -> None:
    async with observed.client() as client:
        start = value(await scrape(client), "issuer_signing_key_age_seconds")
        assert start == 0  # the key was created active at the fake clock's start
        observed.clock.advance(3600)
        assert value(await scrape(client), "issuer_signing_key_age_seconds") == 3600
        await observed.services.keys.rotate(immediate=True)
        assert value(await scrape(client), "issuer_signing_key_age_seconds") == 0
        observed.clock.advance(60)
        assert value(await scrape(client), "issuer_signing_key_age_seconds") == 60


async def test_database_errors_are_counted(observed: IssuerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    async with observed.client() as client:
        await register(client)
        tokens = await login(client)

        # The storage layer's own error, and a real socket error (a database that refuses connections),
        # which the Database translates into the same.
        unreachable = Database("postgresql://issuer@127.0.0.1:1/issuer", 1)

        async def down(db: Any, ids: list[str]) -> Any:
            raise DatabaseUnavailable("ConnectionDoesNotExistError")

        async def refused(db: Any, ids: list[str]) -> Any:
            return await real(unreachable, ids)

        real = users.by_ids
        try:
            for failing in (down, refused):
                with monkeypatch.context() as patch:
                    patch.setattr(users, "by_ids", failing)
                    assert_error(
                        await client.get("/auth/me", headers=bearer(tokens["access_token"])),
                        503,
                        "temporarily_unavailable",
                    )
        finally:
            await unreachable.close()
        assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).status_code == 200
        samples = await scrape(client)
    assert value(samples, "issuer_database_errors_total") == 2


async def test_throttled_requests_are_counted(settings: Settings, clock: FakeClock) -> None:
    configured = with_settings(settings, rate_limit_per_ip=2)
    async with (
        running_issuer(configured, clock, monotonic=clock.monotonic) as harness,
        harness.client() as client,
    ):
        for _ in range(3):
            await client.post("/auth/refresh", json={"refresh_token": "A" * 43})
        for _ in range(4):
            await client.post("/auth/login", json={"email": "x@example.com", "password": WRONG})
        samples = await scrape(client)
    # Separate buckets: refresh in memory, login/register in the database; 2 per minute each.
    assert value(samples, "issuer_throttled_requests_total", route="refresh", reason="ip") == 1
    assert value(samples, "issuer_throttled_requests_total", route="login", reason="ip") == 2


async def test_two_apps_in_one_process_have_separate_metrics(settings: Settings, clock: FakeClock) -> None:
    async with (
        running_issuer(settings, clock) as a,
        running_issuer(settings, clock) as b,
        a.client() as client_a,
        b.client() as client_b,
    ):
        await register(client_a)
        await login(client_a)
        assert value(await scrape(client_a), "issuer_logins_total", outcome="success") == 1
        assert value(await scrape(client_b), "issuer_logins_total", outcome="success") == 0


# ---------------------------------------------------------------- health and readiness


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    for method in ("GET", "HEAD"):
        alive = await client.request(method, "/healthz")
        assert alive.status_code == 200, method
        ready = await client.request(method, "/readyz")
        assert ready.status_code == 200, method
        assert ready.headers["cache-control"] == "no-store", method
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}


@pytest.mark.parametrize(
    ("database", "key", "problems"),
    [
        ("down", "active", ["database unreachable"]),
        ("hanging", "active", ["database unreachable"]),
        ("up", "none", ["no active signing key"]),
        ("down", "none", ["database unreachable", "no active signing key"]),
    ],
)
async def test_not_ready_without_the_database_or_a_signing_key(
    issuer: IssuerHarness,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    database: str,
    key: str,
    problems: list[str],
) -> None:
    """503 (with Retry-After, never cached) names what is missing; a hanging database is given up on after
    the readiness timeout; the process stays alive (/healthz) all the while."""

    async def down() -> None:
        raise DatabaseUnavailable("ConnectionRefusedError")

    async def hanging() -> None:
        await asyncio.Event().wait()

    if database != "up":
        monkeypatch.setattr(issuer.services.db, "ping", down if database == "down" else hanging)
        monkeypatch.setattr(health, "READINESS_DB_TIMEOUT", 0.05)
    if key == "none":
        monkeypatch.setattr(issuer.services.keys, "signing_key", lambda now: None)
    ready = await asyncio.wait_for(client.get("/readyz"), timeout=5)
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "problems": problems}
    assert ready.headers["cache-control"] == "no-store"
    assert retry_after(ready) >= 1
    alive = await client.get("/healthz")
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})


# ---------------------------------------------------------------- audit log


class AuditCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, event: str, outcome: str | None = None) -> list[logging.LogRecord]:
        """Records of one audit action (``event.action``), of one outcome when given."""
        return [
            r
            for r in self.records
            if getattr(r, "event", None) == event and outcome in (None, getattr(r, "outcome", None))
        ]


@pytest.fixture
def audit() -> Iterator[AuditCapture]:
    """Every record of the issuer's loggers (issuer.audit, and issuer.keys for key events), at INFO and up."""
    handler = AuditCapture()
    loggers = [logging.getLogger("issuer.audit"), logging.getLogger("issuer.keys")]
    previous = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg, level in previous:
            lg.removeHandler(handler)
            lg.setLevel(level)


def one(audit: AuditCapture, event: str, outcome: str | None = None, logger: str = "issuer.audit") -> logging.LogRecord:
    records = audit.events(event, outcome)
    assert len(records) == 1, (event, [r.__dict__ for r in records])
    assert records[0].name == logger
    return records[0]


def cookie_value(response: httpx.Response) -> str:
    return set_cookie_attributes(response)["refresh_token"]


async def test_every_refresh_is_a_metric_and_a_line(settings: Settings, clock: FakeClock, audit: AuditCapture) -> None:
    """A rotation and a replay in the grace window are each counted and each logged, with no setting."""
    async with running_issuer(settings, clock) as harness, harness.client() as client:
        await register(client)
        first = (await login(client))["refresh_token"]
        rotated = await refresh_body(client, first)
        assert rotated.status_code == 200
        assert [r.replayed for r in audit.events("refresh", "success")] == [False]  # type: ignore[attr-defined]
        replayed = await refresh_body(client, first)  # inside REFRESH_REUSE_GRACE: the same successor
        assert replayed.json()["refresh_token"] == rotated.json()["refresh_token"]
        samples = await scrape(client)
    lines = audit.events("refresh", "success")
    assert [line.replayed for line in lines] == [False, True]  # type: ignore[attr-defined]
    assert value(samples, "issuer_refreshes_total", outcome="success") == 1
    assert value(samples, "issuer_refreshes_total", outcome="replayed") == 1


async def test_audit_trail_one_record_per_event(
    settings: Settings, clock: FakeClock, audit: AuditCapture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    configured = with_settings(settings, login_lockout_threshold=1, refresh_reuse_grace=0)
    passwords = [PASSWORD, WRONG]
    access_tokens: list[str] = []
    refresh_tokens: list[str] = []
    async with running_issuer(configured, clock) as harness, harness.client(ip=AUDIT_IP) as client:
        client.headers["User-Agent"] = USER_AGENT
        user = await register(client)
        user_id = user["id"]

        failed = await client.post("/auth/login", json={"email": "alice@example.com", "password": WRONG})
        assert_error(failed, 401, "invalid_credentials")
        locked = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
        assert_error(locked, 429, "too_many_requests")
        clock.advance(int(locked.headers["retry-after"]))

        logged_in = await login(client)
        access_tokens.append(logged_in["access_token"])
        refresh_tokens.append(logged_in["refresh_token"])
        family_id = jwt_claims(logged_in["access_token"])["sid"]

        rotated = await refresh_body(client, logged_in["refresh_token"])
        assert rotated.status_code == 200
        access_tokens.append(rotated.json()["access_token"])
        refresh_tokens.append(rotated.json()["refresh_token"])
        assert_error(await refresh_body(client, logged_in["refresh_token"]), 401, "invalid_grant")  # reuse

        cookie_login = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
        assert cookie_login.status_code == 200
        access_tokens.append(cookie_login.json()["access_token"])
        refresh_tokens.append(cookie_value(cookie_login))
        cookie_family = jwt_claims(cookie_login.json()["access_token"])["sid"]
        logout = await client.post("/auth/logout", headers=refresh_cookie_request(client, cookie_value(cookie_login)))
        assert logout.status_code == 204

        third = await login(client)
        access_tokens.append(third["access_token"])
        refresh_tokens.append(third["refresh_token"])
        third_family = jwt_claims(third["access_token"])["sid"]
        fourth = await login(client)
        access_tokens.append(fourth["access_token"])
        refresh_tokens.append(fourth["refresh_token"])
        revoked = await client.delete(f"/auth/sessions/{third_family}", headers=bearer(fourth["access_token"]))
        assert revoked.status_code == 204
        assert (await client.post("/auth/logout-all", headers=bearer(fourth["access_token"]))).status_code == 204

        fifth = await login(client)
        access_tokens.append(fifth["access_token"])
        refresh_tokens.append(fifth["refresh_token"])
        gone = await client.request(
            "DELETE", "/auth/account", headers=bearer(fifth["access_token"]), json={"password": PASSWORD}
        )
        assert gone.status_code == 204

        first_kid = harness.services.keys.signing_key(clock())
        assert first_kid is not None
        rotation = await harness.services.keys.rotate()
        assert rotation.insert is not None
        await harness.services.keys.revoke(first_kid.record.kid)

    record = one(audit, "register")
    assert record.user_id == user_id  # type: ignore[attr-defined]

    record = one(audit, "login", "failure")
    assert (record.ip, record.user_agent) == (AUDIT_IP, USER_AGENT)  # type: ignore[attr-defined]
    record = one(audit, "login_locked")
    assert (record.ip, record.user_agent) == (AUDIT_IP, USER_AGENT)  # type: ignore[attr-defined]

    logins = audit.events("login", "success")
    assert len(logins) == 5
    first_login = logins[0]
    assert first_login.user_id == user_id  # type: ignore[attr-defined]
    assert first_login.session_id == family_id  # type: ignore[attr-defined]
    assert (first_login.ip, first_login.user_agent) == (AUDIT_IP, USER_AGENT)  # type: ignore[attr-defined]

    record = one(audit, "refresh", "success")
    assert (record.user_id, record.session_id, record.ip) == (user_id, family_id, AUDIT_IP)  # type: ignore[attr-defined]
    assert one(audit, "refresh", "failure").ip == AUDIT_IP  # type: ignore[attr-defined]

    record = one(audit, "refresh_reuse")
    assert record.levelno >= logging.WARNING
    assert (record.session_id, record.user_id) == (family_id, user_id)  # type: ignore[attr-defined]
    assert (record.ip, record.user_agent) == (AUDIT_IP, USER_AGENT)  # type: ignore[attr-defined]

    record = one(audit, "logout")
    assert record.session_id == cookie_family  # type: ignore[attr-defined]
    record = one(audit, "session_revoked")
    assert (record.user_id, record.session_id) == (user_id, third_family)  # type: ignore[attr-defined]
    assert one(audit, "logout_all").user_id == user_id  # type: ignore[attr-defined]
    assert one(audit, "account_deleted").user_id == user_id  # type: ignore[attr-defined]

    # Key events: on issuer.keys (README, "Operations"); one per operation, with the kid.
    rotated_key = audit.events("key_rotated")
    assert [r.kid for r in rotated_key] == [rotation.insert.kid]  # type: ignore[attr-defined]
    assert rotated_key[0].name == "issuer.audit"
    revoked_key = audit.events("key_revoked")
    assert [r.kid for r in revoked_key] == [first_kid.record.kid]  # type: ignore[attr-defined]
    assert revoked_key[0].name == "issuer.audit"

    # Every audit record renders as one line of JSON carrying its fields, and none carries a secret.
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    for record_, line in zip(caplog.records, lines, strict=True):
        assert "\n" not in line
        parsed = json.loads(line)
        assert parsed["log"]["logger"] == record_.name
        if record_.name == "issuer.audit":
            assert parsed["event"]["action"] == record_.event  # type: ignore[attr-defined]
    reuse_line = json.loads(formatter.format(one(audit, "refresh_reuse")))
    assert reuse_line["event"]["action"] == "refresh_reuse"
    assert reuse_line["event"]["outcome"] == "failure"
    assert reuse_line["issuer"]["session_id"] == family_id
    assert reuse_line["user"] == {"id": user_id}
    assert reuse_line["source"] == {"ip": AUDIT_IP}
    assert reuse_line["user_agent"] == {"original": USER_AGENT}
    _assert_no_secret(lines, passwords, access_tokens, refresh_tokens)


def _assert_no_secret(lines: list[str], passwords: list[str], access: list[str], refresh: list[str]) -> None:
    assert len(access) >= 5
    assert len(refresh) >= 5
    haystack = "\n".join(lines)
    assert haystack
    needles = {f"password {i}": p for i, p in enumerate(passwords)}
    for i, token in enumerate(access):
        needles[f"access token {i}"] = token
        # Any one part is enough to matter: the signature is the secret-bearing piece.
        needles[f"access token {i} signature"] = token.split(".")[2]
    needles.update({f"refresh token {i}": t for i, t in enumerate(refresh)})
    for name, needle in needles.items():
        assert needle not in haystack, f"{name} appears in the log"


async def test_no_secret_in_any_formatted_line_after_abuse_flow(
    settings: Settings, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole abuse surface (lock-out, rate limit, theft, faults) through the production formatter."""
    caplog.set_level(logging.DEBUG)
    configured = with_settings(settings, login_lockout_threshold=2, rate_limit_per_ip=30, refresh_reuse_grace=0)
    passwords = [PASSWORD, WRONG, "another wrong guess"]
    access: list[str] = []
    refresh: list[str] = []
    async with (
        running_issuer(configured, clock, monotonic=clock.monotonic) as harness,
        harness.client() as client,
    ):
        await register(client)
        for guess in passwords[1:] * 2:
            await client.post("/auth/login", json={"email": "alice@example.com", "password": guess})
        await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})  # locked
        clock.advance(3600)
        tokens = await login(client)
        access.append(tokens["access_token"])
        refresh.append(tokens["refresh_token"])
        rotated = (await refresh_body(client, tokens["refresh_token"])).json()
        access.append(rotated["access_token"])
        refresh.append(rotated["refresh_token"])
        await refresh_body(client, tokens["refresh_token"])  # theft
        cookie = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
        access.append(cookie.json()["access_token"])
        refresh.append(cookie_value(cookie))
        renewed = await client.post("/auth/refresh", headers=refresh_cookie_request(client, cookie_value(cookie)))
        access.append(renewed.json()["access_token"])
        refresh.append(cookie_value(renewed))
        await client.get("/auth/me", headers=bearer(access[-1] + "x"))
        await client.get("/auth/me", headers={"Authorization": f"Basic {refresh[-1]}"})
        last = await login(client)
        access.append(last["access_token"])
        refresh.append(last["refresh_token"])
        for _ in range(40):  # into the IP limit
            await refresh_body(client, last["refresh_token"])
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert any('"action":"refresh_reuse"' in line for line in lines)
    assert any('"action":"login_locked"' in line for line in lines)
    assert any('"action":"rate_limited"' in line for line in lines)
    _assert_no_secret(lines, passwords, access, refresh)
