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
    Column("user_agent", String(512), nullable=True),
    Column("ip", String(64), nullable=True),
    Column("revoked_at", TIMESTAMPTZ, nullable=True),
    Column("revoked_reason", String(32), nullable=True),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    # SHA-256 of the opaque token; the token itself is never stored.
    Column("token_hash", LargeBinary(32), primary_key=True),
    Column("family_id", String(36), ForeignKey("refresh_families.id", ondelete="CASCADE"), nullable=False, index=True),
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
