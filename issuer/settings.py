"""Configuration: one frozen object built from the environment and validated once.

Every bad variable stops start-up with a :class:`ConfigError` whose message is one line naming the
variable, so an operator never runs a half-configured issuer.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEV_KEK_PATH = Path("keys") / "dev-kek"


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the variable."""


class Secret:
    """Holds a secret value so that it never shows up in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Argon2Params:
    """argon2id cost; the defaults are OWASP's minimum (19 MiB, 2 passes, 1 lane)."""

    memory_cost_kib: int = 19456
    time_cost: int = 2
    parallelism: int = 1


@dataclass(frozen=True)
class Settings:
    issuer_url: str = "http://127.0.0.1:8000"
    audience: str = "api"
    # Required in the environment (no default: `make run` starts an embedded PostgreSQL and sets it). Not in
    # the repr: it may hold a password.
    database_url: str = field(default="", repr=False)
    access_token_ttl: int = 900
    refresh_token_ttl: int = 604800
    session_max_age: int = 2592000
    refresh_reuse_grace: int = 10
    cookie_secure: bool = True
    clock_leeway: int = 5
    jwks_max_age: int = 300
    key_publish_lead: int = 600
    key_rotation_interval: int = 0
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    kek: Secret = field(default_factory=lambda: Secret(secrets.token_bytes(32)), repr=False)
    kek_is_dev: bool = False
    argon2: Argon2Params = field(default_factory=Argon2Params)
    key_reload_interval: int = 10
    rate_limit_per_ip: int = 120
    login_lockout_threshold: int = 5
    cleanup_interval: int = 3600
    db_pool_size: int = 10
    access_log: bool = False
    cleanup_retention: int = 604800
    # What presenting a consumed refresh token revokes: "family" (that session) or "user" (every session of
    # the user, and their token version goes up).
    reuse_revokes: str = "family"
    # off | audit | reject: what a refresh from another network and another user agent than its session's
    # recent ones gets (issuer.sessions.binding).
    refresh_binding: str = "audit"
    # The dedicated connection that LISTENs for key changes and revocation events; it needs a session, so
    # behind a transaction pooler it must reach PostgreSQL directly. Unset: DATABASE_URL.
    database_listen_url: str = field(default="", repr=False)
    # Serve the account page at /account (issuer.http.sdk); `issuer dev` turns it on.
    account_page: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, *, dev_kek_path: Path = DEV_KEK_PATH) -> Settings:
        """Build and validate settings; raises :class:`ConfigError` on the first bad variable."""
        env = os.environ if environ is None else environ
        jwks_max_age = _int(env, "JWKS_MAX_AGE", 300, minimum=0)
        database_url = _database_url(env)  # before the KEK: a missing URL must not create keys/dev-kek
        kek, kek_is_dev = _load_kek(env, dev_kek_path)
        settings = cls(
            issuer_url=_issuer_url(env),
            audience=_nonempty(env, "ISSUER_AUDIENCE", "api"),
            database_url=database_url,
            access_token_ttl=_int(env, "ACCESS_TOKEN_TTL", 900, minimum=1),
            refresh_token_ttl=_int(env, "REFRESH_TOKEN_TTL", 604800, minimum=1),
            session_max_age=_int(env, "SESSION_MAX_AGE", 2592000, minimum=1),
            refresh_reuse_grace=_int(env, "REFRESH_REUSE_GRACE", 10, minimum=0),
            cookie_secure=_bool(env, "COOKIE_SECURE", True),
            clock_leeway=_int(env, "CLOCK_LEEWAY", 5, minimum=0),
            jwks_max_age=jwks_max_age,
            key_publish_lead=_int(env, "KEY_PUBLISH_LEAD", 2 * jwks_max_age, minimum=0),
            key_rotation_interval=_int(env, "KEY_ROTATION_INTERVAL", 0, minimum=0),
            key_reload_interval=_int(env, "KEY_RELOAD_INTERVAL", 10, minimum=1),
            rate_limit_per_ip=_int(env, "RATE_LIMIT_PER_IP", 120, minimum=0),
            login_lockout_threshold=_int(env, "LOGIN_LOCKOUT_THRESHOLD", 5, minimum=0),
            cleanup_interval=_int(env, "CLEANUP_INTERVAL", 3600, minimum=0),
            db_pool_size=_int(env, "DB_POOL_SIZE", 10, minimum=1),
            access_log=_bool(env, "ACCESS_LOG", False),
            cleanup_retention=_int(env, "CLEANUP_RETENTION", 604800, minimum=0),
            account_page=_bool(env, "ACCOUNT_PAGE", False),
            reuse_revokes=_choice(env, "REUSE_REVOKES", "family", ("family", "user")),
            refresh_binding=_choice(env, "REFRESH_BINDING", "audit", ("off", "audit", "reject")),
            database_listen_url=_listen_url(env),
            allowed_origins=_origins(env, "ALLOWED_ORIGINS"),
            trusted_proxies=_networks(env, "TRUSTED_PROXIES"),
            kek=kek,
            kek_is_dev=kek_is_dev,
            argon2=Argon2Params(
                memory_cost_kib=_int(env, "ARGON2_MEMORY_COST", 19456, minimum=8),
                time_cost=_int(env, "ARGON2_TIME_COST", 2, minimum=1),
                parallelism=_int(env, "ARGON2_PARALLELISM", 1, minimum=1),
            ),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-variable rules; also run on settings built in code (tests)."""
        if self.access_token_ttl > self.refresh_token_ttl:
            raise ConfigError("ACCESS_TOKEN_TTL: must not exceed REFRESH_TOKEN_TTL")
        if self.refresh_token_ttl > self.session_max_age:
            raise ConfigError("REFRESH_TOKEN_TTL: must not exceed SESSION_MAX_AGE")
        if self.key_publish_lead < self.jwks_max_age:
            raise ConfigError("KEY_PUBLISH_LEAD: must be at least JWKS_MAX_AGE, or caches may meet an unknown kid")
        if 0 < self.key_rotation_interval < self.key_publish_lead:
            raise ConfigError("KEY_ROTATION_INTERVAL: must be 0 (off) or at least KEY_PUBLISH_LEAD")
        # The parsed scheme, not the string: "HTTPS://..." is an https issuer too.
        if self.kek_is_dev and urlsplit(self.issuer_url).scheme == "https":
            raise ConfigError(
                "ISSUER_KEK: an https issuer needs a real key-encryption key (ISSUER_KEK or ISSUER_KEK_FILE), "
                "not the generated development one"
            )
        if len(self.kek.reveal()) != 32:
            raise ConfigError("ISSUER_KEK: must be 32 bytes, base64url-encoded")

    @property
    def issuer_origin(self) -> str:
        """The issuer's origin as a browser sends it in ``Origin`` (lower case, no default port)."""
        return serialize_origin(self.issuer_url)


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _nonempty(env: Mapping[str, str], name: str, default: str) -> str:
    value = _raw(env, name)
    return default if value is None else value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = int(value, 10)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a whole number") from None
    if number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {number}")
    return number


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}: {value!r} is not a boolean (true/false)")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = _raw(env, name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, not {raw!r}")
    return value


def _csv(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    value = _raw(env, name)
    if value is None:
        return ()
    return tuple(item.strip() for item in value.split(",") if item.strip())


_DEFAULT_PORTS = {"http": 80, "https": 443}


def serialize_origin(url: str) -> str:
    """``scheme://host[:port]`` as browsers serialize an origin (RFC 6454): lower case, no default port.

    Raises ValueError for anything that is not an http(s) URL with a host and no user info."""
    if any(c.isspace() for c in url):
        raise ValueError("contains whitespace")
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        raise ValueError("not an http(s) URL with a host and no user info")
    port = parts.port  # raises ValueError for a port that is not a number in range
    host = parts.hostname  # lower case, without IPv6 brackets
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + ("" if port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port}")


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Exact browser origins. ``*`` and ``null`` are refused: the cookie endpoints allow credentials, and
    ``null`` is the origin of sandboxed frames and local files, which anyone can open."""
    origins: list[str] = []
    for item in _csv(env, name):
        candidate = item.rstrip("/")
        parts = urlsplit(candidate)
        try:
            origin = serialize_origin(candidate)
        except ValueError:
            origin = None
        if origin is None or parts.path or parts.query or parts.fragment:
            raise ConfigError(f"{name}: {item!r} is not an origin (scheme://host[:port]; no '*', 'null' or path)")
        origins.append(origin)
    return tuple(origins)


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """IP addresses or CIDR networks; anything else stops start-up (silently skipping a mistyped entry
    would make every client look like the proxy, sharing one rate-limit bucket)."""
    items = _csv(env, name)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR network (comma-separated)") from None
    return items


def _issuer_url(env: Mapping[str, str]) -> str:
    value = _nonempty(env, "ISSUER_URL", "http://127.0.0.1:8000")
    parts = urlsplit(value)
    try:
        serialize_origin(value)
        usable = not parts.query and not parts.fragment
    except ValueError:
        usable = False
    if not usable:
        raise ConfigError(
            f"ISSUER_URL: {value!r} is not an http(s) URL with a host, without user info, query or fragment"
        )
    return value.rstrip("/")


_BASE64URL_32 = re.compile(r"^[A-Za-z0-9_-]{43}=?$")


DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


def _database_url(env: Mapping[str, str]) -> str:
    value = _raw(env, "DATABASE_URL")
    if value is None:
        raise ConfigError(
            "DATABASE_URL: not set; give the PostgreSQL URL (postgresql://user@host:5432/dbname); "
            "`make run` starts an embedded PostgreSQL when it is unset"
        )
    # Nothing but the scheme is ever echoed: the rest may hold a password.
    scheme, separator, _ = value.partition("://")
    if not separator:
        raise ConfigError("DATABASE_URL: not a URL (postgresql://user@host/dbname)")
    if scheme not in DATABASE_SCHEMES:
        raise ConfigError(f"DATABASE_URL: scheme {scheme!r} is not PostgreSQL's (postgresql://user@host/dbname)")
    try:
        # The parse the pool and Alembic use (issuer.storage.database.connect_arguments).
        port = make_url(value).port
    except (ArgumentError, ValueError):
        raise ConfigError("DATABASE_URL: cannot be parsed as a URL (percent-encode special characters)") from None
    if port is not None and not 0 < port < 65536:
        raise ConfigError("DATABASE_URL: the port must be between 1 and 65535")
    # Imported here: the storage layer imports this module (ConfigError).
    from issuer.storage.database import InvalidDatabaseURL, connect_arguments

    try:
        connect_arguments(value)  # query parameters: asyncpg's, converted; any other is refused here
    except InvalidDatabaseURL as exc:
        raise ConfigError(f"DATABASE_URL: {exc}") from None
    return value


def _listen_url(env: Mapping[str, str]) -> str:
    """DATABASE_LISTEN_URL, checked by the same rules as DATABASE_URL; empty when unset."""
    raw = _raw(env, "DATABASE_LISTEN_URL")
    if raw is None:
        return ""
    try:
        return _database_url({"DATABASE_URL": raw})
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("DATABASE_URL", "DATABASE_LISTEN_URL", 1)) from None


def decode_kek(text: str, name: str) -> Secret:
    cleaned = text.strip()
    if not _BASE64URL_32.match(cleaned):
        raise ConfigError(f"{name}: must be 32 bytes encoded as base64url (43 characters of A-Z a-z 0-9 - _)")
    try:
        raw = base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{name}: not valid base64url") from None
    if len(raw) != 32:
        raise ConfigError(f"{name}: must decode to 32 bytes, got {len(raw)}")
    return Secret(raw)


def encode_kek(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _load_kek(env: Mapping[str, str], dev_kek_path: Path) -> tuple[Secret, bool]:
    """The KEK from ISSUER_KEK, ISSUER_KEK_FILE, or (development) a generated file under keys/."""
    inline = _raw(env, "ISSUER_KEK")
    path = _raw(env, "ISSUER_KEK_FILE")
    if inline is not None and path is not None:
        raise ConfigError("ISSUER_KEK: set either ISSUER_KEK or ISSUER_KEK_FILE, not both")
    if inline is not None:
        return decode_kek(inline, "ISSUER_KEK"), False
    if path is not None:
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"ISSUER_KEK_FILE: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return decode_kek(text, "ISSUER_KEK_FILE"), False
    return _dev_kek(dev_kek_path), True


def _dev_kek(path: Path) -> Secret:
    if path.exists():
        return decode_kek(path.read_text(encoding="ascii"), f"ISSUER_KEK (development file {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(encode_kek(secrets.token_bytes(32)) + "\n")
    return decode_kek(path.read_text(encoding="ascii"), f"ISSUER_KEK (development file {path})")
