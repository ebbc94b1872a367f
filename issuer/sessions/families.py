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

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from issuer.errors import InvalidGrant, NotFound, RefreshTokenReused
from issuer.storage import database as hotpath
from issuer.storage import store
from issuer.storage.database import HotPool
from issuer.storage.store import Family, User

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
    def __init__(
        self, engine: AsyncEngine, policy: FamilyPolicy, successor_secret: bytes, hot: HotPool | None = None
    ) -> None:
        self._engine = engine
        self._hot = hot
        self._policy = policy
        self._secret = successor_secret

    def successor_of(self, token: str) -> str:
        mac = hmac.new(self._secret, b"refresh-successor\x00" + token.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")

    def new_family(
        self, user: User, *, now: datetime, user_agent: str | None, ip: str | None
    ) -> tuple[Family, IssuedRefresh]:
        """A family (a session) for a login at ``now`` and its first token, not yet stored."""
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
        return family, IssuedRefresh(token, family.id, token_expires)

    async def start(self, user: User, *, now: datetime, user_agent: str | None, ip: str | None) -> IssuedRefresh:
        """Create a family and its first token in one transaction (on PostgreSQL a login stores them in its
        own last statement instead: ``login``)."""
        family, issued = self.new_family(user, now=now, user_agent=user_agent, ip=ip)
        async with self._engine.begin() as conn:
            await store.insert_family(conn, family)
            await store.insert_token(conn, token_hash(issued.token), family.id, now, issued.expires_at)
        return issued

    async def rotate(
        self, presented: str, *, now: datetime, ip: str | None = None, user_agent: str | None = None
    ) -> Rotation:
        """Consume ``presented`` and return its successor; raise :class:`InvalidGrant` otherwise."""
        if not _TOKEN_SHAPE.fullmatch(presented):
            raise InvalidGrant()
        presented_hash = token_hash(presented)
        successor = self.successor_of(presented)

        won = await self._consume_and_succeed(presented_hash, token_hash(successor), now)
        if won is not None:
            family_id, expires, user = won
            return Rotation(user, IssuedRefresh(successor, family_id, expires), replayed=False)

        # We did not win the conditional update: unknown, expired, revoked, or a repeat. Decide which.
        async with self._engine.begin() as conn:
            found = await store.token_with_family(conn, presented_hash)
            if found is None:
                raise InvalidGrant()
            token, family = found
            if family.revoked_at is not None or family.expires_at <= now:
                raise InvalidGrant("The refresh token's session has ended.")
            if token.consumed_at is None:
                raise InvalidGrant("The refresh token has expired.")
            replay = await self._replay(conn, token.consumed_at, successor, now)
            if replay is not None:
                # No lock is held here: read the family's state again with the user, in one statement. A
                # revoke, logout-all or account deletion that committed after the reads above is seen here.
                user = await store.user_of_live_family(conn, family.id, now)
                if user is None:
                    raise InvalidGrant("The refresh token's session has ended.")
                return Rotation(user, IssuedRefresh(successor, family.id, replay), replayed=True)
            revoked_now = await store.revoke_family(conn, family.id, now, "reuse")
        if revoked_now:
            log.warning(
                "refresh token reuse detected; family revoked",
                extra={
                    "event": "refresh_reuse",
                    "family_id": family.id,
                    "user_id": family.user_id,
                    "ip": ip,
                    "user_agent": user_agent,
                },
            )
        raise RefreshTokenReused(family_revoked=revoked_now)

    async def _consume_and_succeed(
        self, presented_hash: bytes, successor_hash: bytes, now: datetime
    ) -> tuple[str, datetime, User] | None:
        """The winner's path: consume the token, insert its successor, read the user; all or nothing.

        On PostgreSQL this is one statement and one round trip (``hotpath.ROTATE_SQL``); elsewhere the same
        steps run in one transaction. None when the token was not live (the caller finds out why).
        """
        longest = now + self._policy.refresh_ttl
        if self._hot is not None:
            return await hotpath.rotate(self._hot, presented_hash, successor_hash, now, longest)
        async with self._engine.begin() as conn:
            family_id = await store.consume_token(conn, presented_hash, now)
            if family_id is None:
                return None
            family = await store.family_by_id(conn, family_id)
            assert family is not None
            expires = min(longest, family.expires_at)
            await store.insert_token(conn, successor_hash, family_id, now, expires)
            await store.touch_family(conn, family_id, now, expires)
            user = await store.user_by_id(conn, family.user_id)
            assert user is not None  # the FK guarantees it inside this transaction
            return family_id, expires, user

    async def _replay(
        self, conn: AsyncConnection, consumed_at: datetime, successor: str, now: datetime
    ) -> datetime | None:
        """Expiry of the still-unused successor if this repeat is inside the grace window, else None."""
        grace = self._policy.reuse_grace
        if grace <= timedelta(0) or now - consumed_at > grace:
            return None
        row = await store.token_by_hash(conn, token_hash(successor))
        if row is None or row.consumed_at is not None or row.expires_at <= now:
            return None
        return row.expires_at

    async def revoke_by_token(self, presented: str, *, now: datetime, reason: str = "logout") -> str | None:
        """Revoke the family a token belongs to, whatever state the token is in; returns the family id."""
        if not _TOKEN_SHAPE.fullmatch(presented):
            return None
        async with self._engine.begin() as conn:
            row = await store.token_by_hash(conn, token_hash(presented))
            if row is None:
                return None
            await store.revoke_family(conn, row.family_id, now, reason)
            return row.family_id

    async def active_sessions(self, user_id: str, *, now: datetime) -> list[Family]:
        async with self._engine.connect() as conn:
            return list(await store.active_families(conn, user_id, now))

    async def revoke_session(self, user_id: str, family_id: str, *, now: datetime) -> None:
        """Revoke one of the user's own families; someone else's id is indistinguishable from a missing one."""
        try:
            uuid.UUID(family_id)  # ids are UUIDs; anything else (a NUL byte breaks PostgreSQL) is just missing
        except ValueError:
            raise NotFound("No such session.") from None
        async with self._engine.begin() as conn:
            family = await store.family_by_id(conn, family_id)
            if family is None or family.user_id != user_id:
                raise NotFound("No such session.")
            await store.revoke_family(conn, family.id, now, "session_revoked")
