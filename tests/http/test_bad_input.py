"""Bad input at every body-reading endpoint: the contract's error shape, never a 500, and nothing written."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from starlette.types import Message

from issuer.storage.schema import families, refresh_tokens, users
from tests.support.http import PASSWORD, assert_error, bearer, login, refresh_body, register
from tests.support.issuer import IssuerHarness

ALICE = "alice@example.com"
MAX_BODY = 16 * 1024

ENDPOINTS: dict[str, tuple[str, str]] = {
    "register": ("POST", "/auth/register"),
    "login": ("POST", "/auth/login"),
    "refresh": ("POST", "/auth/refresh"),
    "logout": ("POST", "/auth/logout"),
    "account": ("DELETE", "/auth/account"),
}
# Endpoints where an empty body is itself a mistake (refresh and logout fall back to the cookie).
BODY_REQUIRED = ("register", "login", "account")


@dataclass(frozen=True)
class Seed:
    access: str
    refresh: str


@pytest.fixture
async def seed(client: httpx.AsyncClient) -> Seed:
    """One user with one live session, so a wrongly accepted request would have something to write to."""
    await register(client)
    tokens = await login(client)
    return Seed(tokens["access_token"], tokens["refresh_token"])


async def snapshot(issuer: IssuerHarness) -> dict[str, Any]:
    """Everything a write could change: row counts, revocations, consumptions, versions, last use."""
    queries = {
        "users": select(func.count()).select_from(users),
        "families": select(func.count()).select_from(families),
        "tokens": select(func.count()).select_from(refresh_tokens),
        "revoked": select(func.count()).select_from(families).where(families.c.revoked_at.is_not(None)),
        "consumed": select(func.count()).select_from(refresh_tokens).where(refresh_tokens.c.consumed_at.is_not(None)),
        "versions": select(func.coalesce(func.sum(users.c.token_version), 0)),
        "last_used": select(func.max(families.c.last_used_at)),
        "emails": select(func.string_agg(users.c.email, ",")),
    }
    result: dict[str, Any] = {}
    async with issuer.engine.connect() as conn:
        for name, query in queries.items():
            result[name] = (await conn.execute(query)).scalar_one()
    return result


async def send(
    client: httpx.AsyncClient,
    endpoint: str,
    seed: Seed,
    *,
    content: bytes | AsyncIterator[bytes] | None = None,
    json_body: Any = None,
    content_type: str | None = "application/json",
) -> httpx.Response:
    """Send a body to an endpoint, with credentials the endpoint could misuse if it ignored the bad body."""
    method, path = ENDPOINTS[endpoint]
    headers: dict[str, str] = {}
    if endpoint == "account":
        headers.update(bearer(seed.access))
    if endpoint in ("refresh", "logout"):
        # If the bad body were skipped and the cookie used instead, the token would be rotated or revoked.
        headers["Cookie"] = f"refresh_token={seed.refresh}"
    if json_body is not None:
        content = json.dumps(json_body).encode()
    if content_type is not None:
        headers["Content-Type"] = content_type
    client.cookies.clear()
    return await client.request(method, path, content=content, headers=headers)


async def assert_rejected_without_writes(
    issuer: IssuerHarness,
    client: httpx.AsyncClient,
    endpoint: str,
    seed: Seed,
    *,
    status: int = 400,
    label: object = None,
    **request: Any,
) -> httpx.Response:
    before = await snapshot(issuer)
    response = await send(client, endpoint, seed, **request)
    assert response.status_code == status, (endpoint, label, response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error", "error_description"}, (label, body)
    if status == 400:
        assert body["error"] == "invalid_request", (label, body)
    assert isinstance(body["error_description"], str)
    assert body["error_description"]
    assert "set-cookie" not in response.headers
    assert await snapshot(issuer) == before, label
    return response


async def assert_seed_intact(client: httpx.AsyncClient, seed: Seed) -> None:
    assert (await client.get("/auth/me", headers=bearer(seed.access))).status_code == 200
    assert (await refresh_body(client, seed.refresh)).status_code == 200


def valid_body(endpoint: str, seed: Seed) -> dict[str, Any]:
    return {
        "register": {"email": "new@example.com", "password": PASSWORD},
        "login": {"email": ALICE, "password": PASSWORD},
        "refresh": {"refresh_token": seed.refresh},
        "logout": {"refresh_token": seed.refresh},
        "account": {"password": PASSWORD},
    }[endpoint]


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` plus a padding member, serialized to exactly ``size`` bytes."""
    skeleton = json.dumps({**body, "pad": ""}).encode()
    filler = size - len(skeleton)
    assert filler >= 0
    encoded = json.dumps({**body, "pad": "x" * filler}).encode()
    assert len(encoded) == size
    return encoded


# ---------------------------------------------------------------- bodies that are not one JSON object

NOT_AN_OBJECT = {
    "not-json": b"{not json",
    "truncated": b'{"email": "a@x.io"',
    "trailing-comma": b'{"email": "a@x.io",}',
    "single-quotes": b"{'email': 'a@x.io'}",
    "array": b"[]",
    "array-of-object": b'[{"email": "alice@example.com", "password": "correct horse battery"}]',
    "string": b'"alice@example.com"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "nan": b'{"email": NaN, "password": NaN}',
    "infinity": b'{"refresh_token": Infinity}',
    "not-utf8": b'{"email": "\xff\xfe@x.io"}',
    "binary": bytes(range(256)),
    "deep": b'{"email": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "huge-int": b'{"email": ' + b"9" * 5000 + b"}",
    "two-objects": b'{"email": "a@x.io"} {"email": "b@x.io"}',
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_body_that_is_not_a_json_object(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str
) -> None:
    for name, content in NOT_AN_OBJECT.items():
        await assert_rejected_without_writes(issuer, client, endpoint, seed, content=content, label=name)
    await assert_seed_intact(client, seed)


@pytest.mark.parametrize("endpoint", BODY_REQUIRED)
@pytest.mark.parametrize("content", [b"", b"   \n"])
async def test_empty_body(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str, content: bytes
) -> None:
    await assert_rejected_without_writes(issuer, client, endpoint, seed, content=content)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_non_json_content_type_is_refused(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str
) -> None:
    """A well-formed body under a form content type: what a cross-site form could send without a preflight."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "text/json"):
        await assert_rejected_without_writes(
            issuer, client, endpoint, seed, json_body=valid_body(endpoint, seed), content_type=content_type
        )
    await assert_seed_intact(client, seed)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json", None])
async def test_json_content_type_variants_are_accepted(
    client: httpx.AsyncClient, seed: Seed, content_type: str | None
) -> None:
    response = await send(
        client, "login", seed, json_body={"email": ALICE, "password": PASSWORD}, content_type=content_type
    )
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- size limits


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
@pytest.mark.parametrize("size", [1024 * 1024, MAX_BODY + 1])
async def test_oversized_body_is_413(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str, size: int
) -> None:
    # A well-formed, otherwise valid body: only its size is wrong.
    content = padded(valid_body(endpoint, seed), size)
    await assert_rejected_without_writes(issuer, client, endpoint, seed, content=content, status=413)
    await assert_seed_intact(client, seed)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
async def test_oversized_streamed_body_without_length_is_413(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str
) -> None:
    content = padded(valid_body(endpoint, seed), 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(content), 4096):
            yield content[start : start + 4096]

    response = await assert_rejected_without_writes(issuer, client, endpoint, seed, content=chunks(), status=413)
    assert "content-length" not in response.request.headers
    await assert_seed_intact(client, seed)


async def test_body_of_exactly_16_kib_is_accepted(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    content = padded({"email": "edge@example.com", "password": PASSWORD}, MAX_BODY)
    response = await client.post("/auth/register", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 201, response.text
    await login(client, "edge@example.com")


# ---------------------------------------------------------------- field types and missing fields

WRONG_TYPES: list[Any] = [1, 1.5, None, True, [], ["alice@example.com"], {"email": "a@x.io"}]


@pytest.mark.parametrize("field", ["email", "password"])
@pytest.mark.parametrize("endpoint", ["register", "login"])
async def test_wrong_types_for_credentials(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str, field: str
) -> None:
    for value in WRONG_TYPES:
        body = {"email": "new@example.com" if endpoint == "register" else ALICE, "password": PASSWORD, field: value}
        await assert_rejected_without_writes(issuer, client, endpoint, seed, json_body=body, label=value)


@pytest.mark.parametrize("endpoint", ["refresh", "logout"])
async def test_wrong_types_for_refresh_token(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str
) -> None:
    for value in [*WRONG_TYPES, [seed.refresh], {"token": seed.refresh}]:
        body = {"refresh_token": value}
        await assert_rejected_without_writes(issuer, client, endpoint, seed, json_body=body, label=value)
    await assert_seed_intact(client, seed)


async def test_wrong_types_for_account_password(issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed) -> None:
    for value in [*WRONG_TYPES, [PASSWORD]]:
        body = {"password": value}
        await assert_rejected_without_writes(issuer, client, "account", seed, json_body=body, label=value)
    await assert_seed_intact(client, seed)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("register", {}),
        ("register", {"email": "new@example.com"}),
        ("register", {"password": PASSWORD}),
        ("register", {"Email": "new@example.com", "Password": PASSWORD}),
        ("login", {}),
        ("login", {"email": ALICE}),
        ("login", {"password": PASSWORD}),
        ("login", {"token_transport": "body"}),
        ("account", {}),
        ("account", {"Password": PASSWORD}),
        ("account", {"email": ALICE}),
    ],
)
async def test_missing_fields(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str, body: dict[str, Any]
) -> None:
    await assert_rejected_without_writes(issuer, client, endpoint, seed, json_body=body)
    await assert_seed_intact(client, seed)


async def test_a_client_that_disconnects_mid_body_is_a_quiet_400(
    issuer: IssuerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """Headers announce 100 bytes, one arrives, the socket closes: no 500 and no traceback in the log."""
    messages: list[Message] = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/auth/login",
        "raw_path": b"/auth/login",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"100")],
        "client": ("192.0.2.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await issuer.app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 400
    assert b"invalid_request" in b"".join(m.get("body", b"") for m in sent[1:])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


async def test_unknown_token_transport(issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed) -> None:
    for transport in ["Cookie", "BODY", "bearer", "header", "", " body", "body ", None, 0, 1, True, [], ["body"], {}]:
        body = {"email": ALICE, "password": PASSWORD, "token_transport": transport}
        await assert_rejected_without_writes(issuer, client, "login", seed, json_body=body, label=transport)
        # Wrong credentials too: the transport is checked either way.
        body["password"] = "wrong password"
        await assert_rejected_without_writes(issuer, client, "login", seed, json_body=body, label=transport)


async def test_unknown_members_are_ignored(client: httpx.AsyncClient) -> None:
    body = {"email": "extra@example.com", "password": PASSWORD, "role": "admin", "id": "x", "token_version": -1}
    response = await client.post("/auth/register", json=body)
    assert response.status_code == 201
    user = response.json()["user"]
    assert user["role"] == "user"
    assert user["id"] != "x"


# ---------------------------------------------------------------- emails


def email_of_length(length: int, char: str = "a") -> str:
    domain = "@example.com"
    return char * (length - len(domain)) + domain


async def test_email_length_limit_in_code_points(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    seed_user = await register(client, "seed@example.com")
    del seed_user
    for too_long in (email_of_length(255), email_of_length(255, "ü"), "ü" * 200 + "@" + "ä" * 54, "x" * 10_000):
        before = await snapshot(issuer)
        response = await client.post("/auth/register", json={"email": too_long, "password": PASSWORD})
        assert_error(response, 400, "invalid_request")
        assert await snapshot(issuer) == before
        login_attempt = await client.post("/auth/login", json={"email": too_long, "password": PASSWORD})
        assert_error(login_attempt, 400, "invalid_request")
        assert await snapshot(issuer) == before

    # The limit is counted in code points; RFC 5321's limit of 254 octets (in UTF-8, RFC 6531) holds too, so an
    # address with non-ASCII characters reaches it sooner: 254 "ü" are refused, and say why.
    for too_many_bytes in (email_of_length(254, "ü"), email_of_length(134, "ü")):
        response = await client.post("/auth/register", json={"email": too_many_bytes, "password": PASSWORD})
        assert_error(response, 400, "invalid_request")
        assert "too long" in response.json()["error_description"]
    for email in (email_of_length(254), email_of_length(133, "ü")):  # 254 octets each
        assert len(email.encode()) == 254
        user = await register(client, email)
        assert user["email"] == email
        tokens = await login(client, email)
        me = await client.get("/auth/me", headers=bearer(tokens["access_token"]))
        assert me.json()["email"] == email


async def test_email_is_trimmed_before_its_length_is_counted(client: httpx.AsyncClient) -> None:
    email = email_of_length(254)
    user = await register(client, f"  {email}\t ")
    assert user["email"] == email


async def test_unicode_email_registers_and_logs_in(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    user = await register(client, "üser@exämple.de")
    assert user["email"] == "üser@exämple.de"
    tokens = await login(client, "üser@exämple.de")
    assert (await client.get("/auth/me", headers=bearer(tokens["access_token"]))).json()["email"] == "üser@exämple.de"
    # Case-insensitive beyond ASCII too.
    await login(client, "ÜSER@EXÄMPLE.DE")
    duplicate = await client.post("/auth/register", json={"email": "ÜSER@EXÄMPLE.DE", "password": PASSWORD})
    assert_error(duplicate, 409, "email_taken")
    assert (await snapshot(issuer))["users"] == 1


async def test_canonically_equivalent_emails_are_one_address(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    composed = "\u00fcser@ex\u00e4mple.de"  # ü and ä as single code points (NFC)
    decomposed = "u\u0308ser@exa\u0308mple.de"  # the same letters as base + combining diaeresis (NFD)
    user = await register(client, decomposed)
    assert user["email"] == composed
    duplicate = await client.post("/auth/register", json={"email": composed, "password": PASSWORD})
    assert_error(duplicate, 409, "email_taken")
    assert (await snapshot(issuer))["users"] == 1
    await login(client, composed)
    await login(client, decomposed.upper())


BAD_EMAILS = [
    "",
    " ",
    "@",
    "alice.example.com",
    "alice",
    "a@b@example.com",
    "alice@@example.com",
    "@example.com",
    "  @example.com",
    "alice@",
    "alice@  ",
    "a b@example.com",
    "alice@exa mple.com",
    "alice\x00@example.com",
    "alice@example.com\x00",
    "ali\nce@example.com",
    "alice@example.com\r\nX-Injected: 1",
    "\ud800@example.com",
]


@pytest.mark.parametrize("endpoint", ["register", "login"])
async def test_malformed_emails(issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str) -> None:
    for email in BAD_EMAILS:
        body = json.dumps({"email": email, "password": PASSWORD}).encode()
        await assert_rejected_without_writes(issuer, client, endpoint, seed, content=body, label=email)


# ---------------------------------------------------------------- passwords


async def test_register_rejects_bad_passwords(issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed) -> None:
    for password in ("a" * 7, "é" * 7, "😀" * 7, "a" * 1025, "é" * 1025, "😀" * 1025, "", "\ud800" * 8):
        body = json.dumps({"email": "new@example.com", "password": password}).encode()
        label = (password[:3], len(password))
        await assert_rejected_without_writes(issuer, client, "register", seed, content=body, label=label)


@pytest.mark.parametrize("password", ["a" * 8, "é" * 8, "😀" * 8, "a" * 1024, "é" * 1024, "😀" * 1024], ids=len)
async def test_register_accepts_password_lengths(client: httpx.AsyncClient, password: str) -> None:
    await register(client, "new@example.com", password)
    await login(client, "new@example.com", password)
    wrong = await client.post("/auth/login", json={"email": "new@example.com", "password": password[:-1]})
    assert_error(wrong, 401, "invalid_credentials")


@pytest.mark.parametrize("password", ["a" * 1025, "\ud800" * 8, "ok" + "\udfff" + "password"], ids=repr)
@pytest.mark.parametrize("endpoint", ["login", "account"])
async def test_unusable_passwords_at_login_and_deletion(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, endpoint: str, password: str
) -> None:
    body: dict[str, Any] = {"password": password}
    if endpoint == "login":
        body["email"] = ALICE
    await assert_rejected_without_writes(issuer, client, endpoint, seed, content=json.dumps(body).encode())
    await assert_seed_intact(client, seed)


# ---------------------------------------------------------------- SQL-looking data is just data


async def test_sql_looking_email_is_ordinary_data(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    # SQL in the characters RFC 5322 allows in a local part (addresses outside it get 400: the next test).
    emails = ("drop'/**/table/**/users--@x.io", "'or'1'='1@x.io", "x'--@x.io", "x'||'1@x.io", "Robert'}{--@x.io")
    for email in emails:
        user = await register(client, email, "' OR 1=1 --")
        assert user["email"] == email.lower()
        tokens = await login(client, email, "' OR 1=1 --")
        me = await client.get("/auth/me", headers=bearer(tokens["access_token"]))
        assert me.json()["email"] == email.lower()
        assert_error(
            await client.post("/auth/login", json={"email": email, "password": "' OR '1'='1"}),
            401,
            "invalid_credentials",
        )
    # The table and the first account are still there.
    await login(client)
    assert (await snapshot(issuer))["users"] == 1 + len(emails)


@pytest.mark.parametrize("email", ["' OR 1=1 --@x.io", "a@x.io'; DROP TABLE users;--"])
async def test_sql_looking_email_with_spaces(issuer: IssuerHarness, client: httpx.AsyncClient, email: str) -> None:
    """Either refused as a malformed email (nothing written) or stored verbatim; never interpreted."""
    await register(client)
    before = await snapshot(issuer)
    response = await client.post("/auth/register", json={"email": email, "password": PASSWORD})
    if response.status_code == 400:
        assert_error(response, 400, "invalid_request")
        assert await snapshot(issuer) == before
    else:
        assert response.status_code == 201, response.text
        assert response.json()["user"]["email"] == email.lower()
        await login(client, email)
    await login(client)
    assert (await snapshot(issuer))["users"] >= 1


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("alice@example.com' --", "anything at all"),
        ("alice@example.com'--", "' OR '1'='1"),
        ("x@x' OR '1'='1", "' OR '1'='1"),
        ('alice@example.com" OR ""="', '" OR ""="'),
        ("alice@example.com", "' OR '1'='1"),
        ("alice@example.com", "anything' OR 'x'='x"),
        ("%@example.com", PASSWORD),
        ("_lice@example.com", PASSWORD),
        ("ALICE@EXAMPLE.COM%", PASSWORD),
    ],
)
async def test_sql_looking_login_never_succeeds(
    issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, email: str, password: str
) -> None:
    before = await snapshot(issuer)
    response = await client.post("/auth/login", json={"email": email, "password": password})
    assert response.status_code in (400, 401), response.text
    assert response.json()["error"] in ("invalid_request", "invalid_credentials")
    assert await snapshot(issuer) == before


# ---------------------------------------------------------------- odd refresh tokens


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: "' OR 1=1 --",
        lambda t: t + "' OR '1'='1",
        lambda t: t + "\n",
        lambda t: t + "\x00",
        lambda t: "ü" * 43,
        lambda t: t[:42] + "ü",
        lambda t: t * 200,  # long, yet under the 16 KiB body limit
        lambda t: t + "=",
        lambda t: t.upper() if t.upper() != t else t.lower(),
        lambda t: " " + t,
    ],
    ids=["sql", "sql-suffix", "newline", "nul", "unicode", "unicode-last", "long", "padding", "case", "space"],
)
async def test_odd_refresh_tokens(issuer: IssuerHarness, client: httpx.AsyncClient, seed: Seed, mangle: Any) -> None:
    presented = mangle(seed.refresh)
    before = await snapshot(issuer)
    client.cookies.clear()
    response = await client.post("/auth/refresh", content=json.dumps({"refresh_token": presented}).encode())
    assert_error(response, 401, "invalid_grant")
    assert await snapshot(issuer) == before
    out = await client.post("/auth/logout", content=json.dumps({"refresh_token": presented}).encode())
    assert out.status_code == 204
    assert await snapshot(issuer) == before
    await assert_seed_intact(client, seed)


async def test_long_user_agent_is_stored_truncated(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    await register(client)
    response = await client.post(
        "/auth/login",
        json={"email": ALICE, "password": PASSWORD, "token_transport": "body"},
        headers={"User-Agent": "u" * 10_000},
    )
    assert response.status_code == 200
    sessions = await client.get("/auth/sessions", headers=bearer(response.json()["access_token"]))
    agent = sessions.json()["sessions"][0]["user_agent"]
    assert agent == "u" * len(agent)
    assert 0 < len(agent) <= 512


async def test_a_password_matches_in_any_unicode_normal_form(client: httpx.AsyncClient) -> None:
    """NIST SP 800-63B: 'é' typed precomposed or as 'e' + combining accent is the same password."""
    composed, decomposed = "caf\u00e9 au lait", "cafe\u0301 au lait"
    assert composed != decomposed
    response = await client.post("/auth/register", json={"email": "nfkc@example.com", "password": composed})
    assert response.status_code == 201, response.text
    login = await client.post("/auth/login", json={"email": "nfkc@example.com", "password": decomposed})
    assert login.status_code == 200, login.text
