"""Key-rotation decisions as pure functions over the key rows and ``now``.

Nothing here touches the database: :mod:`issuer.keys.manager` applies the plans inside a transaction and
re-checks them there, so two replicas deciding at once cannot both act (the ``generation`` column is
unique; the loser's insert fails and it backs off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from issuer.keys.records import KeyRecord, KeyState, key_state, signing_record


class RotationRefused(Exception):
    """The requested key operation would be unsafe or makes no sense now; the message says why."""


@dataclass(frozen=True)
class KeyPlan:
    """What to write: at most one new row, and timestamp changes to existing rows (kid -> field -> value)."""

    insert: KeyRecord | None = None
    updates: dict[str, dict[str, datetime | None]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def next_generation(records: Sequence[KeyRecord]) -> int:
    return max((r.generation for r in records), default=0) + 1


def plan_rotation(
    records: Sequence[KeyRecord], new: KeyRecord, *, now: datetime, lead: timedelta, grace: timedelta, immediate: bool
) -> KeyPlan:
    """Publish ``new`` now; it signs after ``lead`` (or at once), and every current signer retires then.

    When no key is active at all, ``new`` signs at once whatever was asked: there is nothing to protect.

    A second rotation while one is still waiting to activate is refused unless ``immediate``: two pending
    keys would make the schedule hard to reason about, and the first one would never sign.
    """
    if any(r.kid == new.kid for r in records):
        raise RotationRefused(f"key {new.kid} is already in the key set")
    pending = [r for r in records if key_state(r, now, grace) is KeyState.PUBLISHED]
    if pending and not immediate:
        waiting = pending[0]
        raise RotationRefused(
            f"key {waiting.kid} is already published and activates at {waiting.activate_at:%Y-%m-%dT%H:%M:%SZ}; "
            "wait for it, or use --now"
        )
    warnings: tuple[str, ...] = ()
    if not immediate and signing_record(records, now, grace) is None:
        # Nothing signs, so nothing can break: waiting would only leave the issuer unable to sign.
        immediate = True
        warnings = ("no key was signing, so the new key signs at once",)
    activate_at = now if immediate else now + lead
    inserted = replace(
        new, publish_at=now, activate_at=activate_at, created_at=now, generation=next_generation(records)
    )
    updates: dict[str, dict[str, datetime | None]] = {}
    for record in records:
        state = key_state(record, now, grace)
        if state in {KeyState.ACTIVE, KeyState.PUBLISHED} and (
            record.retire_at is None or record.retire_at > activate_at
        ):
            updates[record.kid] = {"retire_at": activate_at}
    if immediate and not warnings:
        warnings = (
            "the new key signs now: gateways whose cached JWKS predates it will meet an unknown kid until they refetch",
        )
    return KeyPlan(insert=inserted, updates=updates, warnings=warnings)


def plan_revocation(
    records: Sequence[KeyRecord], kid: str, replacement: KeyRecord | None, *, now: datetime, grace: timedelta
) -> KeyPlan:
    """Take ``kid`` out of the JWKS at once; if it was signing, a key must sign at once instead.

    Prefer promoting a key that is already published (caches have it); otherwise ``replacement`` is
    inserted, active now. Returns a plan without an insert when no replacement is needed.
    """
    target = next((r for r in records if r.kid == kid), None)
    if target is None:
        raise RotationRefused(f"no key with kid {kid}")
    if key_state(target, now, grace) in {KeyState.REVOKED, KeyState.GONE}:
        raise RotationRefused(f"key {kid} is already {key_state(target, now, grace).value}")
    updates: dict[str, dict[str, datetime | None]] = {kid: {"revoked_at": now}}
    survivors = [r for r in records if r.kid != kid]
    signer = signing_record(survivors, now, grace)
    if signer is not None:
        if signer.retire_at is not None and not _has_successor(signer.kid, signer.retire_at, survivors):
            # The revoked key was to take over from the signer; the signer must not retire into nothing.
            updates[signer.kid] = {"retire_at": None}
            return KeyPlan(updates=updates, warnings=(f"key {signer.kid} keeps signing; rotate again to replace it",))
        return KeyPlan(updates=updates)
    # Only a key not already scheduled to retire can take over.
    published = [
        r
        for r in survivors
        if key_state(r, now, grace) is KeyState.PUBLISHED and (r.retire_at is None or r.retire_at > now)
    ]
    if published:
        promoted = min(published, key=lambda r: (r.activate_at, r.kid))
        updates[promoted.kid] = {"activate_at": now}
        return KeyPlan(updates=updates, warnings=(f"key {promoted.kid}, already published, signs from now on",))
    if replacement is None:
        raise RotationRefused("a replacement key is needed")
    inserted = replace(
        replacement, publish_at=now, activate_at=now, created_at=now, generation=next_generation(records)
    )
    return KeyPlan(
        insert=inserted,
        updates=updates,
        warnings=(f"new key {inserted.kid} signs now; gateways must refetch the JWKS on its unknown kid",),
    )


def _has_successor(signer: str, at: datetime, survivors: Sequence[KeyRecord]) -> bool:
    """Whether a key other than ``signer``, and not revoked, signs from ``at`` (when ``signer`` retires)."""
    return any(
        r.kid != signer and r.revoked_at is None and r.activate_at <= at and (r.retire_at is None or r.retire_at > at)
        for r in survivors
    )


def rotation_due(records: Sequence[KeyRecord], *, now: datetime, interval: timedelta, grace: timedelta) -> bool:
    """Scheduled rotation: the newest usable key was published at least ``interval`` ago, none is waiting."""
    if interval <= timedelta(0):
        return False
    usable = [r for r in records if key_state(r, now, grace) in {KeyState.PUBLISHED, KeyState.ACTIVE}]
    if not usable:
        return False  # nothing to rotate from: start-up creates the first key
    if any(key_state(r, now, grace) is KeyState.PUBLISHED for r in usable):
        return False
    newest = max(usable, key=lambda r: r.publish_at)
    return now - newest.publish_at >= interval


def prunable(records: Sequence[KeyRecord], *, now: datetime, grace: timedelta) -> list[str]:
    """Keys past their retiring window. Revoked keys stay as tombstones, so a compromised key can never be
    imported again."""
    return [r.kid for r in records if key_state(r, now, grace) is KeyState.GONE]
