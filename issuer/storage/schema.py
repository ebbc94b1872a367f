"""The tables, as SQLAlchemy Core metadata: what the Alembic migrations create, and what a test compares them
with. The statements themselves are SQL text in the other modules of this package."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

TIMESTAMPTZ = DateTime(timezone=True)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    # Stored normalized (trimmed, lower-cased) so the unique index is the case-insensitive comparison.
    Column("email", String(254), nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("role", String(32), nullable=False, server_default="user"),
    Column("token_version", Integer, nullable=False, server_default="0"),
    Column("created_at", TIMESTAMPTZ, nullable=False),
)

families = Table(
    "refresh_families",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created_at", TIMESTAMPTZ, nullable=False),
    Column("last_used_at", TIMESTAMPTZ, nullable=False),
    # Absolute end of the session (SESSION_MAX_AGE); no refresh can extend it.
    Column("expires_at", TIMESTAMPTZ, nullable=False, index=True),
    # Expiry of the family's newest token: past it the session is idle-dead even if never revoked.
    Column("idle_expires_at", TIMESTAMPTZ, nullable=False),
    # Where the session started (its login) and where it was last used (its latest refresh).
    Column("user_agent", String(512), nullable=True),
    Column("ip", String(64), nullable=True),
    Column("revoked_at", TIMESTAMPTZ, nullable=True),
    Column("revoked_reason", String(32), nullable=True),
    Column("last_user_agent", String(512), nullable=True),
    Column("last_ip", String(64), nullable=True),
)

# The refresh trail: the login and every refresh of a session, when and from where. Written by the statement
# that starts or rotates the session (no round trip of its own), deleted with the session.
session_uses = Table(
    "session_uses",
    metadata,
    Column("family_id", String(36), ForeignKey("refresh_families.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", String(36), nullable=False),
    Column("used_at", TIMESTAMPTZ, nullable=False),
    Column("ip", String(64), nullable=True),
    Column("user_agent", String(512), nullable=True),
)
Index("ix_session_uses_family_id_used_at", session_uses.c.family_id, session_uses.c.used_at)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    # SHA-256 of the opaque token; the token itself is never stored.
    Column("token_hash", LargeBinary(32), primary_key=True),
    Column("family_id", String(36), ForeignKey("refresh_families.id", ondelete="CASCADE"), nullable=False, index=True),
    # The family's user, which the token carries too (issuer.sessions.tokens): every statement that finds a
    # token by its hash also names its user, the key a distributed PostgreSQL routes by (docs/scaling.md).
    Column("user_id", String(36), nullable=False),
    Column("issued_at", TIMESTAMPTZ, nullable=False),
    Column("expires_at", TIMESTAMPTZ, nullable=False, index=True),
    Column("consumed_at", TIMESTAMPTZ, nullable=True),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("public_jwk", Text, nullable=False),
    # AES-256-GCM(KEK, PKCS#8 DER), nonce prepended, kid as associated data.
    Column("private_key_enc", LargeBinary, nullable=False),
    Column("created_at", TIMESTAMPTZ, nullable=False),
    Column("publish_at", TIMESTAMPTZ, nullable=False),
    Column("activate_at", TIMESTAMPTZ, nullable=False),
    Column("retire_at", TIMESTAMPTZ, nullable=True),
    Column("revoked_at", TIMESTAMPTZ, nullable=True),
    Column("key_bits", BigInteger, nullable=False),
    Column("generation", BigInteger, nullable=False, unique=True),
)

login_failures = Table(
    "login_failures",
    metadata,
    # The normalized email, whether or not an account has it: throttling must not reveal which exist.
    Column("email", String(254), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure_at", TIMESTAMPTZ, nullable=False, index=True),
    Column("locked_until", TIMESTAMPTZ, nullable=True),
)

rate_buckets = Table(
    "rate_buckets",
    metadata,
    # "<scope>:<client address or /64>"; a token bucket shared by every replica.
    Column("bucket", String(96), primary_key=True),
    Column("tokens", Float, nullable=False),
    # Seconds since the epoch, as a float, so the refill is plain arithmetic.
    Column("updated_at", Float, nullable=False, index=True),
)

Index("ix_refresh_families_user_active", families.c.user_id, families.c.revoked_at)

# Resource servers and gateways that call the client-authenticated endpoints (introspection, revocation,
# the security-event feed). The secret is 256 random bits, so a plain SHA-256 is as strong as a password hash
# here and costs nothing per request (as for refresh tokens).
clients = Table(
    "clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("secret_hash", LargeBinary(32), nullable=False),
    # Space-separated, of introspect, revoke, events.
    Column("scope", String(200), nullable=False),
    Column("created_at", TIMESTAMPTZ, nullable=False),
)

# Revocations, as the feed serves them (issuer.events). ``seq`` is handed out by the one counter row below in
# the revoking transaction, so it follows commit order with no gaps: a reader that has seen ``seq`` N has
# seen every event below it. No foreign key to users: an account-purged event outlives its user.
security_events = Table(
    "security_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(36), nullable=False, unique=True),
    Column("occurred_at", TIMESTAMPTZ, nullable=False, index=True),
    # session_revoked (one session), user_revoked (every session, and token_version), account_purged.
    Column("kind", String(32), nullable=False),
    Column("user_id", String(36), nullable=False),
    Column("session_id", String(36), nullable=True),
    Column("token_version", Integer, nullable=True),
    # Why, for the SET's reason_admin: logout, session_revoked, reuse, logout_all, account_deleted, revocation.
    Column("reason", String(32), nullable=False),
)

# One row: the last sequence number handed out, and the highest one deleted by retention (a cursor below it
# has missed events and must start again).
security_event_counter = Table(
    "security_event_counter",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("pruned_through", BigInteger, nullable=False),
)
