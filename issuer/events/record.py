"""Recording a revocation's event, inside the revoking transaction (see ``issuer.storage.events``).

Every path that revokes something calls one of these with the transaction it revokes in: logout, session
deletion, RFC 7009 revocation and reuse detection (one session), logout-all and reuse detection under
``REUSE_REVOKES=user`` (every session of a user, with the new token version), account deletion. Session
expiry is not an event: the token expires by itself.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from issuer.storage import events
from issuer.storage.database import Executor


async def session_revoked(tx: Executor, *, user_id: str, session_id: str, now: datetime, reason: str) -> None:
    await events.append(tx, events.Event(_new_id(), now, events.SESSION_REVOKED, user_id, session_id, None, reason))


async def user_revoked(tx: Executor, *, user_id: str, token_version: int, now: datetime, reason: str) -> None:
    """Every session of the user is revoked and tokens below ``token_version`` are dead."""
    await events.append(tx, events.Event(_new_id(), now, events.USER_REVOKED, user_id, None, token_version, reason))


async def account_purged(tx: Executor, *, user_id: str, now: datetime) -> None:
    await events.append(tx, events.Event(_new_id(), now, events.ACCOUNT_PURGED, user_id, None, None, "account_deleted"))


def _new_id() -> str:
    return str(uuid.uuid4())
