"""Signing-key rows and their states over time.

A key's state is a pure function of its timestamps and ``now``, so every replica that has read the same
rows picks the same signing key and serves the same JWKS without talking to the others::

    publish_at <= now < activate_at                    published  (in the JWKS, not signing)
    activate_at <= now < retire_at (or no retire_at)   active     (newest activate_at signs)
    retire_at <= now < retire_at + grace               retiring   (in the JWKS until its tokens expired)
    revoked_at <= now, or past the retiring window     gone
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


class KeyState(enum.StrEnum):
    PENDING = "pending"
    PUBLISHED = "published"
    ACTIVE = "active"
    RETIRING = "retiring"
    GONE = "gone"
    REVOKED = "revoked"


@dataclass(frozen=True)
class KeyRecord:
    """One row of ``signing_keys``: what storage reads and writes."""

    kid: str
    public_jwk: dict[str, str]
    private_key_enc: bytes
    created_at: datetime
    publish_at: datetime
    activate_at: datetime
    retire_at: datetime | None
    revoked_at: datetime | None
    key_bits: int
    # Monotonic and unique per table: two replicas rotating at once pick the same number, one insert fails.
    generation: int = 0


def key_state(record: KeyRecord, now: datetime, retire_grace: timedelta) -> KeyState:
    if record.revoked_at is not None and record.revoked_at <= now:
        return KeyState.REVOKED
    if now < record.publish_at:
        return KeyState.PENDING
    if now < record.activate_at:
        return KeyState.PUBLISHED
    if record.retire_at is None or now < record.retire_at:
        return KeyState.ACTIVE
    if now < record.retire_at + retire_grace:
        return KeyState.RETIRING
    return KeyState.GONE


def signing_record(records: Iterable[KeyRecord], now: datetime, retire_grace: timedelta) -> KeyRecord | None:
    """The active key with the newest ``activate_at`` (kid breaks ties, so replicas agree)."""
    active = [r for r in records if key_state(r, now, retire_grace) is KeyState.ACTIVE]
    return max(active, key=lambda r: (r.activate_at, r.kid), default=None)


def published_kids(records: Iterable[KeyRecord], now: datetime, retire_grace: timedelta) -> frozenset[str]:
    """The kids a JWKS served at ``now`` contains."""
    return frozenset(r.kid for r in records if is_published(r, now, retire_grace))


def is_published(record: KeyRecord, now: datetime, retire_grace: timedelta) -> bool:
    return key_state(record, now, retire_grace) in {KeyState.PUBLISHED, KeyState.ACTIVE, KeyState.RETIRING}
