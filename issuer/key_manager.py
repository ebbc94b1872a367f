"""The process's view of the signing keys: loaded from the database, decrypted once, reloaded periodically.

Private keys are parsed when the table changes, never per request. Replicas converge because each one
reloads the shared table every ``reload_interval`` seconds and derives states from timestamps alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from issuer import store
from issuer.clock import Clock
from issuer.keys import KeyRecord, KeyRing, LoadedKey, new_key_record
from issuer.settings import Settings

log = logging.getLogger("issuer.keys")


class KeyManager:
    def __init__(self, engine: AsyncEngine, settings: Settings, clock: Clock) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._ring = KeyRing((), self.retire_grace(settings))
        self._fingerprint: tuple[tuple[str, datetime | None, datetime | None], ...] = ()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def retire_grace(settings: Settings) -> timedelta:
        """How long a key stays published after it stops signing: every token it signed has expired by then,
        even one signed by a replica that had not yet reloaded the table."""
        return timedelta(
            seconds=settings.access_token_ttl + settings.clock_leeway + int(settings.key_refresh_interval) + 1
        )

    @property
    def ring(self) -> KeyRing:
        return self._ring

    def signing_key(self, now: datetime) -> LoadedKey | None:
        return self._ring.signing_key(now)

    async def reload(self) -> None:
        """Re-read the table; decrypt only when it changed. Raises KeyDecryptionError on a wrong KEK."""
        async with self._engine.connect() as conn:
            records = await store.all_keys(conn)
        fingerprint = tuple((r.kid, r.retire_at, r.revoked_at) for r in records)
        if fingerprint == self._fingerprint:
            return
        ring = KeyRing.load(
            _still_relevant(records, self._clock(), self._ring.retire_grace),
            self._settings.kek,
            self._ring.retire_grace,
        )
        self._ring = ring
        self._fingerprint = fingerprint

    async def ensure_signing_key(self) -> KeyRecord | None:
        """Create a first key, active at once, when the table holds none that can sign; None if there was one.

        A fresh install must be able to sign immediately; later keys go through the published state.
        """
        await self.reload()
        now = self._clock()
        if self._ring.signing_key(now) is not None or _will_sign(self._ring, now):
            return None
        record = await asyncio.to_thread(new_key_record, self._settings.kek, now=now, activate_at=now)
        async with self._engine.begin() as conn:
            # Re-check inside the transaction: another replica may have created one meanwhile.
            existing = await store.all_keys(conn)
            if any(r.revoked_at is None and (r.retire_at is None or r.retire_at > now) for r in existing):
                return None
            await store.insert_key(conn, record)
        log.warning(
            "created a signing key %s, active now", record.kid, extra={"event": "key_created", "kid": record.kid}
        )
        await self.reload()
        return record

    def start_reloading(self) -> None:
        self._task = asyncio.create_task(self._reload_forever(), name="issuer-key-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.key_refresh_interval)
            try:
                await self.reload()
            except Exception:
                # Keep serving the keys we have; the database may be down for a moment.
                log.exception("could not reload signing keys; keeping the current set")


def _will_sign(ring: KeyRing, now: datetime) -> bool:
    return any(k.record.revoked_at is None and k.record.activate_at > now for k in ring.keys)


def _still_relevant(records: list[KeyRecord], now: datetime, grace: timedelta) -> list[KeyRecord]:
    """Skip decrypting keys that can never be used again (revoked, or gone for good)."""
    return [
        r
        for r in records
        if (r.revoked_at is None or r.revoked_at > now) and (r.retire_at is None or r.retire_at + grace > now)
    ]
