"""Refresh-token families: start one per login, rotate on every use, revoke the family on reuse.

The successor of a token is not random but ``HMAC(secret, token)``: the server stores only hashes, yet
inside the reuse-grace window it can hand the *same* successor to a benign repeat (a second tab, a lost
response) instead of minting a second live token. Outside the window, or once the successor has been
used, a repeat is theft and the whole family dies.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from issuer.audit import audit
from issuer.errors import InvalidGrant, NotFound, RefreshTokenReused, SuspiciousRefresh
from issuer.events import record
from issuer.sessions import binding, tokens
from issuer.storage import sessions, users
from issuer.storage.database import Database
from issuer.storage.sessions import Family
from issuer.storage.users import User


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
    # REFRESH_BINDING=audit found the refresh suspicious (with reject, it raises SuspiciousRefresh instead).
    suspicious: bool = False


@dataclass(frozen=True)
class FamilyPolicy:
    refresh_ttl: timedelta
    session_max_age: timedelta
    reuse_grace: timedelta
    # REUSE_REVOKES=user: reuse revokes every session of the user and bumps their token version.
    reuse_revokes_user: bool = False
    # REFRESH_BINDING: off, audit or reject (issuer.sessions.binding).
    refresh_binding: str = binding.AUDIT


class RefreshFamilies:
    def __init__(self, db: Database, policy: FamilyPolicy, successor_secret: bytes) -> None:
        self._db = db
        self._policy = policy
        self._secret = successor_secret

    def successor_of(self, token: str) -> str:
        """The token that rotating ``token`` issues (derived, see the module docstring)."""
        presented = tokens.parse(token)
        if presented is None:
            raise ValueError("not a refresh token")
        return tokens.successor(presented, self._secret).text

    async def start(
        self, user: User, *, now: datetime, user_agent: str | None, ip: str | None, clear_failures_of: str | None
    ) -> IssuedRefresh:
        """Store a family (a session) for a login at ``now`` and its first token, clearing the login's
        failed-attempt count in the same statement. Raises ``UserGone`` when the user was deleted meanwhile."""
        token = tokens.new(user.id)
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
        await sessions.start(self._db, family, token.hash, clear_failures_of=clear_failures_of)
        return IssuedRefresh(token.text, family.id, token_expires)

    async def rotate(
        self, presented: str, *, now: datetime, ip: str | None = None, user_agent: str | None = None
    ) -> Rotation:
        """Consume ``presented`` and return its successor; raise :class:`InvalidGrant` otherwise.

        The winner's path is one statement (:data:`issuer.storage.sessions.ROTATE`): consume, insert the
        successor, read the user, all or nothing. Only a token that was not live costs more.
        """
        token = tokens.parse(presented)
        if token is None:
            raise InvalidGrant()
        successor = tokens.successor(token, self._secret)
        won = await sessions.rotate(
            self._db,
            token.hash,
            successor.hash,
            now,
            now + self._policy.refresh_ttl,
            ip=ip,
            user_agent=user_agent,
            route=token.user_id,
        )
        if won is not None:
            flagged = self._suspicious(ip, user_agent, won.recent)
            if flagged and self._policy.refresh_binding == binding.REJECT:
                # The successor was issued by the same statement; revoking the session kills it with the rest.
                await self._revoke(won.user.id, won.family_id, now, "binding")
                raise SuspiciousRefresh(user_id=won.user.id, session_id=won.family_id)
            return Rotation(won.user, IssuedRefresh(successor.text, won.family_id, won.expires_at), False, flagged)

        # Not live: unknown, expired, revoked, or a repeat. Decide which.
        found = await sessions.inspect(self._db, token.hash, successor.hash, now, route=token.user_id)
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
            # A replay from another network and browser inside the window is the thief's, not a second tab's.
            flagged = self._suspicious(ip, user_agent, owner.recent)
            if flagged and self._policy.refresh_binding == binding.REJECT:
                await self._revoke(owner.user.id, found.family_id, now, "binding")
                raise SuspiciousRefresh(user_id=owner.user.id, session_id=found.family_id)
            issued = IssuedRefresh(successor.text, found.family_id, found.successor_expires_at)
            return Rotation(owner.user, issued, replayed=True, suspicious=flagged)
        revoked_now = await self._revoke_for_reuse(found, now)
        if revoked_now:
            audit(
                "refresh_reuse",
                "failure",
                user_id=found.user_id,
                ip=ip,
                user_agent=user_agent,
                session_id=found.family_id,
            )
        raise RefreshTokenReused(family_revoked=revoked_now)

    def _suspicious(self, ip: str | None, user_agent: str | None, recent: tuple[sessions.Use, ...]) -> bool:
        return self._policy.refresh_binding != binding.OFF and binding.suspicious(ip, user_agent, recent)

    def _in_grace(self, found: sessions.Presented, now: datetime) -> bool:
        """A repeat of the token just rotated, inside the grace window, whose successor is still unused: a
        benign race (a second tab, a lost response) that gets the same successor back."""
        grace = self._policy.reuse_grace
        assert found.consumed_at is not None
        if grace <= timedelta(0) or now - found.consumed_at > grace:
            return False
        return found.successor_expires_at is not None and found.successor_unused

    async def _revoke_for_reuse(self, found: sessions.Presented, now: datetime) -> bool:
        """Revoke the family (or, with REUSE_REVOKES=user, every session of its user and their token
        version) with its event, in one transaction; True when this call revoked it."""
        async with self._db.transaction() as tx:
            if not await sessions.revoke(tx, found.family_id, now, "reuse"):
                return False  # already revoked (a concurrent reuse, a logout): its event exists
            if self._policy.reuse_revokes_user:
                version = await users.log_out_everywhere(tx, found.user_id, now, reason="reuse")
                if version is not None:
                    await record.user_revoked(tx, user_id=found.user_id, token_version=version, now=now, reason="reuse")
                    return True
            await record.session_revoked(tx, user_id=found.user_id, session_id=found.family_id, now=now, reason="reuse")
        return True

    async def _revoke(self, user_id: str, family_id: str, now: datetime, reason: str) -> None:
        """Revoke one family with its event, in one transaction."""
        async with self._db.transaction() as tx:
            if await sessions.revoke(tx, family_id, now, reason):
                await record.session_revoked(tx, user_id=user_id, session_id=family_id, now=now, reason=reason)

    async def revoke_by_token(self, presented: str, *, now: datetime, reason: str = "logout") -> str | None:
        """Revoke the family a token belongs to, whatever state the token is in, with its event; returns the
        family id, None for a token that was never issued."""
        token = tokens.parse(presented)
        if token is None:
            return None
        async with self._db.transaction() as tx:
            found = await sessions.revoke_by_token(tx, token.hash, now, reason, route=token.user_id)
            if found is not None and found.by_this_call:
                await record.session_revoked(
                    tx, user_id=found.user_id, session_id=found.family_id, now=now, reason=reason
                )
        return None if found is None else found.family_id

    async def live(self, presented: str, *, now: datetime) -> sessions.LiveToken | None:
        """What a refresh token could be redeemed for right now, without consuming it (introspection)."""
        token = tokens.parse(presented)
        if token is None:
            return None
        return await sessions.live_token_owner(self._db, token.hash, now, route=token.user_id)

    async def active_sessions(self, user_id: str, *, now: datetime) -> list[Family]:
        return await sessions.active(self._db, user_id, now)

    async def revoke_session(
        self, user_id: str, family_id: str, *, now: datetime, reason: str = "session_revoked"
    ) -> None:
        """Revoke one of the user's own families, with its event; someone else's id is indistinguishable from
        a missing one (404)."""
        try:
            uuid.UUID(family_id)  # ids are UUIDs; anything else (a NUL byte breaks PostgreSQL) is just missing
        except ValueError:
            raise NotFound("No such session.") from None
        async with self._db.transaction() as tx:
            found = await sessions.revoke_own(tx, user_id, family_id, now, reason)
            if found is not None and found.by_this_call:
                await record.session_revoked(tx, user_id=user_id, session_id=family_id, now=now, reason=reason)
        if found is None:
            raise NotFound("No such session.")
