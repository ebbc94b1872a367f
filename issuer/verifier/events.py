"""``RevocationFeed``: follow the issuer's revocation feed so that revoked tokens are refused within seconds.

Pass one to the verifier and run the verifier's lifespan; the feed's long-poll loop runs inside it::

    feed = RevocationFeed(client_id, client_secret)         # a client with scope "events"
    verifier = AccessTokenVerifier(issuer=..., audience=..., events=feed)
    app = Starlette(..., middleware=[bearer_middleware(verifier)], lifespan=verifier.lifespan)

The loop (RFC 8936 poll with the issuer's non-destructive ``cursor``, our extension): ``POST`` to the poll URL
with HTTP Basic client credentials; while the answer says ``moreAvailable`` poll again at once with
``returnImmediately: true``; once caught up, long-poll (the issuer holds the request up to about 25 s and
answers as soon as an event commits). Each SET is verified before it is applied (:mod:`issuer.verifier.sets`);
a refused SET is logged, counted in ``stats.refused_sets`` and skipped. The cursor moves only past an answer
whose SETs were all verified or refused: when the keys cannot be had at all, the answer is read again later.
A ``cursor_expired`` answer drops the cursor and reads the kept window again from its start (merging is
idempotent, so nothing is applied twice in effect). Errors back off exponentially with jitter; ``429`` and
``503`` wait at least their ``Retry-After``.

**Readiness and lag.** :attr:`RevocationFeed.ready` is false until the first answer with ``moreAvailable``
false. :attr:`RevocationFeed.lag` is how far behind the verifier may be, in seconds: 0 while a long poll issued
in a caught-up state is open (the issuer answers it the moment something is revoked), otherwise the time since
the verifier was last caught up (since start-up when it never was).

**The stale policy** (``on_stale``), applied when the feed has never been caught up or ``lag`` exceeds
``max_lag``: ``"accept"`` (the default) keeps verifying with what it knows, logs a warning and counts
``stats.accepted_while_stale``; ``"reject"`` refuses every token with :class:`RevocationsUnavailable` (503 with
``Retry-After`` from the Starlette middleware) and reports not ready. ``"accept"`` is the default because the
feed is unreachable mostly when the issuer is down, and then nothing new can be revoked; refusing would turn an
issuer outage into an outage of every service that verifies locally, the very dependency local verification
exists to avoid. What a stale verifier can miss is bounded: a token revoked during the outage is accepted at
most until it expires (``token_lifetime``), which is exactly the guarantee without the feed. Choose
``"reject"`` where that window is not acceptable and an outage is.

**Memory** is bounded: entries expire by time (see :mod:`issuer.verifier.revocations` for the rule and for
``token_lifetime``), user-level entries subsume session entries, and ``max_entries`` caps the rest.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit

import httpx

from issuer.tasks import cancelled
from issuer.verifier.errors import InvalidClaims, KeysUnavailable, RevocationsUnavailable, Revoked, UnknownKey
from issuer.verifier.jwks import METADATA_PATH, JWKSCache
from issuer.verifier.revocations import Revocation, RevocationState
from issuer.verifier.sets import SETRefused, parse_set, read_revocation, verified_claims

if TYPE_CHECKING:
    from issuer.verifier.verifier import AccessToken

log = logging.getLogger("issuer.verifier.events")

POLL_PATH = "/events/poll"
OnStale = Literal["accept", "reject"]
_MAX_CURSOR_LENGTH = 4096
_STALE_LOG_INTERVAL = 60.0


class FeedError(Exception):
    """One poll failed; the loop backs off (at least ``retry_after`` seconds when the issuer said so)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class FeedStats:
    """Counters for logs and metrics (``RevocationFeed.status()`` adds the gauges)."""

    polls: int = 0
    sets_applied: int = 0  # verified and merged (including those that changed nothing)
    sets_refused: int = 0
    refused_sets: Counter[str] = field(default_factory=Counter)  # by SETRefused.reason
    errors: int = 0
    cursor_resets: int = 0  # cursor_expired (or a cursor the issuer no longer accepts): read the window again
    tokens_revoked: Counter[str] = field(default_factory=Counter)  # by RefusalRule
    accepted_while_stale: int = 0
    last_error: str | None = None


class RevocationFeed:
    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        poll_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        token_lifetime: float = 900.0,
        margin: float = 60.0,
        max_lag: float = 60.0,
        on_stale: OnStale = "accept",
        max_entries: int = 100_000,
        max_events: int = 100,
        long_poll_timeout: float = 40.0,
        request_timeout: float = 10.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_retry_after: float = 300.0,
        startup_wait: float = 10.0,
        max_response_bytes: int = 8 * 1024 * 1024,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """Follow the feed as the client ``client_id`` (created with ``issuer clients add NAME --scope events``).

        - ``poll_url``: default the issuer metadata's ``security_event_poll_endpoint``, or ``ISSUER_URL/events/poll``
          when the metadata has none.
        - ``token_lifetime``: the longest lifetime of an access token, in seconds: the issuer's
          ``ACCESS_TOKEN_TTL`` (900 by default) or more. Entries are kept ``token_lifetime`` + the verifier's
          leeway + ``margin`` after their event; tokens with ``exp - iat`` above it are refused (a longer-lived
          token could outlive the entry that revokes it).
        - ``max_lag`` and ``on_stale``: the stale policy (module docstring). ``max_lag`` must exceed the issuer's
          long-poll wait (25 s) plus a round trip, so a healthy feed never counts as stale.
        - ``max_entries``: the hard cap on remembered revocations (see :mod:`issuer.verifier.revocations`).
        - ``max_events``: ``maxEvents`` per poll (1..1000); ``long_poll_timeout`` / ``request_timeout``: the whole
          request, long poll or not; ``initial_backoff`` .. ``max_backoff``: the error backoff, doubled per
          failure, with jitter; ``max_retry_after`` caps an issuer's ``Retry-After``.
        - ``startup_wait``: how long the verifier's lifespan waits for the first sync before serving anyway.
        - ``http_client`` is used as is and never closed here; without one the feed creates its own.
        - ``monotonic``, ``sleep`` and ``jitter`` are for tests.
        """
        if not client_id or not client_secret:
            raise ValueError("the feed needs a client_id and a client_secret")
        if on_stale not in ("accept", "reject"):
            raise ValueError("on_stale must be 'accept' or 'reject'")
        if token_lifetime <= 0 or margin < 0 or max_lag <= 0 or max_entries < 1:
            raise ValueError("need token_lifetime > 0, margin >= 0, max_lag > 0 and max_entries >= 1")
        if not 1 <= max_events <= 1000:
            raise ValueError("max_events must be 1..1000")
        if min(long_poll_timeout, request_timeout, initial_backoff, max_backoff) <= 0 or startup_wait < 0:
            raise ValueError("timeouts and backoffs must be > 0")
        self.client_id = client_id
        self.token_lifetime = float(token_lifetime)
        self.margin = float(margin)
        self.max_lag = float(max_lag)
        self.on_stale: OnStale = on_stale
        self.max_entries = max_entries
        self.max_events = max_events
        self.long_poll_timeout = long_poll_timeout
        self.request_timeout = request_timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.startup_wait = startup_wait
        self.max_response_bytes = max_response_bytes
        self.stats = FeedStats()
        # RFC 6749 section 2.3.1: both are form-urlencoded before Basic encoding.
        self._auth = httpx.BasicAuth(quote(client_id, safe=""), quote(client_secret, safe=""))
        self._poll_url = poll_url
        self._http = http_client
        self._owns_http = http_client is None
        self._monotonic = monotonic
        self._sleep = sleep
        self._jitter = jitter
        self._issuer: str | None = None
        self._jwks: JWKSCache | None = None
        self._clock: Callable[[], float] = time.time
        self._state: RevocationState | None = None
        self._cursor: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._started_at: float | None = None
        self._caught_up_at: float | None = None
        self._listening_since: float | None = None
        self._next_attempt = -math.inf
        self._stale_logged_at = -math.inf
        self._closed = False

    # ------------------------------------------------------------ wiring

    def bind(self, *, issuer: str, jwks: JWKSCache, clock: Callable[[], float], leeway: float) -> None:
        """Called by :class:`AccessTokenVerifier`: SETs are checked against its issuer and JWKS, time is its clock."""
        if self._issuer is not None:
            raise ValueError("this RevocationFeed already belongs to a verifier")
        self._issuer = issuer
        self._jwks = jwks
        self._clock = clock
        retention = self.token_lifetime + leeway + self.margin
        self._state = RevocationState(retention=retention, margin=self.margin, max_entries=self.max_entries)

    @property
    def state(self) -> RevocationState:
        if self._state is None:
            raise RuntimeError("the feed is not attached to a verifier (pass it as AccessTokenVerifier(events=...))")
        return self._state

    @property
    def poll_url(self) -> str | None:
        """The configured or discovered poll URL (None until discovery succeeded)."""
        return self._poll_url

    @property
    def cursor(self) -> str | None:
        return self._cursor

    # ------------------------------------------------------------ readiness and lag

    @property
    def synced(self) -> bool:
        """True once an answer said nothing more was available (the first sync); stays true."""
        return self._synced.is_set()

    @property
    def lag(self) -> float:
        """Seconds the verifier may be behind the issuer (module docstring); 0 while a caught-up long poll is open."""
        now = self._monotonic()
        if self._listening_since is not None and now - self._listening_since <= self.long_poll_timeout:
            return 0.0
        since = self._caught_up_at if self._caught_up_at is not None else self._started_at
        return 0.0 if since is None else max(0.0, now - since)

    @property
    def stale(self) -> bool:
        """Never synchronised, or behind by more than ``max_lag``: the ``on_stale`` policy applies."""
        return not self.synced or self.lag > self.max_lag

    @property
    def ready(self) -> bool:
        """Synchronised once, and (with ``on_stale="reject"``) not stale: a readiness probe's answer."""
        return self.synced and not (self.on_stale == "reject" and self.stale)

    async def wait_synced(self, within: float | None = None) -> bool:
        """Wait for the first sync; False when ``within`` seconds passed first."""
        try:
            async with asyncio.timeout(within):
                await self._synced.wait()
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """Gauges and counters in one JSON-friendly mapping, for a health endpoint or metrics."""
        state = self._state
        return {
            "ready": self.ready,
            "synced": self.synced,
            "stale": self.stale,
            "lag_seconds": round(self.lag, 3),
            "on_stale": self.on_stale,
            "entries": len(state) if state is not None else 0,
            **(state.sizes() if state is not None else {}),
            "max_entries": self.max_entries,
            "evictions": state.evictions if state is not None else 0,
            "polls": self.stats.polls,
            "sets_applied": self.stats.sets_applied,
            "sets_refused": self.stats.sets_refused,
            "refused_sets": dict(self.stats.refused_sets),
            "errors": self.stats.errors,
            "cursor_resets": self.stats.cursor_resets,
            "tokens_revoked": dict(self.stats.tokens_revoked),
            "accepted_while_stale": self.stats.accepted_while_stale,
            "last_error": self.stats.last_error,
        }

    # ------------------------------------------------------------ the hot path

    def check(self, token: AccessToken) -> None:
        """Raise :class:`Revoked` when the feed revoked ``token``; apply the stale policy otherwise.

        What is known to be revoked is refused even while stale: a 401 is true then, a 503 would not be.
        """
        state = self.state
        if token.iat is None or token.exp - token.iat > self.token_lifetime:
            raise InvalidClaims(
                "The access token lives longer than the revocation window this verifier keeps (token_lifetime)."
            )
        rule = state.refusal(
            sub=token.sub, sid=token.sid, token_version=token.token_version, iat=token.iat, now=self._clock()
        )
        if rule is not None:
            self.stats.tokens_revoked[rule] += 1
            raise Revoked()
        if self.stale:
            self._on_stale()

    def _on_stale(self) -> None:
        now = self._monotonic()
        if self.on_stale == "reject":
            raise RevocationsUnavailable(retry_after=max(self._next_attempt - now, 1.0))
        self.stats.accepted_while_stale += 1
        if now - self._stale_logged_at >= _STALE_LOG_INTERVAL:
            self._stale_logged_at = now
            log.warning(
                "revocation feed %s (lag %.0f s, max_lag %.0f s); accepting tokens on what is known (on_stale=accept)",
                "not synchronised yet" if not self.synced else "behind",
                self.lag,
                self.max_lag,
            )

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the polling loop (idempotent); the verifier's lifespan calls this."""
        if self._issuer is None:
            raise RuntimeError("the feed is not attached to a verifier (pass it as AccessTokenVerifier(events=...))")
        if self._closed:
            raise RuntimeError("the feed is closed")
        if self._task is None:
            self._started_at = self._monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="revocation-feed")

    async def aclose(self) -> None:
        """Stop the loop (an open long poll is cancelled) and close the HTTP client if the feed created it."""
        self._closed = True
        task, self._task = self._task, None
        await cancelled(task)
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _run(self) -> None:
        immediate = True
        failures = 0
        while True:
            try:
                more = await self._poll_once(immediate)
            except (FeedError, httpx.HTTPError, TimeoutError) as exc:
                failures += 1
                retry_after = exc.retry_after if isinstance(exc, FeedError) else None
                await self._back_off(failures, _describe(exc), retry_after)
                immediate = True
                continue
            except Exception as exc:  # a bug must not stop the loop for good
                log.exception("unexpected error in the revocation feed loop")
                failures += 1
                await self._back_off(failures, f"unexpected {type(exc).__name__}", None)
                immediate = True
                continue
            failures = 0
            immediate = more

    async def _back_off(self, failures: int, message: str, retry_after: float | None) -> None:
        self.stats.errors += 1
        self.stats.last_error = message
        ceiling = min(self.max_backoff, self.initial_backoff * 2 ** min(failures - 1, 30))
        delay = ceiling / 2 + self._jitter() * ceiling / 2  # "equal jitter": spread out, never zero
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        self._next_attempt = self._monotonic() + delay
        log.warning("revocation feed poll failed (%s); retrying in %.1f s", message, delay)
        await self._sleep(delay)

    # ------------------------------------------------------------ one poll

    async def _poll_once(self, immediate: bool) -> bool:
        """One request; True when the next one should not wait (more events, or a cursor reset)."""
        url = self._poll_url or await self._discover()
        body: dict[str, Any] = {"maxEvents": self.max_events, "returnImmediately": immediate}
        if self._cursor is not None:
            body["cursor"] = self._cursor
        self.stats.polls += 1
        if not immediate:
            self._listening_since = self._monotonic()
        try:
            status, headers, payload = await self._request(
                "POST", url, body, self.request_timeout if immediate else self.long_poll_timeout
            )
        finally:
            self._listening_since = None
        if status == 200:
            return await self._accept(payload)
        error = _error_code(payload)
        if status == 400 and error in ("cursor_expired", "invalid_request") and self._cursor is not None:
            # Expired: older than the kept window. invalid_request with a cursor: the issuer no longer knows it
            # as ours. Either way the window is complete from its start, and re-reading it is harmless.
            log.warning("revocation feed cursor refused (%s); reading the kept window from its start", error)
            self._cursor = None
            self.stats.cursor_resets += 1
            if error == "cursor_expired":
                return True
            raise FeedError("the issuer refused our cursor (invalid_request)")
        if status in (429, 503):
            raise FeedError(f"HTTP {status}", retry_after=_retry_after(headers))
        if status in (401, 403):
            log.error(
                "the revocation feed refused client %r (HTTP %d %s): check its credentials and its 'events' scope",
                self.client_id,
                status,
                error,
            )
        raise FeedError(f"HTTP {status}" + (f" {error}" if error else ""))

    async def _accept(self, payload: bytes) -> bool:
        sets, more, cursor = _answer(payload)
        revocations = await self._verify_all(sets)
        state = self.state
        now = self._clock()
        for revocation in revocations:
            state.apply(revocation, now)
        self.stats.sets_applied += len(revocations)
        state.expire(now)
        self._cursor = cursor
        if not more:
            self._caught_up_at = self._monotonic()
            if not self._synced.is_set():
                log.info("revocation feed synchronised (%d entries)", len(state))
                self._synced.set()
        return more

    async def _verify_all(self, sets: dict[str, object]) -> list[Revocation]:
        """The revocations of the SETs that verify. KeysUnavailable (no usable JWKS) fails the whole answer."""
        revocations: list[Revocation] = []
        unknown: list[tuple[str, object]] = []
        for jti, token in sets.items():
            try:
                revocations.append(await self._verify(jti, token))
            except UnknownKey:
                unknown.append((jti, token))
            except SETRefused as exc:
                self._refused(jti, exc)
        if unknown:
            # A key the issuer started signing with at once (rotate --now, revoke) may not be in our set yet, and
            # the cache's unknown-kid cooldown may hold it back: fetch once for this answer, then decide.
            assert self._jwks is not None
            await self._jwks.refresh()
            for jti, token in unknown:
                try:
                    revocations.append(await self._verify(jti, token))
                except UnknownKey:
                    self._refused(jti, SETRefused("unknown_kid", "no key with that kid in the issuer's JWKS"))
                except SETRefused as exc:
                    self._refused(jti, exc)
        return revocations

    async def _verify(self, jti: str, token: object) -> Revocation:
        assert self._jwks is not None
        assert self._issuer is not None
        parsed = parse_set(token)
        key = self._jwks.peek(parsed.kid)
        if key is None:
            try:
                key = await self._jwks.get_key(parsed.kid)
            except KeysUnavailable as exc:
                raise FeedError(f"cannot verify SETs: {exc.detail}") from None
        claims = verified_claims(parsed, key)
        return read_revocation(claims, issuer=self._issuer, audience=self.client_id, jti=jti)

    def _refused(self, jti: str, exc: SETRefused) -> None:
        self.stats.sets_refused += 1
        self.stats.refused_sets[exc.reason] += 1
        log.warning("refused a SET from the revocation feed (jti %r): %s", jti[:64], exc)

    # ------------------------------------------------------------ HTTP

    async def _discover(self) -> str:
        assert self._issuer is not None
        status, _, body = await self._request("GET", self._issuer.rstrip("/") + METADATA_PATH, None, 10.0)
        if status != 200:
            raise FeedError(f"issuer metadata answered HTTP {status}")
        try:
            metadata = json.loads(body)
        except (ValueError, RecursionError):
            raise FeedError("issuer metadata is not JSON") from None
        if not isinstance(metadata, dict) or metadata.get("issuer") != self._issuer:
            raise FeedError("issuer metadata does not name our issuer")
        url = metadata.get("security_event_poll_endpoint")
        if url is None:
            url = self._issuer.rstrip("/") + POLL_PATH
        parts = urlsplit(url) if isinstance(url, str) else None
        allowed = {"https", "http"} if urlsplit(self._issuer).scheme == "http" else {"https"}
        if parts is None or parts.scheme not in allowed or not parts.netloc:
            raise FeedError(f"security_event_poll_endpoint {url!r} is not an {' or '.join(sorted(allowed))} URL")
        assert isinstance(url, str)
        self._poll_url = url
        return url

    async def _request(
        self, method: str, url: str, body: dict[str, Any] | None, seconds: float
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request with a size cap on the answer and a bound on the whole exchange."""
        if self._closed:
            raise FeedError("the feed is closed")
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        async with asyncio.timeout(seconds):
            async with self._http.stream(
                method,
                url,
                json=body,
                auth=self._auth if body is not None else None,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
                timeout=httpx.Timeout(seconds),
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise FeedError(f"answer exceeds {self.max_response_bytes} bytes")
                    chunks.append(chunk)
                return response.status_code, response.headers, b"".join(chunks)


# ---------------------------------------------------------------- parsing answers


def _answer(payload: bytes) -> tuple[dict[str, object], bool, str]:
    """``sets``, ``moreAvailable`` and ``cursor`` of a 200 answer; FeedError when it is not one."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        raise FeedError("the poll answer is not JSON") from None
    if not isinstance(document, dict):
        raise FeedError("the poll answer is not a JSON object")
    sets = document.get("sets")
    more = document.get("moreAvailable", False)
    cursor = document.get("cursor")
    if not isinstance(sets, dict) or not isinstance(more, bool):
        raise FeedError("the poll answer lacks 'sets' or has a non-boolean 'moreAvailable'")
    if not isinstance(cursor, str) or not cursor or len(cursor) > _MAX_CURSOR_LENGTH:
        raise FeedError("the poll answer has no usable 'cursor'")
    # A non-string SET is refused one by one (parse_set), not the whole answer.
    return {str(jti): value for jti, value in sets.items()}, more, cursor


def _error_code(payload: bytes) -> str | None:
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    error = document.get("error") if isinstance(document, dict) else None
    return error if isinstance(error, str) else None


def _retry_after(headers: httpx.Headers) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
