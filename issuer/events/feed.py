"""The security-event feed: RFC 8936 poll delivery with a non-destructive cursor (our extension).

Many verifier replicas read one stream with one client's credentials, so reading removes nothing and
``ack`` is accepted and ignored; each reader keeps its own position, the cursor. A cursor is the last
sequence number it has read, bound to the client by a MAC: a cursor replayed by another client, or made up,
is refused. Sequence numbers follow commit order with no gaps (``issuer.storage.events``), so a cursor
never skips an event that commits late. Events are kept ``retention`` (at least the access-token lifetime
plus leeway, plus a margin), so the kept window holds every event that can still matter to a token, and a
reader without a cursor, or with one older than the window (400 ``cursor_expired``), starts from its
beginning and is complete.

A poll without ``returnImmediately`` waits (up to ``long_poll`` seconds) until an event exists after the
cursor. Waiters wake on the LISTEN notification of a committed event, and re-read every second while the
LISTEN connection is down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from issuer.clock import Clock
from issuer.errors import CursorExpired, InvalidRequest, ServiceUnavailable
from issuer.events.sets import SetSigner
from issuer.keys.manager import KeyManager
from issuer.settings import Settings
from issuer.storage import events, notifications
from issuer.storage.database import Database

DEFAULT_MAX_EVENTS = 100
MAX_EVENTS = 1000
# New signatures per answer; the rest of the page follows in the next poll (moreAvailable).
SIGNATURES_PER_ANSWER = 100
LONG_POLL_SECONDS = 25.0
# How often a waiting poll re-reads anyway while notifications arrive (the safety net against a lost one).
POLL_WHILE_LISTENING = 10.0
RETENTION_MARGIN = timedelta(minutes=10)


def event_retention(settings: Settings) -> timedelta:
    """How long events are kept: every token issued before an event has expired by then."""
    return timedelta(seconds=settings.access_token_ttl + settings.clock_leeway) + RETENTION_MARGIN


@dataclass(frozen=True)
class Delivery:
    sets: dict[str, str]
    more_available: bool
    cursor: str


class EventFeed:
    def __init__(
        self,
        db: Database,
        keys: KeyManager,
        clock: Clock,
        *,
        issuer: str,
        cursor_secret: bytes,
        listening: Callable[[], bool] = lambda: False,
        long_poll: float = LONG_POLL_SECONDS,
    ) -> None:
        self._db = db
        self._keys = keys
        self._clock = clock
        self._secret = cursor_secret
        self._signer = SetSigner(issuer)
        self._listening = listening
        self.long_poll = long_poll
        self._arrived = asyncio.Event()

    def wake(self, _payload: str | None = None) -> None:
        """An event was committed somewhere (a LISTEN notification): wake every waiting poll."""
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def poll(self, client_id: str, *, cursor: str | None, max_events: int, return_immediately: bool) -> Delivery:
        after = None if cursor is None else self._read_cursor(cursor, client_id)
        deadline = asyncio.get_running_loop().time() + (0.0 if return_immediately else self.long_poll)
        while True:
            arrived = self._arrived  # taken before the read: an event committed after it still wakes us
            # One more than asked, to tell whether more are available.
            page = await events.after(self._db, after or 0, max_events + 1)
            if after is not None and not page.pruned_through <= after <= page.last_seq:
                # Older than the kept window, or from a database restored to an earlier point.
                raise CursorExpired()
            remaining = deadline - asyncio.get_running_loop().time()
            if page.events or max_events == 0 or remaining <= 0:
                break
            await notifications.wait(
                arrived, min(remaining, notifications.poll_interval(self._listening(), POLL_WHILE_LISTENING))
            )
        chosen = page.events[:max_events]
        sets: dict[str, str] = {}
        if chosen:
            key = self._keys.signing_key(self._clock())
            if key is None:
                raise ServiceUnavailable("No signing key is active.")
            signed_here = 0
            for index, event in enumerate(chosen):
                if not self._signer.has(event, client_id, key):
                    # An RSA signature is about a millisecond of this worker's only thread: a backlog is
                    # signed a bounded page at a time, yielding between signatures, so other requests
                    # keep being served while a new client catches up.
                    if signed_here == SIGNATURES_PER_ANSWER:
                        chosen = chosen[:index]
                        break
                    signed_here += 1
                    await asyncio.sleep(0)
                jti, token = self._signer.sign(event, client_id, key)
                sets[jti] = token
        more = len(page.events) > len(chosen)
        last = chosen[-1].seq if chosen else (after if after is not None else page.pruned_through)
        return Delivery(sets, more, self._write_cursor(last, client_id))

    # ------------------------------------------------------------ cursors

    def _mac(self, seq: int, client_id: str) -> str:
        digest = hmac.new(self._secret, f"{client_id}\x00{seq}".encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def _write_cursor(self, seq: int, client_id: str) -> str:
        return f"{seq}.{self._mac(seq, client_id)}"

    def _read_cursor(self, cursor: str, client_id: str) -> int:
        number, _, mac = cursor.partition(".")
        if not (number.isascii() and number.isdigit() and len(number) <= 18 and mac):
            raise InvalidRequest("'cursor' is not a cursor this feed gave out.")
        seq = int(number)
        try:
            valid = hmac.compare_digest(mac.encode("ascii"), self._mac(seq, client_id).encode("ascii"))
        except (UnicodeEncodeError, binascii.Error):
            valid = False
        if not valid:
            raise InvalidRequest("'cursor' was not given to this client.")
        return seq
