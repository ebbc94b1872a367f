"""The process's view of the signing keys, and the operations that change them.

Private keys are decrypted when the table changes, never per request. Replicas converge because each
one re-reads the shared table every ``key_reload_interval`` seconds and derives states from timestamps.
Every change follows Dex's pattern: build the new key outside the transaction, then inside it re-read the
rows, re-plan, and write; the unique ``generation`` makes a concurrent second writer fail and back off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import rsa

from issuer.audit import audit
from issuer.clock import Clock
from issuer.keys.material import decrypt_private_key, new_key_record
from issuer.keys.policy import KeyPlan, RotationRefused, plan_revocation, plan_rotation, prunable, rotation_due
from issuer.keys.records import KeyRecord, KeyState, key_state, signing_record
from issuer.keys.ring import KeyRing, LoadedKey
from issuer.settings import Settings
from issuer.storage import notifications, signing_keys
from issuer.storage.database import Database
from issuer.tasks import cancelled

log = logging.getLogger("issuer.keys")

_Planner = Callable[[list[KeyRecord], datetime], KeyPlan | None]


class ConcurrentKeyChange(RotationRefused):
    """Another replica or operator changed the keys at the same moment; nothing was written."""


class KeyManager:
    def __init__(
        self, db: Database, settings: Settings, clock: Clock, *, listening: Callable[[], bool] = lambda: False
    ) -> None:
        self._db = db
        # Whether key-change notifications arrive (issuer.storage.notifications); while they do not, the
        # table is re-read every second, so a change still reaches this process within the contract's 1 s.
        self._listening = listening
        self._settings = settings
        self._clock = clock
        self._ring = KeyRing((), self.retire_grace(settings))
        self._fingerprint: tuple[tuple[object, ...], ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._changed = asyncio.Event()

    @staticmethod
    def retire_grace(settings: Settings) -> timedelta:
        """How long a key stays published after it stops signing: every token it signed has expired by then,
        including one signed by a replica that had not yet re-read the table."""
        return timedelta(
            seconds=settings.access_token_ttl + settings.clock_leeway + int(settings.key_reload_interval) + 1
        )

    @staticmethod
    def jwks_max_age(settings: Settings) -> int:
        """Cache lifetime that keeps pre-publication safe: a key this replica has not seen yet was published
        at most one reload interval ago, and signs no sooner than KEY_PUBLISH_LEAD after publication."""
        headroom = settings.key_publish_lead - int(settings.key_reload_interval) - 1
        return max(0, min(settings.jwks_max_age, headroom))

    @property
    def ring(self) -> KeyRing:
        return self._ring

    def signing_key(self, now: datetime) -> LoadedKey | None:
        key = self._ring.signing_key(now)
        if key is not None:
            return key
        return self._ring.recently_retired(now, timedelta(seconds=self._settings.key_reload_interval))

    # ------------------------------------------------------------ reading

    async def records(self) -> list[KeyRecord]:
        return await signing_keys.all_keys(self._db)

    async def reload(self) -> None:
        """Re-read the table; decrypt only when it changed. Raises KeyDecryptionError on a wrong KEK."""
        async with self._reload_lock:
            records = await self.records()
            fingerprint = tuple((r.kid, r.activate_at, r.retire_at, r.revoked_at) for r in records)
            if fingerprint == self._fingerprint:
                return
            grace = self._ring.retire_grace
            relevant = _still_relevant(records, self._clock(), grace)
            if records and not relevant:
                # Nothing left to decrypt, but a wrong KEK must still stop us before we write keys under it.
                newest = max(records, key=lambda r: r.generation)
                decrypt_private_key(self._settings.kek, newest.kid, newest.private_key_enc)
            self._ring = KeyRing.load(relevant, self._settings.kek, grace)
            self._fingerprint = fingerprint

    # ------------------------------------------------------------ changing

    async def ensure_signing_key(self) -> KeyRecord | None:
        """Make sure a key signs now: on a fresh install (or after every key was revoked) create one, active
        at once; None when a key already signs. Every later key goes through the published state.
        """
        await self.reload()
        now = self._clock()
        if self._ring.signing_key(now) is not None:
            return None
        fresh = await asyncio.to_thread(new_key_record, self._settings.kek, now=now, activate_at=now)

        def plan(records: list[KeyRecord], now: datetime) -> KeyPlan | None:
            if signing_record(records, now, self._ring.retire_grace) is not None:
                return None
            return plan_rotation(
                records, fresh, now=now, lead=timedelta(0), grace=self._ring.retire_grace, immediate=True
            )

        try:
            applied = await self._apply(plan)
        except ConcurrentKeyChange:
            await self.reload()
            return None
        if applied is None or applied.insert is None:
            return None
        audit("key_created", "success", f"created signing key {fresh.kid}, active now", kid=fresh.kid)
        return applied.insert

    async def rotate(self, *, immediate: bool = False, private_key: rsa.RSAPrivateKey | None = None) -> KeyPlan:
        """Publish a new key (generated, or the operator's) that signs after KEY_PUBLISH_LEAD, or now."""
        now = self._clock()
        fresh = await asyncio.to_thread(
            new_key_record, self._settings.kek, now=now, activate_at=now, private_key=private_key
        )
        lead = timedelta(seconds=self._settings.key_publish_lead)
        grace = self._ring.retire_grace
        applied = await self._apply(
            lambda records, now: plan_rotation(records, fresh, now=now, lead=lead, grace=grace, immediate=immediate)
        )
        assert applied is not None
        assert applied.insert is not None
        kid, signs_from = applied.insert.kid, f"{applied.insert.activate_at:%Y-%m-%dT%H:%M:%SZ}"
        audit("key_rotated", "success", f"key {kid} published; signs from {signs_from}", kid=kid, immediate=immediate)
        return applied

    async def revoke(self, kid: str) -> KeyPlan:
        """Compromise: ``kid`` leaves the JWKS now and another key signs now."""
        now = self._clock()
        replacement = await asyncio.to_thread(new_key_record, self._settings.kek, now=now, activate_at=now)
        grace = self._ring.retire_grace
        applied = await self._apply(
            lambda records, now: plan_revocation(records, kid, replacement, now=now, grace=grace)
        )
        assert applied is not None
        audit("key_revoked", "success", f"key {kid} revoked", kid=kid)
        return applied

    async def prune(self) -> list[str]:
        async with self._db.transaction() as tx:
            kids = prunable(await signing_keys.all_keys(tx), now=self._clock(), grace=self._ring.retire_grace)
            if kids:
                await signing_keys.delete(tx, kids)
                await signing_keys.announce(tx)
        await self.reload()
        return kids

    async def rotate_if_due(self) -> KeyPlan | None:
        """Scheduled rotation (KEY_ROTATION_INTERVAL): at most one new key per interval across replicas."""
        interval = timedelta(seconds=self._settings.key_rotation_interval)
        if interval <= timedelta(0):
            return None
        grace = self._ring.retire_grace
        if not rotation_due(await self.records(), now=self._clock(), interval=interval, grace=grace):
            return None
        now = self._clock()
        fresh = await asyncio.to_thread(new_key_record, self._settings.kek, now=now, activate_at=now)
        lead = timedelta(seconds=self._settings.key_publish_lead)

        def plan(records: list[KeyRecord], now: datetime) -> KeyPlan | None:
            if not rotation_due(records, now=now, interval=interval, grace=grace):
                return None  # another replica got there first
            return plan_rotation(records, fresh, now=now, lead=lead, grace=grace, immediate=False)

        try:
            applied = await self._apply(plan)
        except ConcurrentKeyChange:
            log.info("scheduled rotation already done by another instance")
            await self.reload()
            return None
        if applied is not None and applied.insert is not None:
            kid = applied.insert.kid
            audit("key_rotated", "success", f"scheduled rotation: key {kid} published", kid=kid, scheduled=True)
        return applied

    async def _apply(self, plan_for: _Planner) -> KeyPlan | None:
        """Re-read the rows inside a transaction, plan against them, write the plan; then reload."""
        try:
            async with self._db.transaction() as tx:
                records = await signing_keys.all_keys(tx)
                plan = plan_for(records, self._clock())
                if plan is None:
                    return None
                by_kid = {r.kid: r for r in records}
                for kid, changes in plan.updates.items():
                    await signing_keys.reschedule(tx, _rescheduled(by_kid[kid], changes))
                if plan.insert is not None:
                    await signing_keys.insert(tx, plan.insert)
                await signing_keys.announce(tx)
        except signing_keys.KeyConflict:
            raise ConcurrentKeyChange(
                "another instance changed the signing keys at the same moment; nothing was written, check "
                "`issuer keys list` and retry"
            ) from None
        await self.reload()
        return plan

    # ------------------------------------------------------------ background

    def start_background(self) -> None:
        self._task = asyncio.create_task(self._background(), name="issuer-keys")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancelled(task)

    def changed(self, _payload: str | None = None) -> None:
        """Another process changed the keys (a LISTEN notification): reload now, not at the next interval."""
        self._changed.set()

    async def _background(self) -> None:
        """Reload on every announced change; re-read every second while notifications do not arrive, and every
        KEY_RELOAD_INTERVAL whatever happens (the safety net, and the scheduled rotation's clock)."""
        interval = self._settings.key_reload_interval
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + interval
        while True:
            until_tick = next_tick - loop.time()
            await notifications.wait(
                self._changed, min(until_tick, notifications.poll_interval(self._listening(), until_tick))
            )
            self._changed.clear()
            try:
                if loop.time() >= next_tick:
                    next_tick = loop.time() + interval
                    await self.rotate_if_due()
                await self.reload()
            except Exception:
                # Keep serving the keys we have; the database may be down for a moment.
                log.exception("could not refresh signing keys; keeping the current set")


def _still_relevant(records: list[KeyRecord], now: datetime, grace: timedelta) -> list[KeyRecord]:
    """Skip decrypting keys that can never be used again (revoked, or gone for good)."""
    return [r for r in records if key_state(r, now, grace) not in {KeyState.REVOKED, KeyState.GONE}]


def _rescheduled(record: KeyRecord, changes: dict[str, datetime | None]) -> KeyRecord:
    """``record`` with a plan's changes to its schedule (the only columns a plan changes)."""
    activate_at = changes.get("activate_at", record.activate_at)
    assert activate_at is not None  # plans move activate_at, never clear it
    return replace(
        record,
        activate_at=activate_at,
        retire_at=changes.get("retire_at", record.retire_at),
        revoked_at=changes.get("revoked_at", record.revoked_at),
    )
