"""Configuration from the environment: the contract's defaults, and one clear line for every bad value."""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.requests import Request

from issuer.errors import Forbidden
from issuer.http.requests import check_origin
from issuer.settings import ConfigError, Settings
from tests.support.jwt import b64url

# Required: every environment below has one unless the test is about its absence.
DATABASE_URL = "postgresql://issuer@db.example:5432/issuer"
KEK_RAW = secrets.token_bytes(32)
KEK = b64url(KEK_RAW)
# 32 bytes whose standard base64 is full of '+' and '/', characters base64url does not have.
STANDARD_ALPHABET_KEK = base64.b64encode(b"\xfb\xff\xbf" * 10 + b"\xfb\xff").decode().rstrip("=")


def env(values: dict[str, str] | None = None) -> dict[str, str]:
    """``values`` on top of the one variable without a default."""
    return {"DATABASE_URL": DATABASE_URL, **(values or {})}


def test_origins_are_compared_as_browsers_send_them(dev_kek_path: Path) -> None:
    """A browser's Origin is lower case without a default port: ISSUER_URL and ALLOWED_ORIGINS written
    otherwise must still match it, or the issuer would refuse its own pages."""
    settings = Settings.from_environ(
        env(
            {
                "ISSUER_URL": "https://Issuer.Example.com:443",
                "ISSUER_KEK": KEK,
                "ALLOWED_ORIGINS": "HTTPS://App.Example:443/, http://[::1]:8080, http://localhost:80",
                "TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7, 2001:db8::/32",
            }
        ),
        dev_kek_path=dev_kek_path,
    )
    assert settings.issuer_url == "https://Issuer.Example.com:443"  # the iss claim stays exactly as given
    assert settings.issuer_origin == "https://issuer.example.com"
    assert settings.allowed_origins == ("https://app.example", "http://[::1]:8080", "http://localhost")
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32")
    for origin in ("https://issuer.example.com", "https://app.example", "http://[::1]:8080"):
        check_origin(Request({"type": "http", "headers": [(b"origin", origin.encode())]}), settings)
    with pytest.raises(Forbidden):
        check_origin(Request({"type": "http", "headers": [(b"origin", b"https://issuer.example.com:8443")]}), settings)


@pytest.fixture
def dev_kek_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "dev-kek"


def config_error(environ: dict[str, str], dev_kek_path: Path) -> str:
    """The one-line message of the ConfigError that ``environ`` (exactly that: see ``env``) stops start-up with."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_environ(environ, dev_kek_path=dev_kek_path)
    message = str(caught.value)
    assert message.strip()
    assert "\n" not in message
    assert "\r" not in message
    return message


def test_defaults_match_the_contract(dev_kek_path: Path) -> None:
    settings = Settings.from_environ(env(), dev_kek_path=dev_kek_path)
    assert settings.issuer_url == "http://127.0.0.1:8000"
    assert settings.audience == "api"
    assert settings.database_url == DATABASE_URL
    assert settings.access_token_ttl == 900
    assert settings.refresh_token_ttl == 604800
    assert settings.session_max_age == 2592000
    assert settings.refresh_reuse_grace == 10
    assert settings.cookie_secure is True
    assert settings.clock_leeway == 5
    assert settings.jwks_max_age == 300
    assert settings.key_publish_lead == 2 * 300
    assert settings.key_rotation_interval == 0
    assert settings.allowed_origins == ()
    assert settings.trusted_proxies == ()
    assert settings.kek_is_dev is True
    assert len(settings.kek.reveal()) == 32
    assert dev_kek_path.exists()


def test_publish_lead_defaults_to_twice_the_jwks_max_age(dev_kek_path: Path) -> None:
    settings = Settings.from_environ(env({"JWKS_MAX_AGE": "120"}), dev_kek_path=dev_kek_path)
    assert settings.jwks_max_age == 120
    assert settings.key_publish_lead == 240


def test_explicit_values_are_read(tmp_path: Path, dev_kek_path: Path) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text(KEK + "\n", encoding="ascii")
    settings = Settings.from_environ(
        env(
            {
                "ISSUER_URL": "https://id.example.com",
                "ISSUER_AUDIENCE": "orders",
                "ACCESS_TOKEN_TTL": "60",
                "REFRESH_TOKEN_TTL": "3600",
                "SESSION_MAX_AGE": "7200",
                "REFRESH_REUSE_GRACE": "0",
                "COOKIE_SECURE": "false",
                "CLOCK_LEEWAY": "0",
                "JWKS_MAX_AGE": "60",
                "KEY_PUBLISH_LEAD": "60",
                "ALLOWED_ORIGINS": "https://app.example.com, https://admin.example.com/",
                "ISSUER_KEK_FILE": str(kek_file),
            }
        ),
        dev_kek_path=dev_kek_path,
    )
    assert settings.issuer_url == "https://id.example.com"
    assert settings.audience == "orders"
    assert (settings.access_token_ttl, settings.refresh_token_ttl, settings.session_max_age) == (60, 3600, 7200)
    assert settings.refresh_reuse_grace == 0
    assert settings.cookie_secure is False
    assert settings.clock_leeway == 0
    assert (settings.jwks_max_age, settings.key_publish_lead) == (60, 60)
    assert settings.allowed_origins == ("https://app.example.com", "https://admin.example.com")
    assert settings.kek.reveal() == KEK_RAW
    assert settings.kek_is_dev is False
    assert not dev_kek_path.exists()


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        pytest.param({"ACCESS_TOKEN_TTL": "abc"}, "ACCESS_TOKEN_TTL", id="ttl-not-a-number"),
        pytest.param({"ACCESS_TOKEN_TTL": "1.5"}, "ACCESS_TOKEN_TTL", id="ttl-fraction"),
        pytest.param({"ACCESS_TOKEN_TTL": "15m"}, "ACCESS_TOKEN_TTL", id="ttl-with-unit"),
        pytest.param({"ACCESS_TOKEN_TTL": "0"}, "ACCESS_TOKEN_TTL", id="ttl-zero"),
        pytest.param({"ACCESS_TOKEN_TTL": "-900"}, "ACCESS_TOKEN_TTL", id="ttl-negative"),
        pytest.param(
            {"ACCESS_TOKEN_TTL": "7200", "REFRESH_TOKEN_TTL": "3600"}, "ACCESS_TOKEN_TTL", id="access-over-refresh"
        ),
        pytest.param({"REFRESH_TOKEN_TTL": "0"}, "REFRESH_TOKEN_TTL", id="refresh-ttl-zero"),
        pytest.param({"REFRESH_TOKEN_TTL": "seven days"}, "REFRESH_TOKEN_TTL", id="refresh-ttl-words"),
        pytest.param({"SESSION_MAX_AGE": "-1"}, "SESSION_MAX_AGE", id="session-negative"),
        pytest.param({"REFRESH_REUSE_GRACE": "-1"}, "REFRESH_REUSE_GRACE", id="grace-negative"),
        pytest.param({"CLOCK_LEEWAY": "x"}, "CLOCK_LEEWAY", id="leeway-not-a-number"),
        pytest.param({"JWKS_MAX_AGE": "forever"}, "JWKS_MAX_AGE", id="jwks-max-age-words"),
        pytest.param({"ISSUER_URL": "not a url"}, "ISSUER_URL", id="issuer-not-a-url"),
        pytest.param({"ISSUER_URL": "issuer.example.com"}, "ISSUER_URL", id="issuer-no-scheme"),
        pytest.param({"ISSUER_URL": "ftp://issuer.example.com"}, "ISSUER_URL", id="issuer-ftp"),
        pytest.param({"ISSUER_URL": "https://"}, "ISSUER_URL", id="issuer-no-host"),
        pytest.param({"ISSUER_URL": "https://issuer.example.com/?a=b"}, "ISSUER_URL", id="issuer-query"),
        pytest.param({"ISSUER_URL": "https://issuer.example.com/#x"}, "ISSUER_URL", id="issuer-fragment"),
        pytest.param({"ISSUER_URL": "https://issuer.example.com"}, "ISSUER_KEK", id="https-with-dev-kek"),
        pytest.param({"ISSUER_URL": "HTTPS://issuer.example.com"}, "ISSUER_KEK", id="upper-https-with-dev-kek"),
        pytest.param({"ISSUER_URL": "Https://issuer.example.com"}, "ISSUER_KEK", id="mixed-https-with-dev-kek"),
        pytest.param({"ISSUER_URL": "http://user:pw@issuer.example.com"}, "ISSUER_URL", id="issuer-user-info"),
        pytest.param({"ISSUER_URL": "http://issuer.exa mple.com"}, "ISSUER_URL", id="issuer-space"),
        pytest.param({"ISSUER_URL": "http://issuer.example.com:99999"}, "ISSUER_URL", id="issuer-port-range"),
        pytest.param({"ALLOWED_ORIGINS": "*"}, "ALLOWED_ORIGINS", id="origins-wildcard"),
        pytest.param({"ALLOWED_ORIGINS": "https://app.example, null"}, "ALLOWED_ORIGINS", id="origins-null"),
        pytest.param({"ALLOWED_ORIGINS": "https://app.example/login"}, "ALLOWED_ORIGINS", id="origins-path"),
        pytest.param({"ALLOWED_ORIGINS": "app.example"}, "ALLOWED_ORIGINS", id="origins-no-scheme"),
        pytest.param({"ALLOWED_ORIGINS": "https://u@app.example"}, "ALLOWED_ORIGINS", id="origins-user-info"),
        pytest.param({"TRUSTED_PROXIES": "10.0.0.0/8 192.168.0.0/16"}, "TRUSTED_PROXIES", id="proxies-spaces"),
        pytest.param({"TRUSTED_PROXIES": "10.0.0.1, garbage"}, "TRUSTED_PROXIES", id="proxies-garbage"),
        pytest.param({"TRUSTED_PROXIES": "10.0.0.0/33"}, "TRUSTED_PROXIES", id="proxies-bad-prefix"),
        pytest.param({"COOKIE_SECURE": "maybe"}, "COOKIE_SECURE", id="cookie-secure-maybe"),
        pytest.param({"COOKIE_SECURE": "2"}, "COOKIE_SECURE", id="cookie-secure-2"),
        pytest.param({"JWKS_MAX_AGE": "300", "KEY_PUBLISH_LEAD": "299"}, "KEY_PUBLISH_LEAD", id="lead-below-max-age"),
        pytest.param(
            {"JWKS_MAX_AGE": "900", "KEY_PUBLISH_LEAD": "600"}, "KEY_PUBLISH_LEAD", id="lead-below-raised-age"
        ),
        pytest.param({"DATABASE_URL": "foo"}, "DATABASE_URL", id="database-url-garbage"),
        pytest.param({"DATABASE_URL": "mysql+aiomysql://u@h/db"}, "DATABASE_URL", id="database-url-mysql"),
        pytest.param(
            {"REFRESH_TOKEN_TTL": "90000", "SESSION_MAX_AGE": "3600"}, "REFRESH_TOKEN_TTL", id="refresh-over-session"
        ),
        pytest.param({"KEY_ROTATION_INTERVAL": "60"}, "KEY_ROTATION_INTERVAL", id="rotation-below-lead"),
        pytest.param({"KEY_RELOAD_INTERVAL": "0"}, "KEY_RELOAD_INTERVAL", id="reload-zero"),
        pytest.param({"RATE_LIMIT_PER_IP": "-1"}, "RATE_LIMIT_PER_IP", id="rate-limit-negative"),
        pytest.param({"LOGIN_LOCKOUT_THRESHOLD": "five"}, "LOGIN_LOCKOUT_THRESHOLD", id="lockout-words"),
        pytest.param({"CLEANUP_INTERVAL": "hourly"}, "CLEANUP_INTERVAL", id="cleanup-words"),
        pytest.param({"ARGON2_MEMORY_COST": "1"}, "ARGON2_MEMORY_COST", id="argon2-memory-too-small"),
    ],
)
def test_bad_value_stops_with_one_line_naming_the_variable(
    environ: dict[str, str], variable: str, dev_kek_path: Path
) -> None:
    message = config_error(env(environ), dev_kek_path)
    assert variable in message


@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_database_url_is_required(value: str | None, dev_kek_path: Path) -> None:
    """No default database: an issuer that silently used some other one would lose every session and key."""
    environ = {"ISSUER_KEK": KEK} if value is None else {"ISSUER_KEK": KEK, "DATABASE_URL": value}
    message = config_error(environ, dev_kek_path)
    assert message.startswith("DATABASE_URL: "), message
    assert Settings().database_url == ""


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite+aiosqlite:///./orders_prod.db", id="sqlite-aiosqlite"),
        pytest.param("sqlite:////var/lib/orders_prod.db", id="sqlite"),
        pytest.param("mysql://admin:hunter2-secret@db.internal.example:3306/orders_prod", id="mysql"),
        pytest.param("mysql+aiomysql://admin:hunter2-secret@db.internal.example/orders_prod", id="mysql-aiomysql"),
        pytest.param("postgresql+psycopg://admin:hunter2-secret@db.internal.example/orders_prod", id="psycopg"),
        pytest.param("https://admin:hunter2-secret@db.internal.example/orders_prod", id="https"),
        pytest.param("admin:hunter2-secret@db.internal.example/orders_prod", id="no-scheme"),
    ],
)
def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it(url: str, dev_kek_path: Path) -> None:
    """Only the scheme may be quoted back: the rest of the URL may hold a password, and the line goes to logs.
    Without "://" nothing of the value is quoted."""
    message = config_error(env({"DATABASE_URL": url}), dev_kek_path)
    assert message.startswith("DATABASE_URL: "), message
    assert (url.partition("://")[2] or url) not in message
    for part in ("hunter2-secret", "db.internal.example", "3306", "orders_prod", "/var/lib", "./", "admin"):
        assert part not in message, (part, message)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://admin:hunter2-secret@db.internal.example:5432/orders_prod",
        "postgres://admin@db.internal.example/orders_prod",
        "postgresql+asyncpg://admin:hunter2-secret@db.internal.example/orders_prod",
        "postgresql:///orders_prod?host=/run/postgresql",
        "postgresql://admin:hunter2-secret/#?x@db.internal.example:5432/orders_prod",
    ],
)
def test_postgresql_urls_are_accepted_as_given(url: str, dev_kek_path: Path) -> None:
    settings = Settings.from_environ(env({"DATABASE_URL": url}), dev_kek_path=dev_kek_path)
    assert settings.database_url == url
    # The URL may hold a password; the settings' repr (a traceback, a debug line) must not show it.
    assert "hunter2-secret" not in repr(settings)
    assert "db.internal.example" not in repr(settings)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("not base64!!", id="words"),
        pytest.param("!!!!", id="punctuation"),
        pytest.param(KEK[:20] + "*" + KEK[20:], id="star-inside"),
        pytest.param(KEK[:20] + " " + KEK[20:], id="blank-inside"),
        pytest.param(KEK + "!", id="trailing-junk"),
        pytest.param('"' + KEK + '"', id="quoted"),
        pytest.param(STANDARD_ALPHABET_KEK, id="standard-alphabet"),
    ],
)
def test_kek_not_base64url(value: str, dev_kek_path: Path) -> None:
    message = config_error(env({"ISSUER_KEK": value}), dev_kek_path)
    assert "ISSUER_KEK" in message
    assert value.strip() not in message


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_kek_wrong_length(length: int, dev_kek_path: Path) -> None:
    value = b64url(secrets.token_bytes(length)) if length else "===="
    message = config_error(env({"ISSUER_KEK": value}), dev_kek_path)
    assert "ISSUER_KEK" in message
    assert value not in message


def test_kek_file_missing(tmp_path: Path, dev_kek_path: Path) -> None:
    missing = tmp_path / "no-such-kek"
    message = config_error(env({"ISSUER_KEK_FILE": str(missing)}), dev_kek_path)
    assert "ISSUER_KEK_FILE" in message
    assert not dev_kek_path.exists()


@pytest.mark.parametrize("content", ["not a key\n", b64url(secrets.token_bytes(16)) + "\n", ""])
def test_kek_file_with_bad_content(content: str, tmp_path: Path, dev_kek_path: Path) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text(content, encoding="ascii")
    message = config_error(env({"ISSUER_KEK_FILE": str(kek_file)}), dev_kek_path)
    assert "ISSUER_KEK_FILE" in message
    if content.strip():
        assert content.strip() not in message


def test_kek_and_kek_file_together(tmp_path: Path, dev_kek_path: Path) -> None:
    kek_file = tmp_path / "kek"
    kek_file.write_text(KEK, encoding="ascii")
    message = config_error(env({"ISSUER_KEK": KEK, "ISSUER_KEK_FILE": str(kek_file)}), dev_kek_path)
    assert "ISSUER_KEK" in message
    assert KEK not in message


def test_https_issuer_with_a_real_kek_is_fine(dev_kek_path: Path) -> None:
    settings = Settings.from_environ(
        env({"ISSUER_URL": "https://issuer.example.com/", "ISSUER_KEK": KEK}), dev_kek_path=dev_kek_path
    )
    assert settings.issuer_url == "https://issuer.example.com"
    assert settings.kek.reveal() == KEK_RAW
    assert not dev_kek_path.exists()


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask, so the file mode must come from the code, not from the environment."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_dev_kek_file_is_private_and_reused(dev_kek_path: Path, open_umask: None) -> None:
    first = Settings.from_environ(env(), dev_kek_path=dev_kek_path)
    assert first.kek_is_dev is True
    assert dev_kek_path.is_file()
    assert stat.S_IMODE(dev_kek_path.stat().st_mode) == 0o600
    stored = dev_kek_path.read_text(encoding="ascii").strip()
    assert base64.urlsafe_b64decode(stored + "=" * (-len(stored) % 4)) == first.kek.reveal()

    second = Settings.from_environ(env(), dev_kek_path=dev_kek_path)
    assert second.kek.reveal() == first.kek.reveal()
    assert second.kek_is_dev is True
    assert stat.S_IMODE(dev_kek_path.stat().st_mode) == 0o600


def test_dev_kek_differs_between_installs(tmp_path: Path) -> None:
    one = Settings.from_environ(env(), dev_kek_path=tmp_path / "a" / "dev-kek")
    two = Settings.from_environ(env(), dev_kek_path=tmp_path / "b" / "dev-kek")
    assert one.kek.reveal() != two.kek.reveal()


def test_corrupt_dev_kek_file_is_an_error(dev_kek_path: Path) -> None:
    dev_kek_path.parent.mkdir(parents=True)
    dev_kek_path.write_text("garbage", encoding="ascii")
    message = config_error(env({}), dev_kek_path)
    assert "ISSUER_KEK" in message


@pytest.mark.parametrize("source", ["inline", "file", "dev"])
def test_kek_never_shows_in_repr_or_str(source: str, tmp_path: Path, dev_kek_path: Path) -> None:
    environ: dict[str, str] = {}
    if source == "inline":
        environ["ISSUER_KEK"] = KEK
    elif source == "file":
        kek_file = tmp_path / "kek"
        kek_file.write_text(KEK, encoding="ascii")
        environ["ISSUER_KEK_FILE"] = str(kek_file)
    settings = Settings.from_environ(env(environ), dev_kek_path=dev_kek_path)
    raw = settings.kek.reveal()
    assert len(raw) == 32
    encodings = {
        "base64url": b64url(raw),
        "base64url-padded": base64.urlsafe_b64encode(raw).decode(),
        "base64": base64.b64encode(raw).decode(),
        "hex": raw.hex(),
        "bytes-repr": repr(raw),
        "latin-1": raw.decode("latin-1"),
    }
    renderings = {
        "repr(settings)": repr(settings),
        "str(settings)": str(settings),
        "format(settings)": f"{settings}",
        "repr(kek)": repr(settings.kek),
        "str(kek)": str(settings.kek),
        "format(kek)": f"{settings.kek}",
    }
    for where, text in renderings.items():
        for name, encoded in encodings.items():
            assert encoded not in text, f"{name} of the KEK in {where}"


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://admin:hunter2-secret@db.internal.example:99999/orders_prod", id="port-too-large"),
        pytest.param("postgresql://admin:hunter2-secret@db.internal.example:0/orders_prod", id="port-zero"),
        pytest.param("postgresql://admin:hunter2-secret@db.internal.example:http/orders_prod", id="port-not-a-number"),
    ],
)
def test_a_database_url_that_cannot_be_used_is_refused_without_echoing_it(url: str, dev_kek_path: Path) -> None:
    """Refused at start-up in one line, not later by the driver with a traceback quoting part of the URL."""
    message = config_error(env({"DATABASE_URL": url}), dev_kek_path)
    assert message.startswith("DATABASE_URL: "), message
    for part in ("hunter2-secret", "db.internal.example", "orders_prod", "admin", "99999", "http"):
        assert part not in message, (part, message)
