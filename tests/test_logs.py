"""Logs never carry passwords, access tokens or refresh tokens, in the message or in any extra attribute; and
every line, not only the audit trail's, is one ECS object (the audit lines' own shape: tests/test_audit.py)."""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
from collections.abc import Iterator
from datetime import timedelta
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest

from issuer.logs import ECS_VERSION, JsonFormatter
from issuer.settings import encode_kek
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness

WRONG_PASSWORD = "Tr0ub4dor&3 wrong guess"
SECOND_PASSWORD = "a second very secret passphrase"


class RecordDumper(logging.Handler):
    """Formats each record with every attribute it carries, so extras are searched too."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        line = self.format(record)
        self.lines.append(f"{line} {record.__dict__!r}")
        for value in record.__dict__.values():
            self.lines.append(str(value))
            self.lines.append(repr(value))
        if record.args:
            self.lines.append(repr(record.args))


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[RecordDumper]:
    """DEBUG everywhere: the root logger, and every logger that exists now with its own level."""
    caplog.set_level(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    previous = {logger: logger.level for logger in loggers}
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    dumper = RecordDumper()
    logging.root.addHandler(dumper)
    try:
        yield dumper
    finally:
        logging.root.removeHandler(dumper)
        for logger, level in previous.items():
            logger.setLevel(level)


def cookie_token(response: httpx.Response) -> str:
    cookie = SimpleCookie()
    for header in response.headers.get_list("set-cookie"):
        cookie.load(header)
    return cookie["refresh_token"].value


async def test_no_secrets_in_logs(
    client: httpx.AsyncClient, issuer: IssuerHarness, captured: RecordDumper, caplog: pytest.LogCaptureFixture
) -> None:
    passwords = [PASSWORD, WRONG_PASSWORD, SECOND_PASSWORD]
    access_tokens: list[str] = []
    refresh_tokens: list[str] = []

    user = await register(client)
    await register(client, email="bob@example.com", password=SECOND_PASSWORD)

    failed = await client.post("/auth/login", json={"email": "alice@example.com", "password": WRONG_PASSWORD})
    assert_error(failed, 401, "invalid_credentials")
    unknown = await client.post("/auth/login", json={"email": "nobody@example.com", "password": WRONG_PASSWORD})
    assert_error(unknown, 401, "invalid_credentials")

    # Body transport.
    body = await login(client)
    access_tokens.append(body["access_token"])
    refresh_tokens.append(body["refresh_token"])

    # Cookie transport, and a cookie refresh.
    cookie_login = await client.post("/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
    assert cookie_login.status_code == 200
    access_tokens.append(cookie_login.json()["access_token"])
    refresh_tokens.append(cookie_token(cookie_login))
    cookie_refresh = await client.post("/auth/refresh")
    assert cookie_refresh.status_code == 200, cookie_refresh.text
    access_tokens.append(cookie_refresh.json()["access_token"])
    refresh_tokens.append(cookie_token(cookie_refresh))

    # Body refresh, then reuse of the consumed token after the grace window: theft detection.
    rotated = await refresh_body(client, body["refresh_token"])
    assert rotated.status_code == 200
    access_tokens.append(rotated.json()["access_token"])
    refresh_tokens.append(rotated.json()["refresh_token"])
    issuer.clock.advance(issuer.services.settings.refresh_reuse_grace + 1)
    assert_error(await refresh_body(client, body["refresh_token"]), 401, "invalid_grant")
    assert_error(await refresh_body(client, rotated.json()["refresh_token"]), 401, "invalid_grant")
    assert_error(await refresh_body(client, "x" * 43), 401, "invalid_grant")

    # Bearer endpoints with good and bad tokens.
    third = await login(client)
    access_tokens.append(third["access_token"])
    refresh_tokens.append(third["refresh_token"])
    assert (await client.get("/auth/me", headers=bearer(third["access_token"]))).status_code == 200
    assert (await client.get("/auth/sessions", headers=bearer(third["access_token"]))).status_code == 200
    tampered = third["access_token"][:-4] + ("AAAA" if not third["access_token"].endswith("AAAA") else "BBBB")
    assert_error(await client.get("/auth/me", headers=bearer(tampered)), 401, "invalid_token")
    assert_error(await client.get("/auth/me", headers=bearer(third["refresh_token"])), 401, "invalid_token")

    # Logout of one family (body and cookie), then logout everywhere.
    assert (await client.post("/auth/logout", json={"refresh_token": third["refresh_token"]})).status_code == 204
    assert (await client.post("/auth/logout")).status_code == 204
    fourth = await login(client)
    access_tokens.append(fourth["access_token"])
    refresh_tokens.append(fourth["refresh_token"])
    response = await client.post("/auth/logout-all", headers=bearer(fourth["access_token"]))
    assert response.status_code == 204
    assert_error(await client.get("/auth/me", headers=bearer(fourth["access_token"])), 401, "invalid_token")

    # Account deletion: a wrong password first, then the right one.
    fifth = await login(client)
    access_tokens.append(fifth["access_token"])
    refresh_tokens.append(fifth["refresh_token"])
    wrong = await client.request(
        "DELETE", "/auth/account", headers=bearer(fifth["access_token"]), json={"password": WRONG_PASSWORD}
    )
    assert_error(wrong, 403, "invalid_credentials")
    deleted = await client.request(
        "DELETE", "/auth/account", headers=bearer(fifth["access_token"]), json={"password": PASSWORD}
    )
    assert deleted.status_code == 204
    assert_error(await refresh_body(client, fifth["refresh_token"]), 401, "invalid_grant")

    secrets_: dict[str, str] = {}
    for index, password in enumerate(passwords):
        secrets_[f"password {index}"] = password
    for index, token in enumerate(access_tokens):
        header, payload, signature = token.split(".")
        secrets_[f"access token {index}"] = token
        secrets_[f"access token {index} signature"] = signature
        secrets_[f"access token {index} signing input"] = f"{header}.{payload}"
    for index, token in enumerate(refresh_tokens):
        secrets_[f"refresh token {index}"] = token
    secrets_["tampered token signature"] = tampered.rsplit(".", 1)[1]
    secrets_["KEK"] = encode_kek(issuer.services.settings.kek.reveal())
    assert len(set(refresh_tokens)) == len(refresh_tokens)

    # The capture works: the audit trail of this flow is in it, with its extras.
    events = {getattr(record, "event", None) for record in captured.records}
    assert {"register", "login", "refresh", "refresh_reuse", "logout", "logout_all", "account_deleted"} <= events
    outcomes = {(getattr(r, "event", None), getattr(r, "outcome", None)) for r in captured.records}
    assert {("login", "failure"), ("refresh", "failure"), ("refresh", "success")} <= outcomes
    assert any(user["id"] in line for line in captured.lines)
    assert caplog.records

    haystacks = {"caplog.text": caplog.text, "record dump": "\n".join(captured.lines)}
    for record in caplog.records:
        haystacks[f"caplog record {record.name}:{record.lineno}"] = f"{record.getMessage()} {record.__dict__!r}"
    for where, text in haystacks.items():
        for name, secret in secrets_.items():
            assert secret not in text, f"{name} appears in {where}"


@pytest.mark.parametrize("separator", ["\u0085", "\u2028", "\u2029", "\n", "\r"])
def test_a_log_entry_is_one_line_whatever_the_client_sent(separator: str) -> None:
    """User agents and emails come from clients: no character in them may split an entry into two lines."""
    formatter = JsonFormatter()
    record = logging.LogRecord("issuer.audit", logging.INFO, __file__, 1, "login failed", (), None)
    record.user_agent = f'evil{separator}{{"event": "login", "user_id": "admin"}}'
    line = formatter.format(record)
    assert line.splitlines() == [line]
    assert json.loads(line)["issuer"]["user_agent"] == record.user_agent


# ---------------------------------------------------------------- the JSON formatter


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("issuer.audit", logging.INFO, __file__, 1, "login %s", ("ok",), None)
    for name, item in extra.items():
        setattr(record, name, item)
    return record


def test_json_formatter_one_line_with_fields() -> None:
    line = JsonFormatter().format(
        _record(event="login", user_id="u-1", family_id="f-1", ip="192.0.2.1", user_agent="UA\nwith newline", n=3)
    )
    assert "\n" not in line
    parsed = json.loads(line)
    assert list(parsed)[:4] == ["@timestamp", "log.level", "message", "ecs.version"]  # the ecs-logging order
    assert parsed["message"] == "login ok"
    assert parsed["log.level"] == "info"
    assert parsed["log"] == {"logger": "issuer.audit"}
    assert parsed["ecs.version"] == ECS_VERSION
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["@timestamp"])
    # Fields ECS does not define stay in the issuer's own namespace, never at the top level.
    assert {"event": "login", "user_id": "u-1", "family_id": "f-1", "ip": "192.0.2.1", "n": 3}.items() <= parsed[
        "issuer"
    ].items()
    assert parsed["issuer"]["user_agent"] == "UA\nwith newline"


def test_json_formatter_timestamp_is_the_records_time_in_utc() -> None:
    record = _record()
    record.created = 1_700_000_000.25  # fixed, not the wall clock
    assert json.loads(JsonFormatter().format(record))["@timestamp"] == "2023-11-14T22:13:20.250Z"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "refresh_token",
        "access_token",
        "token",
        "Authorization",
        "cookie",
        "client_secret",
        "kek",
        "new_password",
    ],
)
def test_json_formatter_drops_secret_named_extras(name: str) -> None:
    secret = secrets.token_urlsafe(24)
    line = JsonFormatter().format(_record(event="login", **{name: secret}))
    parsed = json.loads(line)
    assert name not in parsed["issuer"]
    assert secret not in line
    assert parsed["issuer"]["event"] == "login"


def test_json_formatter_exception_stays_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("issuer", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    error = json.loads(line)["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "boom\nsecond line"
    assert "Traceback" in error["stack_trace"]


def test_json_formatter_non_json_values_become_strings() -> None:
    parsed = json.loads(JsonFormatter().format(_record(when=timedelta(seconds=5), items=[1, 2], nan=float("nan"))))
    assert parsed["issuer"] == {"when": "0:00:05", "items": "[1, 2]", "nan": "nan"}
