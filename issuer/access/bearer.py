"""Bearer authentication for the issuer's own endpoints: signature, claims, and the user's tokenVersion."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
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
from issuer.verifier.errors import UnknownKey
from issuer.verifier.verify import check_claims_with, claims_registry, key_for, parse_token, verify_signature

REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti", "sid", "tokenVersion")

# Every kid the issuer writes is an RFC 7638 SHA-256 thumbprint (generated and imported keys alike): 43
# base64url characters. Only a kid of that shape can name a key this process has not loaded yet.
_THUMBPRINT_KID = re.compile(r"[A-Za-z0-9_-]{43}")
UNKNOWN_KID_RELOAD_INTERVAL = 1.0  # seconds; at most one reload per interval per process


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


class UnknownKidReload:
    """Re-reads the key table for a token that names a kid this process does not hold, at most once per
    ``interval`` seconds (of ``monotonic``), however many such tokens arrive.

    Why: another replica may have activated a key (``issuer keys rotate --now``, or the promotion in a
    revoke) moments ago, and this process hears of it through LISTEN/NOTIFY, or at its next periodic reload
    if that connection is down. Its freshly signed tokens must not be refused meanwhile. A flood of forged
    kids must not become a flood of statements either: callers that arrive while a reload runs share it,
    and callers that arrive within ``interval`` of the last reload's start get none (their kid was unknown
    to a table read less than a second ago) and are refused.

    The reload runs in a task of its own, so a caller that disconnects does not cancel it for the others;
    its error (the database is down) reaches every caller that waited for it.
    """

    def __init__(
        self,
        reload: Callable[[], Awaitable[None]],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        interval: float = UNKNOWN_KID_RELOAD_INTERVAL,
    ) -> None:
        self._reload = reload
        self._monotonic = monotonic
        self._interval = interval
        self._started: float | None = None
        self._running: asyncio.Task[None] | None = None

    async def __call__(self) -> bool:
        """True once a reload has finished for this caller (started by it or joined); False when the last
        one started less than ``interval`` ago, so none runs."""
        running = self._running
        if running is None:
            now = self._monotonic()
            if self._started is not None and now - self._started < self._interval:
                return False
            self._started = now
            running = self._running = asyncio.ensure_future(self._reload())
            running.add_done_callback(self._finished)
        await asyncio.shield(running)
        return True

    def _finished(self, task: asyncio.Task[None]) -> None:
        if self._running is task:
            self._running = None
        if not task.cancelled():
            task.exception()  # retrieved here too, so a reload nobody awaited any more is not logged as lost


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

    A token whose kid this process does not know gets one rate-limited reload of the key table before it
    is refused (:class:`UnknownKidReload`): a key another replica has just activated is accepted here
    even before the notification of it arrives.
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
        monotonic: Callable[[], float] = time.monotonic,
        session_revoked: Callable[[Mapping[str, Any]], bool] = lambda claims: False,
    ) -> None:
        self._users = users
        # The revoked sessions this process has heard of (issuer.events.revoked_sessions): one dict lookup.
        self._session_revoked = session_revoked
        self._unknown_kid_reload = UnknownKidReload(keys.reload, monotonic=monotonic)
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
        claims = await self.verify(bearer_token(request))
        user = await self._users.get(claims["sub"])
        if user is None:
            self._metrics.token_failures.labels("unknown_user").inc()
            raise InvalidToken("The access token's user no longer exists.")
        if claims["tokenVersion"] != user.token_version:
            self._metrics.token_failures.labels("revoked").inc()
            raise InvalidToken("The access token has been revoked.")
        if self._session_revoked(claims):
            self._metrics.token_failures.labels("session_revoked").inc()
            raise InvalidToken("The access token's session has ended.")
        return Caller(user, claims)

    async def verify(self, token: str) -> Mapping[str, Any]:
        """The claims of an access token that is valid now (signature by a published key, typ, iss, aud,
        exp/nbf/iat, required claims, an integer tokenVersion); InvalidToken otherwise. The user's state is
        not read here: :meth:`authenticate` and introspection add that.

        A token naming a kid this process does not hold first gets one rate-limited reload of the key table
        (:class:`UnknownKidReload`) and is checked again after it: another replica may have just activated
        the key, and the notification not arrived yet."""
        try:
            claims = self._claims(token)
        except UnknownKey as exc:
            if not (_names_a_possible_key(token) and await self._unknown_kid_reload()):
                raise self._refused(exc) from None
            try:
                claims = self._claims(token)
            except TokenError as again:
                raise self._refused(again) from None
        except TokenError as exc:
            raise self._refused(exc) from None
        return self._versioned(claims)

    def _refused(self, exc: TokenError) -> InvalidToken:
        self._metrics.token_failures.labels(exc.reason).inc()
        return InvalidToken(exc.detail)

    def _versioned(self, claims: Mapping[str, Any]) -> Mapping[str, Any]:
        version = claims["tokenVersion"]
        if not isinstance(version, int) or isinstance(version, bool):
            self._metrics.token_failures.labels("invalid_claims").inc()
            raise InvalidToken("The access token has an invalid 'tokenVersion' claim.")
        return claims

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


def _names_a_possible_key(token: str) -> bool:
    """Whether the token's header names a kid of the shape the issuer's keys have (parsed again: this runs
    only for a kid that was not found)."""
    try:
        kid = parse_token(token).kid
    except TokenError:
        return False
    return kid is not None and _THUMBPRINT_KID.fullmatch(kid) is not None
