"""Bearer authentication for the issuer's own endpoints: signature, claims, and the user's tokenVersion."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from joserfc.jwk import RSAKey
from starlette.requests import HTTPConnection

from issuer.access.user_lookup import UserLookup
from issuer.clock import Clock
from issuer.errors import InvalidToken, Unauthenticated
from issuer.keys.manager import KeyManager
from issuer.metrics import Metrics
from issuer.settings import Settings
from issuer.storage.users import User
from issuer.verifier import TokenError
from issuer.verifier.verify import check_claims_with, claims_registry, key_for, parse_token, verify_signature

REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti", "sid", "tokenVersion")


@dataclass(frozen=True)
class Caller:
    user: User
    claims: Mapping[str, Any]

    @property
    def session_id(self) -> str | None:
        sid = self.claims.get("sid")
        return sid if isinstance(sid, str) else None


@dataclass(frozen=True, slots=True)
class _Verified:
    claims: Mapping[str, Any]
    kid: str
    key: RSAKey
    # The seconds ``now`` for which exp/nbf/iat pass, the only rules whose outcome changes with time.
    valid_from: float
    valid_until: float


def bearer_token(request: HTTPConnection) -> str:
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
    """Verifies the token, then reads the caller's user from the database on every request.

    Signatures: a client calls with the same access token many times, so the claims of a token whose
    signature checked out are kept, keyed by the exact token string, together with the key object that
    checked it (as gateways such as Envoy's jwt_authn do). A later call with that very string skips the
    RSA operation only while that same key is still published: a revoked or gone key leaves the
    verification map and takes its tokens' entries with it. Of the claim rules, only exp/nbf/iat can change
    their outcome, and only with the clock, so the entry keeps the time window in which they hold; outside
    it the full check runs again and names the rule that failed. The memo is bounded (oldest entries
    leave first).

    The user and its tokenVersion are never cached: that read is what makes logout-all and account
    deletion take effect at once (``UserLookup`` batches concurrent reads without weakening that).
    """

    def __init__(
        self,
        users: UserLookup,
        keys: KeyManager,
        settings: Settings,
        clock: Clock,
        metrics: Metrics,
        *,
        memo_size: int = 4096,
    ) -> None:
        self._users = users
        self._keys = keys
        self._clock = clock
        self._metrics = metrics
        self._settings = settings
        self._memo: dict[str, _Verified] = {}
        self._memo_size = memo_size
        # One registry for every call: it reads the clock itself, on each check.
        self._registry = claims_registry(
            issuer=settings.issuer_url,
            audience=settings.audience,
            now=lambda: int(clock().timestamp()),
            leeway=settings.clock_leeway,
        )

    async def authenticate(self, request: HTTPConnection) -> Caller:
        token = bearer_token(request)
        try:
            claims = self._claims(token)
        except TokenError as exc:
            self._metrics.token_failures.labels(exc.reason).inc()
            raise InvalidToken(exc.detail) from None
        version = claims["tokenVersion"]
        if not isinstance(version, int) or isinstance(version, bool):
            self._metrics.token_failures.labels("invalid_claims").inc()
            raise InvalidToken("The access token has an invalid 'tokenVersion' claim.")
        user = await self._users.get(claims["sub"])
        if user is None:
            self._metrics.token_failures.labels("unknown_user").inc()
            raise InvalidToken("The access token's user no longer exists.")
        if version != user.token_version:
            self._metrics.token_failures.labels("revoked").inc()
            raise InvalidToken("The access token has been revoked.")
        return Caller(user, claims)

    def _claims(self, token: str) -> Mapping[str, Any]:
        """The token's claims if it is valid now; the RSA check is skipped for a token already checked."""
        now = self._clock()
        keys = self._keys.ring.verification_key_map(now)
        known = self._memo.get(token)
        if known is not None and keys.get(known.kid) is known.key:
            if known.valid_from <= int(now.timestamp()) < known.valid_until:
                return known.claims  # every rule passed for these claims, and none has changed with time
            claims, kid, key = known.claims, known.kid, known.key  # the full check names the failed rule
        else:
            parsed = parse_token(token)
            kid, key = key_for(parsed, keys)
            claims = MappingProxyType(verify_signature(parsed, key))
        check_claims_with(claims, self._registry, REQUIRED_CLAIMS)  # type: ignore[arg-type]  # only reads
        self._remember(token, _Verified(claims, kid, key, *self._time_window(claims)))
        return claims

    def _time_window(self, claims: Mapping[str, Any]) -> tuple[float, float]:
        """From the claims that just passed: exp > now - leeway, and nbf, iat <= now + leeway."""
        leeway = self._settings.clock_leeway
        starts = [claims[name] for name in ("nbf", "iat") if name in claims]
        return max(starts) - leeway, claims["exp"] + leeway

    def _remember(self, token: str, verified: _Verified) -> None:
        memo = self._memo
        # A token checked again after a key reload gets its entry replaced: the old one names a key object
        # that is no longer in the map, and would send every later call to the RSA check.
        if token not in memo and len(memo) >= self._memo_size:
            del memo[next(iter(memo))]
        memo[token] = verified
