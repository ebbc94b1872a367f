"""The audit trail as a log pipeline reads it: ECS lines on stderr, one per event, from real requests.

Logging is configured exactly as ``issuer serve`` configures it (``uvicorn_log_config``), with stderr captured,
and the requests go through the whole app. Each line is parsed as JSON and checked field by field.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from issuer.audit import audit
from issuer.logs import ECS_VERSION, JsonStreamHandler, uvicorn_log_config
from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import running_issuer, with_settings
from tests.support.jwt import jwt_claims

IP = "198.51.100.23"
AGENT = "AuditBrowser/2.0 (ECS)"
WRONG = "not the password at all"
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
HEADER = ["@timestamp", "log.level", "message", "ecs.version"]

# ECS's expected event types per category (the allowed values of event.category): a line whose type is not
# expected for one of its categories is one a SIEM's rules would not match.
EXPECTED_TYPES = {
    "authentication": {"start", "end", "info"},
    "session": {"start", "end", "info"},
    "iam": {"admin", "change", "creation", "deletion", "group", "info", "user"},
    "network": {"access", "allowed", "connection", "denied", "end", "info", "protocol", "start"},
    "configuration": {"access", "change", "creation", "deletion", "info"},
}
LOGGERS = ("issuer", "uvicorn", "uvicorn.error", "uvicorn.access")


class Stderr:
    """What the process wrote to stderr, as parsed lines."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]

    def audit(self, action: str, outcome: str | None = None) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines()
            if line.get("event", {}).get("action") == action and outcome in (None, line["event"]["outcome"])
        ]

    def one(self, action: str, outcome: str | None = None) -> dict[str, Any]:
        found = self.audit(action, outcome)
        assert len(found) == 1, (action, outcome, found)
        return found[0]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stderr]:
    """stderr captured, and logging configured as ``issuer serve`` configures it (restored afterwards)."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in map(logging.getLogger, LOGGERS)]
    logging.config.dictConfig(uvicorn_log_config())
    try:
        yield Stderr(stream)
    finally:
        for logger, handlers, level, propagate, disabled in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
            logger.disabled = disabled


@pytest.fixture
def no_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON stderr handler gets each audit line through ``write_line``, never as a ``LogRecord`` to format.

    (pytest 9 also hangs its capture handlers on non-propagating loggers such as ``issuer``; those get records,
    which is the path for every handler other than the JSON stream.)"""
    emit = JsonStreamHandler.emit

    def refuse_audit_records(self: JsonStreamHandler, record: logging.LogRecord) -> None:
        assert record.name != "issuer.audit", "an audit line reached the JSON stream as a LogRecord"
        emit(self, record)

    monkeypatch.setattr(JsonStreamHandler, "emit", refuse_audit_records)


def check_shape(line: dict[str, Any]) -> None:
    """What every line has, whatever its action: the ecs-logging header in order, and ECS categorization."""
    assert list(line)[:4] == HEADER
    assert TIMESTAMP.fullmatch(line["@timestamp"])
    assert line["ecs.version"] == ECS_VERSION
    assert line["log"] == {"logger": "issuer.audit"}
    assert isinstance(line["message"], str)
    assert line["message"]
    event = line["event"]
    assert event["kind"] in ("event", "alert")
    assert event["outcome"] in ("success", "failure", "unknown")
    assert event["category"]
    assert event["type"]
    for category in event["category"]:
        assert set(event["type"]) <= EXPECTED_TYPES[category], (category, event)


async def test_each_action_is_one_ecs_line_on_stderr(
    settings: Settings, clock: FakeClock, stderr: Stderr, no_records: None
) -> None:
    configured = with_settings(settings, login_lockout_threshold=1, refresh_reuse_grace=0)
    async with running_issuer(configured, clock) as harness, harness.client(ip=IP) as client:
        client.headers["User-Agent"] = AGENT
        user_id = (await register(client))["id"]
        assert_error(
            await client.post("/auth/login", json={"email": "alice@example.com", "password": WRONG}),
            401,
            "invalid_credentials",
        )
        locked = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
        assert_error(locked, 429, "too_many_requests")
        clock.advance(int(locked.headers["retry-after"]))

        tokens = await login(client)
        sid = jwt_claims(tokens["access_token"])["sid"]
        rotated = await refresh_body(client, tokens["refresh_token"])
        assert rotated.status_code == 200
        assert_error(await refresh_body(client, tokens["refresh_token"]), 401, "invalid_grant")  # reuse
        assert_error(await refresh_body(client, "A" * 43), 401, "invalid_grant")  # unknown
        assert_error(await client.post("/auth/refresh"), 401, "invalid_grant")  # none presented

        second = await login(client)
        assert (await client.post("/auth/logout", json={"refresh_token": second["refresh_token"]})).status_code == 204
        third, fourth = await login(client), await login(client)
        third_sid = jwt_claims(third["access_token"])["sid"]
        assert (
            await client.delete(f"/auth/sessions/{third_sid}", headers=bearer(fourth["access_token"]))
        ).status_code == 204
        assert (await client.post("/auth/logout-all", headers=bearer(fourth["access_token"]))).status_code == 204

        clock.advance(3600)  # the failed deletion below must not run into the lock-out of the failed login
        fifth = await login(client)
        wrong = await client.request(
            "DELETE", "/auth/account", headers=bearer(fifth["access_token"]), json={"password": WRONG}
        )
        assert_error(wrong, 403, "invalid_credentials")
        clock.advance(3600)
        sixth = await login(client)
        gone = await client.request(
            "DELETE", "/auth/account", headers=bearer(sixth["access_token"]), json={"password": PASSWORD}
        )
        assert gone.status_code == 204

        old = harness.services.keys.signing_key(clock())
        assert old is not None
        rotation = await harness.services.keys.rotate()
        assert rotation.insert is not None
        await harness.services.keys.revoke(old.record.kid)

    lines = [line for line in stderr.lines() if line["log"]["logger"] == "issuer.audit"]
    assert lines
    for line in lines:
        check_shape(line)
    client_lines = [line for line in lines if not line["event"]["action"].startswith("key_")]
    for line in client_lines:
        assert line.get("source", {"ip": IP}) == {"ip": IP}

    register_line = stderr.one("register")
    assert register_line["event"]["category"] == ["iam"]
    assert register_line["event"]["type"] == ["user", "creation"]
    assert register_line["event"]["outcome"] == "success"
    assert register_line["user"] == {"id": user_id}
    assert register_line["user_agent"] == {"original": AGENT}
    assert register_line["log.level"] == "info"

    failed = stderr.one("login", "failure")
    assert failed["event"]["category"] == ["authentication", "session"]
    assert failed["source"] == {"ip": IP}
    assert failed["user_agent"] == {"original": AGENT}
    assert "user" not in failed  # the account is not named: a failure must not tell which emails exist

    assert stderr.one("login_locked")["event"]["outcome"] == "failure"

    logins = stderr.audit("login", "success")
    assert len(logins) == 6
    assert logins[0]["user"] == {"id": user_id}
    assert logins[0]["issuer"] == {"session_id": sid}
    assert logins[0]["event"]["type"] == ["start"]

    refreshed = stderr.one("refresh", "success")
    assert refreshed["event"]["category"] == ["authentication", "session"]
    assert refreshed["user"] == {"id": user_id}
    assert refreshed["source"] == {"ip": IP}
    assert refreshed["user_agent"] == {"original": AGENT}
    assert refreshed["issuer"] == {"session_id": sid, "replayed": False}

    refusals = stderr.audit("refresh", "failure")
    assert len(refusals) == 3  # reuse, unknown, none presented: every refresh request is a line
    assert all(line["event"]["reason"] for line in refusals)
    assert all("user" not in line for line in refusals)

    reuse = stderr.one("refresh_reuse")
    assert reuse["log.level"] == "warning"
    assert reuse["event"]["kind"] == "alert"
    assert reuse["event"]["outcome"] == "failure"
    assert reuse["event"]["type"] == ["end"]
    assert reuse["user"] == {"id": user_id}
    assert reuse["issuer"] == {"session_id": sid}
    assert reuse["user_agent"] == {"original": AGENT}

    assert stderr.one("logout")["issuer"] == {"session_id": jwt_claims(second["access_token"])["sid"]}
    revoked = stderr.one("session_revoked")
    assert (revoked["user"], revoked["issuer"]) == ({"id": user_id}, {"session_id": third_sid})
    assert stderr.one("logout_all")["user"] == {"id": user_id}
    assert stderr.one("account_deleted", "failure")["user"] == {"id": user_id}
    deleted = stderr.one("account_deleted", "success")
    assert deleted["user"] == {"id": user_id}
    assert deleted["event"]["type"] == ["user", "deletion"]

    created = stderr.one("key_created")
    assert created["event"]["category"] == ["configuration"]
    assert created["issuer"]["kid"] == old.record.kid
    rotated_key = stderr.one("key_rotated")
    assert rotated_key["issuer"] == {"kid": rotation.insert.kid, "immediate": False}
    assert stderr.one("key_revoked")["issuer"] == {"kid": old.record.kid}

    # No password and no token anywhere on the stream.
    secrets_ = [PASSWORD, WRONG]
    for pair in (tokens, second, third, fourth, fifth, sixth):
        secrets_ += [pair["refresh_token"], pair["access_token"], pair["access_token"].rsplit(".", 1)[1]]
    secrets_.append(rotated.json()["refresh_token"])
    for secret in secrets_:
        assert secret not in stderr.text


async def test_rate_limited_is_a_line(settings: Settings, clock: FakeClock, stderr: Stderr) -> None:
    configured = with_settings(settings, rate_limit_per_ip=1)
    async with running_issuer(configured, clock, monotonic=clock.monotonic) as harness, harness.client(ip=IP) as client:
        for _ in range(3):
            await client.post("/auth/refresh", json={"refresh_token": "A" * 43})
    line = stderr.audit("rate_limited")[0]
    check_shape(line)
    assert line["event"]["outcome"] == "failure"
    assert line["event"]["category"] == ["network"]
    assert line["source"] == {"ip": IP}
    assert line["issuer"] == {"route": "refresh"}


def test_audit_lines_keep_their_place_among_uvicorns(stderr: Stderr, no_records: None) -> None:
    """One stream, one lock: uvicorn's records and the audit lines come out in the order they were made."""
    server = logging.getLogger("uvicorn.error")
    server.info("before")
    audit("logout", "success", session_id="s-1")
    server.info("after")
    audit("logout_all", "success", user_id="u-1")
    messages = [line["message"] for line in stderr.lines()]
    assert messages == ["before", "logout", "after", "logout everywhere"]
    assert stderr.lines()[0]["log"] == {"logger": "uvicorn.error"}
    assert list(stderr.lines()[0])[:4] == HEADER


def test_client_text_cannot_split_or_forge_a_line(stderr: Stderr) -> None:
    forged = '\n{"event": {"action": "login", "outcome": "success"}}\u2028\u0085\r'
    audit("login", "failure", ip="192.0.2.1", user_agent=forged, reason=forged)
    [line] = stderr.text.splitlines()
    parsed = json.loads(line)
    assert parsed["user_agent"] == {"original": forged}
    assert parsed["event"]["reason"] == forged
    assert stderr.text.isascii()


def test_secret_named_fields_are_never_written(stderr: Stderr) -> None:
    audit("refresh", "success", user_id="u-1", refresh_token="tok-123", password="pw-123", route="refresh")
    [line] = stderr.lines()
    assert line["issuer"] == {"route": "refresh"}
    assert "tok-123" not in stderr.text
    assert "pw-123" not in stderr.text


def test_level_and_disabled_logger_are_honoured(stderr: Stderr) -> None:
    logger = logging.getLogger("issuer.audit")
    logger.setLevel(logging.WARNING)
    try:
        audit("logout", "success")  # info: below the level
        audit("refresh_reuse", "failure")  # warning
    finally:
        logger.setLevel(logging.NOTSET)
    assert [line["event"]["action"] for line in stderr.lines()] == ["refresh_reuse"]


def test_other_handlers_get_a_record_carrying_the_line(caplog: pytest.LogCaptureFixture) -> None:
    """pytest's capture, the CLI's plain-text handler, an operator's own: an ordinary record, with the same line."""
    caplog.set_level(logging.INFO, logger="issuer.audit")
    audit("session_revoked", "success", user_id="u-1", session_id="s-1", kid="k-1")
    [record] = caplog.records
    assert (record.event, record.outcome, record.user_id, record.session_id) == (  # type: ignore[attr-defined]
        "session_revoked",
        "success",
        "u-1",
        "s-1",
    )
    assert record.getMessage() == "session revoked"
    parsed = json.loads(record.ecs_line)  # type: ignore[attr-defined]
    assert parsed["event"]["action"] == "session_revoked"
    assert parsed["issuer"] == {"session_id": "s-1", "kid": "k-1"}
