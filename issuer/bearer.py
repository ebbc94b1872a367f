"""Bearer authentication for the issuer's own endpoints: signature, claims, and the user's tokenVersion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from issuer import hotpath, store
from issuer.clock import Clock
from issuer.errors import InvalidToken, Unauthenticated
from issuer.key_manager import KeyManager
from issuer.metrics import Metrics
from issuer.settings import Settings
from issuer.store import User
from issuer.verifier import TokenError, verify_access_token


@dataclass(frozen=True)
class Caller:
    user: User
    claims: dict[str, Any]

    @property
    def session_id(self) -> str | None:
        sid = self.claims.get("sid")
        return sid if isinstance(sid, str) else None


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthenticated()
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        # RFC 6750 section 3.1: another authentication method counts as no credentials (no error code).
        raise Unauthenticated()
    if not token.strip():
        raise InvalidToken("The Authorization header must be 'Bearer <access token>'.")
    return token.strip()


class BearerAuth:
    def __init__(
        self, engine: AsyncEngine, keys: KeyManager, settings: Settings, clock: Clock, metrics: Metrics
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._settings = settings
        self._clock = clock
        self._metrics = metrics

    async def authenticate(self, request: Request) -> Caller:
        token = bearer_token(request)
        now = self._clock()
        try:
            claims = verify_access_token(
                token,
                self._keys.ring.verification_key_map(now),
                issuer=self._settings.issuer_url,
                audience=self._settings.audience,
                now=int(now.timestamp()),
                leeway=self._settings.clock_leeway,
                required_claims=("iss", "aud", "sub", "exp", "iat", "jti", "sid", "tokenVersion"),
            )
        except TokenError as exc:
            self._metrics.token_failures.labels(exc.reason).inc()
            raise InvalidToken(exc.detail) from None
        version = claims["tokenVersion"]
        if not isinstance(version, int) or isinstance(version, bool):
            self._metrics.token_failures.labels("invalid_claims").inc()
            raise InvalidToken("The access token has an invalid 'tokenVersion' claim.")
        user = await self._user(claims["sub"])
        if user is None:
            self._metrics.token_failures.labels("unknown_user").inc()
            raise InvalidToken("The access token's user no longer exists.")
        if version != user.token_version:
            self._metrics.token_failures.labels("revoked").inc()
            raise InvalidToken("The access token has been revoked.")
        return Caller(user, claims)

    async def _user(self, user_id: str) -> User | None:
        """One indexed lookup; on PostgreSQL one round trip with no transaction around it."""
        if hotpath.is_postgres(self._engine):
            return await hotpath.user_by_id(self._engine, user_id)
        async with self._engine.connect() as conn:
            return await store.user_by_id(conn, user_id)
