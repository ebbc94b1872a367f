"""RFC 7662 introspection and RFC 7009 revocation, for registered clients.

Introspection answers for the truth, not for the signature alone: an access token is active only while its
signature, ``exp``, signing key, ``tokenVersion``, session and user all still hold (one round trip reads the
session and the user together). A refresh token is active while it could be redeemed, and is only read,
never consumed. Every inactive answer is exactly ``{"active": false}``: a client learns nothing about why.

Revocation takes a refresh token or an access token and revokes the whole session either names (an access
token cannot be revoked alone: it is a self-contained JWT, so its session is what dies, and verifiers
following the feed refuse it from then on). Unknown, expired and already revoked tokens get the same 200.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from issuer.access.bearer import BearerAuth
from issuer.errors import InvalidToken, NotFound, UnsupportedTokenType
from issuer.keys.manager import KeyManager
from issuer.sessions import tokens
from issuer.sessions.families import RefreshFamilies
from issuer.settings import Settings
from issuer.storage import sessions
from issuer.storage.database import Database
from issuer.verifier import TokenError
from issuer.verifier.errors import WrongType
from issuer.verifier.sets import SETRefused, parse_set, verified_claims
from issuer.verifier.verify import key_for, parse_token, verify_signature

INACTIVE: dict[str, Any] = {"active": False}


class TokenIntrospection:
    def __init__(
        self, db: Database, bearer: BearerAuth, keys: KeyManager, families: RefreshFamilies, settings: Settings
    ) -> None:
        self._db = db
        self._bearer = bearer
        self._keys = keys
        self._families = families
        self._settings = settings

    async def introspect(self, token: str, *, now: datetime) -> dict[str, Any]:
        """RFC 7662 section 2.1 lets ``token_type_hint`` order the lookups; the two kinds cannot be confused
        (their shapes differ), so it is accepted and not needed."""
        if tokens.parse(token) is not None:
            return await self._refresh(token, now)
        return await self._access(token, now)

    async def _access(self, token: str, now: datetime) -> dict[str, Any]:
        try:
            claims = await self._bearer.verify(token)
        except InvalidToken:
            return INACTIVE
        if claims["exp"] <= now.timestamp():
            # Active means unexpired (RFC 7662): CLOCK_LEEWAY is for verifiers' clocks, and the client
            # asking applies its own.
            return INACTIVE
        sid = claims["sid"]
        live = await sessions.user_of_live_family(self._db, sid, now) if isinstance(sid, str) else None
        user = None if live is None else live.user
        if user is None or user.id != claims["sub"] or user.token_version != claims["tokenVersion"]:
            return INACTIVE
        return {
            "active": True,
            "token_type": "access_token",
            "iss": claims["iss"],
            "aud": claims["aud"],
            "sub": claims["sub"],
            "exp": claims["exp"],
            "iat": claims["iat"],
            "jti": claims["jti"],
            "sid": sid,
            "username": user.email,
            "role": user.role,
            "tokenVersion": user.token_version,
        }

    async def _refresh(self, token: str, now: datetime) -> dict[str, Any]:
        live = await self._families.live(token, now=now)
        if live is None:
            return INACTIVE
        return {
            "active": True,
            "token_type": "refresh_token",
            "iss": self._settings.issuer_url,
            "sub": live.user.id,
            "sid": live.family_id,
            "iat": int(live.issued_at.timestamp()),
            "exp": int(live.expires_at.timestamp()),
            "username": live.user.email,
        }

    async def revoke(self, token: str, *, now: datetime) -> None:
        """Revoke the session of a refresh or access token (with its event); silently nothing for a token
        that is unknown, dead or not ours. UnsupportedTokenType for a Security Event Token this issuer signed:
        ours, but not a token that can be revoked."""
        if tokens.parse(token) is not None:
            await self._families.revoke_by_token(token, now=now, reason="revocation")
            return
        try:
            parsed = parse_token(token)
            # Any expiry: an expired token's session may still be live. The key must still be published.
            _, key = key_for(parsed, self._keys.ring.verification_key_map(now))
            claims = verify_signature(parsed, key)
        except WrongType:
            if self._is_our_set(token, now):
                raise UnsupportedTokenType("Only refresh tokens and access tokens can be revoked.") from None
            return  # not ours: RFC 7009 answers an unknown token like any other
        except TokenError:
            return
        sub, sid = claims.get("sub"), claims.get("sid")
        if claims.get("iss") != self._settings.issuer_url or not isinstance(sub, str) or not isinstance(sid, str):
            return
        with contextlib.suppress(NotFound):
            await self._families.revoke_session(sub, sid, now=now, reason="revocation")

    def _is_our_set(self, token: str, now: datetime) -> bool:
        """A Security Event Token this issuer signed (verified; a forged one is just unknown)."""
        try:
            parsed = parse_set(token)
            key = self._keys.ring.verification_key_map(now).get(parsed.kid)
            return key is not None and verified_claims(parsed, key).get("iss") == self._settings.issuer_url
        except SETRefused:
            return False
