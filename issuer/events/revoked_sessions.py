"""The issuer's own view of revoked sessions, for the Bearer checks of its own endpoints.

A revoked session's access token stays valid by signature until it expires. The issuer's own endpoints
already read the user on every call, which makes logout-all and account deletion take effect at once; a
revoked *session* (logout, session deletion, reuse detection, RFC 7009) is learned here from the same
events verifiers follow: every committed event is announced with NOTIFY, and this process reads the new ones
and merges them with the verifier's own rules (``issuer.verifier.revocations``). A check is then one dict
lookup, with no extra round trip. While the LISTEN connection is down, the events are re-read every second.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from issuer.clock import Clock
from issuer.events.feed import event_retention
from issuer.settings import Settings
from issuer.storage import events, notifications
from issuer.storage.database import Database
from issuer.tasks import cancelled
from issuer.verifier.revocations import RevocationState, SessionRevoked

log = logging.getLogger("issuer")

PAGE = 1000
# How often the events are re-read anyway while notifications arrive (the safety net against a lost one).
READ_WHILE_LISTENING = 30.0


class RevokedSessions:
    def __init__(
        self, db: Database, settings: Settings, clock: Clock, *, listening: Callable[[], bool] = lambda: False
    ) -> None:
        self._db = db
        self._clock = clock
        self._listening = listening
        self._state = RevocationState(retention=event_retention(settings).total_seconds(), margin=60.0)
        self._after = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def refuses(self, claims: Mapping[str, Any]) -> bool:
        """True when the token's session was revoked (claims already verified)."""
        sid = claims.get("sid")
        if not isinstance(sid, str):
            return False
        rule = self._state.refusal(
            sub=str(claims.get("sub")),
            sid=sid,
            token_version=None,
            iat=claims.get("iat"),
            now=self._clock().timestamp(),
        )
        return rule in ("session_revoked", "evicted")

    def changed(self, _payload: str | None = None) -> None:
        """A LISTEN notification: an event committed somewhere."""
        self._changed.set()

    async def sync(self) -> None:
        """Read and merge every event after the last one read."""
        while True:
            page = await events.after(self._db, self._after, PAGE)
            if not page.pruned_through <= self._after <= page.last_seq:
                # Pruned past us (a fresh process, a long outage), or a database restored to an earlier point:
                # what is kept starts after pruned_through and is complete (merging is idempotent).
                self._after = page.pruned_through
                continue
            now = self._clock().timestamp()
            for event in page.events:
                if event.kind == events.SESSION_REVOKED and event.session_id is not None:
                    self._state.apply(
                        SessionRevoked(event.user_id, event.session_id, event.occurred_at.timestamp()), now
                    )
                self._after = event.seq
            self._state.expire(now)
            if len(page.events) < PAGE:
                return

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="issuer-revoked-sessions")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancelled(task)

    async def _run(self) -> None:
        while True:
            await notifications.wait(
                self._changed, notifications.poll_interval(self._listening(), READ_WHILE_LISTENING)
            )
            self._changed.clear()
            try:
                await self.sync()
            except Exception as exc:  # the database may be down for a moment; the next round retries
                log.warning("could not read revocation events (%s)", type(exc).__name__)
