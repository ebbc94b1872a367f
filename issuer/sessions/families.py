"""Refresh-token families: start one per login, rotate on every use, revoke the family on reuse.

The successor of a token is not random but ``HMAC(secret, token)``: the server stores only hashes, yet
inside the reuse-grace window it can hand the *same* successor to a benign repeat (a second tab, a lost
response) instead of minting a second live token. Outside the window, or once the successor has been
used, a repeat is theft and the whole family dies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from issuer.errors import InvalidGrant, NotFound, RefreshTokenReused
from issuer.storage import sessions
from issuer.storage.database import Database
from issuer.storage.sessions import Family
from issuer.storage.users import User

log = logging.getLogger("issuer.audit")

_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


def new_refresh_token() -> str:
    """256 bits from the OS CSPRNG, base64url without padding (43 characters)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


@dataclass(frozen=True)
class IssuedRefresh:
    token: str
    family_id: str
    expires_at: datetime


@dataclass(frozen=True)
class Rotation:
    user: User
    refresh: IssuedRefresh
    replayed: bool


@dataclass(frozen=True)
class FamilyPolicy:
    refresh_ttl: timedelta
    session_max_age: timedelta
    reuse_grace: timedelta


class RefreshFamilies:
    def __init__(self, db: Database, policy: FamilyPolicy, successor_secret: bytes) -> None:
        self._db = db
        self._policy = policy
        self._secret = successor_secret

    def successor_of(self, token: str) -> str:
        mac = hmac.new(self._secret, b"refresh-successor\x00" + token.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    async def start(
        self, user: User, *, now: datetime, user_agent: str | None, ip: str | None, clear_failures_of: str | None
    ) -> IssuedRefresh:
        """Store a family (a session) for a login at ``now`` and its first token, clearing the login's
        failed-attempt count in the same statement. Raises ``UserGone`` when the user was deleted meanwhile."""
        token = new_refresh_token()
        family_expires = now + self._policy.session_max_age
        token_expires = min(now + self._policy.refresh_ttl, family_expires)
        family = Family(
            id=str(uuid.uuid4()),
            user_id=user.id,
            created_at=now,
            last_used_at=now,
            expires_at=family_expires,
            idle_expires_at=token_expires,
            user_agent=user_agent[:512] if user_agent else None,
            ip=ip,
            revoked_at=None,
            revoked_reason=None,
        )
        await sessions.start(self._db, family, token_hash(token), clear_failures_of=clear_failures_of)
        return IssuedRefresh(token, family.id, token_expires)

    async def rotate(
        self, presented: str, *, now: datetime, ip: str | None = None, user_agent: str | None = None
    ) -> Rotation:
        """Consume ``presented`` and return its successor; raise :class:`InvalidGrant` otherwise.

        The winner's path is one statement (:data:`issuer.storage.sessions.ROTATE`): consume, insert the
        successor, read the user, all or nothing. Only a token that was not live costs more.
        """
        if not _TOKEN_SHAPE.fullmatch(presented):
            raise InvalidGrant()
        presented_hash = token_hash(presented)
        successor = self.successor_of(presented)
        successor_hash = token_hash(successor)

        won = await sessions.rotate(self._db, presented_hash, successor_hash, now, now + self._policy.refresh_ttl)
        if won is not None:
            family_id, expires, user = won
            return Rotation(user, IssuedRefresh(successor, family_id, expires), replayed=False)

        # Not live: unknown, expired, revoked, or a repeat. Decide which.
        found = await sessions.inspect(self._db, presented_hash, successor_hash, now)
        if found is None:
            raise InvalidGrant()
        if found.family_ended:
            raise InvalidGrant("The refresh token's session has ended.")
        if found.consumed_at is None:
            raise InvalidGrant("The refresh token has expired.")
        if self._in_grace(found, now):
            # Read the family's state again with the user, in one statement: a revoke, logout-all or account
            # deletion that committed after the statement above is seen here.
            owner = await sessions.user_of_live_family(self._db, found.family_id, now)
            if owner is None:
                raise InvalidGrant("The refresh token's session has ended.")
            assert found.successor_expires_at is not None
            return Rotation(owner, IssuedRefresh(successor, found.family_id, found.successor_expires_at), replayed=True)
        revoked_now = await sessions.revoke(self._db, found.family_id, now, "reuse")
        if revoked_now:
            log.warning(
                "refresh token reuse detected; family revoked",
                extra={
                    "event": "refresh_reuse",
                    "family_id": found.family_id,
                    "user_id": found.user_id,
                    "ip": ip,
                    "user_agent": user_agent,
                },
            )
        raise RefreshTokenReused(family_revoked=revoked_now)

    def _in_grace(self, found: sessions.Presented, now: datetime) -> bool:
        """A repeat of the token just rotated, inside the grace window, whose successor is still unused: a
        benign race (a second tab, a lost response) that gets the same successor back."""
        grace = self._policy.reuse_grace
        assert found.consumed_at is not None
        if grace <= timedelta(0) or now - found.consumed_at > grace:
            return False
        return found.successor_expires_at is not None and found.successor_unused

    async def revoke_by_token(self, presented: str, *, now: datetime, reason: str = "logout") -> str | None:
        """Revoke the family a token belongs to, whatever state the token is in; returns the family id."""
        if not _TOKEN_SHAPE.fullmatch(presented):
            return None
        found = await sessions.revoke_by_token(self._db, token_hash(presented), now, reason)
        return None if found is None else found[0]

    async def active_sessions(self, user_id: str, *, now: datetime) -> list[Family]:
        return await sessions.active(self._db, user_id, now)

    async def revoke_session(self, user_id: str, family_id: str, *, now: datetime) -> None:
        """Revoke one of the user's own families; someone else's id is indistinguishable from a missing one."""
        try:
            uuid.UUID(family_id)  # ids are UUIDs; anything else (a NUL byte breaks PostgreSQL) is just missing
        except ValueError:
            raise NotFound("No such session.") from None
        if not await sessions.revoke_own(self._db, user_id, family_id, now, "session_revoked"):
            raise NotFound("No such session.")
