"""``AccessTokenVerifier``: the issuer's access tokens checked against a cached JWKS, with no call per request.

The checks run in RFC 8725 order (see :mod:`issuer.verifier.verify`): the header against the allow-list
first, then the key (a synchronous dict lookup while the cache is fresh; the cache's rules otherwise), the
signature, and the claims. A gateway without Starlette uses this class directly::

    verifier = AccessTokenVerifier(issuer="https://issuer.example", audience="api")
    token = await verifier.verify(raw)  # raises TokenError (401) or VerifierUnavailable (503)

With ``events=RevocationFeed(client_id, client_secret)`` it also follows the issuer's revocation feed
(:mod:`issuer.verifier.events`) and refuses revoked tokens with :class:`Revoked`; ``ready`` and ``status()``
report whether it can vouch for tokens, for a readiness probe and metrics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from issuer.verifier.errors import InvalidClaims, UnknownKey
from issuer.verifier.events import RevocationFeed
from issuer.verifier.jwks import JWKSCache
from issuer.verifier.verify import REQUIRED_CLAIMS, check_claims_with, claims_registry, parse_token, verify_signature

log = logging.getLogger("issuer.verifier")

# Without these a token would not say who it is for, from whom, about whom, or until when.
_ALWAYS_REQUIRED = frozenset({"iss", "aud", "sub", "exp"})


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified access token. ``claims`` holds every claim as signed; the fields are the common ones."""

    sub: str
    exp: int
    iat: int | None
    jti: str | None
    sid: str | None
    role: str | None
    email: str | None
    token_version: int | None
    scopes: tuple[str, ...]
    claims: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> AccessToken:
        """Build from claims that passed :func:`check_claims_with`; a mistyped optional claim is refused."""
        scope = _optional(claims, "scope", str)
        iat = claims.get("iat")
        return cls(
            sub=claims["sub"],
            exp=int(claims["exp"]),
            iat=None if iat is None else int(iat),
            jti=_optional(claims, "jti", str),
            sid=_optional(claims, "sid", str),
            role=_optional(claims, "role", str),
            email=_optional(claims, "email", str),
            token_version=_optional(claims, "tokenVersion", int),
            scopes=tuple(scope.split()) if scope else (),
            claims=claims,
        )


def _optional(claims: dict[str, Any], name: str, kind: type) -> Any:
    value = claims.get(name)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise InvalidClaims(f"The access token has an invalid {name!r} claim.")


class AccessTokenVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: JWKSCache | None = None,
        leeway: int = 5,
        required_claims: Iterable[str] = REQUIRED_CLAIMS,
        clock: Callable[[], float] = time.time,
        events: RevocationFeed | None = None,
    ) -> None:
        """``jwks`` defaults to a :class:`JWKSCache` that discovers ``jwks_uri`` from ``issuer``'s metadata.

        ``clock`` is the wall clock in epoch seconds (tests inject a simulated one). ``required_claims`` is
        the full list a token must carry; it must include ``iss``, ``aud``, ``sub`` and ``exp`` (and, with
        ``events``, ``iat`` is added: the revocation window is reasoned from it).

        ``events``: a :class:`RevocationFeed` to follow; its SETs are checked against this verifier's issuer
        and JWKS, and its loop runs in :meth:`lifespan`. One feed per verifier.
        """
        required = tuple(required_claims)
        missing = _ALWAYS_REQUIRED.difference(required)
        if missing:
            raise ValueError(f"required_claims must include {', '.join(sorted(missing))}")
        if leeway < 0:
            raise ValueError("leeway must be >= 0")
        if events is not None and "iat" not in required:
            required = (*required, "iat")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.required_claims = required
        self.jwks = jwks if jwks is not None else JWKSCache(issuer=issuer)
        self.events = events
        self._claims = claims_registry(issuer=issuer, audience=audience, now=lambda: int(clock()), leeway=leeway)
        if events is not None:
            events.bind(issuer=issuer, jwks=self.jwks, clock=clock, leeway=leeway)

    async def verify(self, token: str) -> AccessToken:
        """The verified token, or a :class:`TokenError` (the token's fault) or :class:`VerifierUnavailable` (no
        usable keys, or a stale revocation feed under ``on_stale="reject"``)."""
        parsed = parse_token(token)
        kid = parsed.kid
        if kid is None:
            raise UnknownKey()
        key = self.jwks.peek(kid)
        if key is None:  # cold, stale or unknown kid: the cache decides whether to fetch
            key = await self.jwks.get_key(kid)
        claims = verify_signature(parsed, key)
        check_claims_with(claims, self._claims, self.required_claims)
        access = AccessToken.from_claims(claims)
        if self.events is not None:
            self.events.check(access)  # Revoked, or the stale policy
        return access

    @property
    def ready(self) -> bool:
        """Whether this verifier can vouch for tokens now: keys usable, and the revocation feed (if any) ready.

        For a readiness probe: a replica that answers False should get no traffic yet.
        """
        return self.jwks.usable and (self.events is None or self.events.ready)

    def status(self) -> dict[str, Any]:
        """``ready``, the JWKS cache's counters and the feed's gauges and counters, JSON-friendly."""
        stats = self.jwks.stats
        status: dict[str, Any] = {
            "ready": self.ready,
            "jwks": {
                "usable": self.jwks.usable,
                "kids": len(self.jwks.kids),
                "fetches": stats.jwks_fetches,
                "not_modified": stats.not_modified,
                "failures": stats.failures,
                "unknown_kid_refetches": stats.unknown_kid_refetches,
                "last_error": stats.last_error,
            },
        }
        if self.events is not None:
            status["events"] = self.events.status()
        return status

    async def start(self) -> None:
        """Warm the key cache, start the revocation feed and wait for its first sync (up to its ``startup_wait``).

        Neither failing is fatal: an issuer that is down is logged, and ``ready`` stays False until it answers.
        """
        if not await self.jwks.refresh():
            log.warning("could not fetch the issuer's keys at start-up (%s); will retry", self.jwks.stats.last_error)
        if self.events is not None:
            self.events.start()
            if not await self.events.wait_synced(self.events.startup_wait):
                log.warning(
                    "the revocation feed is not synchronised after %.0f s (%s); serving with on_stale=%s",
                    self.events.startup_wait,
                    self.events.stats.last_error,
                    self.events.on_stale,
                )

    async def aclose(self) -> None:
        """Stop the revocation feed, close the JWKS cache (and the HTTP clients they created). Idempotent."""
        if self.events is not None:
            await self.events.aclose()
        await self.jwks.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """A Starlette ``lifespan``: :meth:`start` at start-up, :meth:`aclose` at shutdown."""
        try:
            await self.start()
            yield
        finally:
            await self.aclose()
