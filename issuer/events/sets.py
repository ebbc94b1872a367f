"""Events as Security Event Tokens (RFC 8417), with CAEP and RISC event types and RFC 9493 subjects.

A SET is made for one polling client (``aud`` is its client id), so each client gets its own ``jti``
(derived from the event's id and the client's); ``txn`` carries the event's id itself, the same for every
client, to correlate them (RFC 8417 section 2.2). ``iat`` is when the event occurred, so a SET is the same
bytes every time it is rendered for the same client and key, which is what lets the feed keep recently
signed ones.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any

from joserfc import jwt

from issuer.keys.ring import LoadedKey
from issuer.storage.events import ACCOUNT_PURGED, SESSION_REVOKED, USER_REVOKED, Event

# The event types and typ the verifier checks (issuer.verifier.sets), written once.
from issuer.verifier.sets import ACCOUNT_PURGED as ACCOUNT_PURGED_URI
from issuer.verifier.sets import SESSION_REVOKED as SESSION_REVOKED_URI
from issuer.verifier.sets import SET_TYP

CACHE_SIZE = 20_000


def claims(event: Event, *, issuer: str, audience: str) -> dict[str, Any]:
    user = {"format": "iss_sub", "iss": issuer, "sub": event.user_id}
    timestamp = int(event.occurred_at.timestamp())
    body: dict[str, Any] = {"event_timestamp": timestamp, "reason_admin": {"en": event.reason}}
    if event.kind == SESSION_REVOKED:
        assert event.session_id is not None
        subject: dict[str, Any] = {
            "format": "complex",
            "user": user,
            "session": {"format": "opaque", "id": event.session_id},
        }
        events = {SESSION_REVOKED_URI: body}
    elif event.kind == USER_REVOKED:
        assert event.token_version is not None
        subject = user
        events = {SESSION_REVOKED_URI: {**body, "token_version": event.token_version}}
    elif event.kind == ACCOUNT_PURGED:
        subject = user
        events = {ACCOUNT_PURGED_URI: body}
    else:
        raise ValueError(f"unknown event kind {event.kind!r}")
    return {
        "iss": issuer,
        "iat": timestamp,
        "jti": str(uuid.uuid5(uuid.UUID(event.id), audience)),
        "txn": event.id,
        "aud": audience,
        "sub_id": subject,
        "events": events,
    }


class SetSigner:
    """Renders and signs SETs, keeping the most recently signed ones: many verifier replicas share one
    client and read the same events, and an RSA signature costs about a millisecond."""

    def __init__(self, issuer: str, size: int = CACHE_SIZE) -> None:
        self._issuer = issuer
        self._size = size
        self._signed: OrderedDict[tuple[str, str, str], tuple[str, str]] = OrderedDict()

    def has(self, event: Event, audience: str, key: LoadedKey) -> bool:
        """Whether :meth:`sign` would answer from what it keeps, without signing."""
        return (event.id, audience, key.record.kid) in self._signed

    def sign(self, event: Event, audience: str, key: LoadedKey) -> tuple[str, str]:
        """``(jti, compact SET)`` of ``event`` for the client ``audience``, signed with ``key``."""
        # By the event's id, never its sequence number: after a restore or a failover that lost commits,
        # numbers are handed out again to other events.
        cache_key = (event.id, audience, key.record.kid)
        signed = self._signed.get(cache_key)
        if signed is not None:
            self._signed.move_to_end(cache_key)
            return signed
        body = claims(event, issuer=self._issuer, audience=audience)
        header = {"alg": "RS256", "typ": SET_TYP, "kid": key.record.kid}
        signed = (body["jti"], jwt.encode(header, body, key.signing_key, algorithms=["RS256"]))
        self._signed[cache_key] = signed
        if len(self._signed) > self._size:
            self._signed.popitem(last=False)
        return signed
