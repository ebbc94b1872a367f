"""A JWKS cache for resource services and gateways: fetch the issuer's keys rarely, never per request.

The rules (constructor defaults in parentheses):

- A fetched key set is fresh for the response's ``Cache-Control: max-age`` minus its ``Age``, counted from when
  the request was sent and capped at ``max_ttl`` (24 h), or ``default_ttl`` (300 s) without a max-age. The issuer's
  key lifecycle relies on its max-age being honoured (a new key signs one max-age after it is published), so the
  only floor is ``min_ttl`` (1 s), and it exists for ``max-age=0``, ``no-cache`` and ``no-store`` alone: a verifier
  that refetched per request would be the issuer's load test.
- A stale set is revalidated with ``If-None-Match``; a 304 makes it fresh again. Stale-while-revalidate: a ``kid``
  in a stale set (within ``stale_limit``) is answered from the cache at once while the revalidation runs in the
  background, so a slow or hanging issuer never holds up a request whose key we have.
- A ``kid`` missing from a fresh set triggers one refetch, and only if no fetch was attempted in the last
  ``unknown_kid_cooldown`` (30 s): a flood of forged kids costs the issuer one request per cooldown.
- A failed fetch (network error, timeout, non-200/304, not JSON, no ``keys`` list, no usable key, body over
  ``max_response_bytes``) keeps the cached set and is retried no sooner than ``failure_backoff`` (10 s).
  Cached keys stay usable for ``stale_limit`` (1 h) past their freshness; after that every lookup fails
  closed with :class:`KeysUnavailable`.
- One fetch at a time. Only lookups that need its result wait for it (nothing cached, a ``kid`` not in the set,
  a set past the stale limit), and they share it.
- Only ``kty`` RSA keys with a ``kid``, ``use`` sig (or absent), ``alg`` RS256 (or absent) and a modulus of
  2048..16384 bits are kept; only ``n`` and ``e`` are read. An entry that carries private members is skipped:
  a private key that has been published proves nothing. Unusable entries are skipped, not fatal.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers
from joserfc.jwk import RSAKey

from issuer.tasks import cancelled
from issuer.verifier.errors import KeysUnavailable, UnknownKey

log = logging.getLogger("issuer.verifier")

METADATA_PATH = "/.well-known/oauth-authorization-server"
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
MAX_KEYS = 100
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64URL = re.compile(r"[A-Za-z0-9_-]{1,4096}")


class JWKSFetchError(Exception):
    """One fetch failed; the cache keeps its keys and records the message in ``stats.last_error``."""


@dataclass
class JWKSStats:
    """Counters for tests and metrics."""

    metadata_fetches: int = 0
    jwks_fetches: int = 0  # requests to jwks_uri, 304s included
    not_modified: int = 0
    failures: int = 0
    unknown_kid_refetches: int = 0
    last_error: str | None = None


class JWKSCache:
    def __init__(
        self,
        *,
        jwks_uri: str | None = None,
        issuer: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        default_ttl: float = 300.0,
        min_ttl: float = 1.0,
        max_ttl: float = 86400.0,
        unknown_kid_cooldown: float = 30.0,
        failure_backoff: float = 10.0,
        stale_limit: float = 3600.0,
        fetch_timeout: float = 5.0,
        max_response_bytes: int = 256 * 1024,
    ) -> None:
        """Give ``jwks_uri``, or ``issuer`` to discover it from the issuer's RFC 8414 metadata.

        ``http_client`` is used as is and never closed here (tests pass one over ``httpx.ASGITransport``); without
        it the cache creates its own client on first use and closes it in :meth:`aclose`.
        """
        if (jwks_uri is None) == (issuer is None):
            raise ValueError("give exactly one of jwks_uri or issuer")
        if not 0 < min_ttl <= default_ttl <= max_ttl:
            raise ValueError("need 0 < min_ttl <= default_ttl <= max_ttl")
        if min(unknown_kid_cooldown, failure_backoff, stale_limit) < 0 or fetch_timeout <= 0:
            raise ValueError("cooldown, backoff and stale limit must be >= 0, the fetch timeout > 0")
        self.issuer = issuer
        self.default_ttl = default_ttl
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.unknown_kid_cooldown = unknown_kid_cooldown
        self.failure_backoff = failure_backoff
        self.stale_limit = stale_limit
        self.fetch_timeout = fetch_timeout
        self.max_response_bytes = max_response_bytes
        self.stats = JWKSStats()
        self._jwks_uri = jwks_uri
        self._monotonic = monotonic
        self._http = http_client
        self._owns_http = http_client is None
        self._closed = False
        self._keys: dict[str, RSAKey] = {}
        self._etag: str | None = None
        self._fresh_until = -math.inf
        self._usable_until = -math.inf
        self._last_attempt = -math.inf
        self._next_attempt = -math.inf
        self._inflight: asyncio.Task[bool] | None = None

    @property
    def jwks_uri(self) -> str | None:
        """The configured or discovered JWKS URL (None until discovery succeeded)."""
        return self._jwks_uri

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @property
    def usable(self) -> bool:
        """True while keys are cached and within the stale limit: tokens can be checked (a readiness signal)."""
        return bool(self._keys) and self._monotonic() < self._usable_until

    # ------------------------------------------------------------ lookups

    def peek(self, kid: str) -> RSAKey | None:
        """The key for ``kid`` if the set is fresh; None otherwise. Synchronous: the verifier's hot path."""
        if self._monotonic() < self._fresh_until:
            return self._keys.get(kid)
        return None

    async def get_key(self, kid: str) -> RSAKey:
        """The key for ``kid``, fetching when the rules above allow.

        A known kid in a fresh set, or in a stale one within the stale limit, is returned without waiting for any
        fetch; a stale set starts its revalidation in the background. Only a lookup that needs a fetch's result
        awaits it. Raises :class:`UnknownKey` when the set (fresh, or stale within the limit) has no such kid,
        and :class:`KeysUnavailable` when there is no usable set at all.
        """
        now = self._monotonic()
        key = self._keys.get(kid)
        if key is not None and now < self._usable_until:
            if now >= self._fresh_until and now >= self._next_attempt and not self._closed:
                self._start_fetch()  # not awaited: the task never raises, and aclose() cancels it
            return key
        if self._inflight is not None:
            await asyncio.shield(self._inflight)  # its result may be what we lack, and joining it costs no request
        elif now >= self._fresh_until:
            if now >= self._next_attempt:
                await self.refresh()
        elif self._may_refetch_for_unknown_kid(now):
            self.stats.unknown_kid_refetches += 1
            await self.refresh()
        return self._usable_key(kid)

    def _may_refetch_for_unknown_kid(self, now: float) -> bool:
        # Any attempt, scheduled or not, within the cooldown means our set is as recent as we allow it to be.
        return now >= self._next_attempt and now - self._last_attempt >= self.unknown_kid_cooldown

    def _usable_key(self, kid: str) -> RSAKey:
        now = self._monotonic()
        if not self._keys:
            raise KeysUnavailable(
                "No signing keys could be fetched from the issuer.", retry_after=max(self._next_attempt - now, 0.0)
            )
        if now >= self._usable_until:
            raise KeysUnavailable(
                "The cached signing keys are older than the stale limit and the issuer cannot be reached.",
                retry_after=max(self._next_attempt - now, 0.0),
            )
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKey()
        return key

    # ------------------------------------------------------------ fetching

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch in flight). True when the set is fresh afterwards; never raises.

        Call it at start-up to warm the cache; request paths go through :meth:`get_key`, which rate-limits.
        """
        return await asyncio.shield(self._start_fetch())

    def _start_fetch(self) -> asyncio.Task[bool]:
        """The fetch in flight, or a new one (single flight).

        ``_inflight`` holds the task until it ends, so it cannot be garbage-collected while pending; it never
        raises (see :meth:`_fetch`), so a background fetch nobody awaits leaves no unretrieved exception.
        """
        if self._inflight is None:
            self._last_attempt = self._monotonic()
            self._inflight = asyncio.get_running_loop().create_task(self._fetch(), name="jwks-fetch")
        return self._inflight

    async def aclose(self) -> None:
        """Stop a fetch in flight and close the HTTP client if this cache created it. Idempotent."""
        self._closed = True
        task, self._inflight = self._inflight, None
        await cancelled(task)
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _fetch(self) -> bool:
        try:
            async with asyncio.timeout(self.fetch_timeout):
                uri = self._jwks_uri or await self._discover()
                await self._fetch_jwks(uri)
        except JWKSFetchError as exc:
            self._failed(str(exc))
            return False
        except (httpx.HTTPError, TimeoutError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False
        except Exception as exc:  # anything unforeseen must not cost us the keys we have
            log.exception("unexpected error while fetching the JWKS")
            self._failed(f"unexpected {type(exc).__name__}")
            return False
        finally:
            self._inflight = None
        return True

    def _failed(self, message: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = message
        self._next_attempt = self._monotonic() + self.failure_backoff
        log.warning(
            "JWKS fetch from %s failed (%s); keeping %d cached key(s)",
            self._jwks_uri or self.issuer,
            message,
            len(self._keys),
        )

    async def _discover(self) -> str:
        assert self.issuer is not None
        self.stats.metadata_fetches += 1
        status, _, body = await self._get(self.issuer.rstrip("/") + METADATA_PATH, {})
        if status != 200:
            raise JWKSFetchError(f"issuer metadata answered HTTP {status}")
        metadata = _json_object(body, "issuer metadata")
        if metadata.get("issuer") != self.issuer:
            raise JWKSFetchError(f"issuer metadata names issuer {metadata.get('issuer')!r}, not {self.issuer!r}")
        uri = metadata.get("jwks_uri")
        if not isinstance(uri, str):
            raise JWKSFetchError("issuer metadata has no jwks_uri")
        parts = urlsplit(uri)
        allowed = {"https", "http"} if urlsplit(self.issuer).scheme == "http" else {"https"}
        if parts.scheme not in allowed or not parts.netloc:
            raise JWKSFetchError(f"jwks_uri {uri!r} is not an {' or '.join(sorted(allowed))} URL")
        self._jwks_uri = uri
        return uri

    async def _fetch_jwks(self, uri: str) -> None:
        headers = {"If-None-Match": self._etag} if self._etag and self._keys else {}
        self.stats.jwks_fetches += 1
        status, response_headers, body = await self._get(uri, headers)
        if status == 304:
            if not self._keys:
                raise JWKSFetchError("JWKS answered 304 but nothing is cached")
            self.stats.not_modified += 1
        elif status == 200:
            self._keys = parse_jwks(body)
            self._etag = response_headers.get("etag")
        else:
            raise JWKSFetchError(f"JWKS answered HTTP {status}")
        ttl = cache_lifetime(response_headers, default=self.default_ttl, minimum=self.min_ttl, maximum=self.max_ttl)
        # Counted from the request (RFC 9111 4.2.3): time spent waiting for the answer is part of its age.
        self._fresh_until = self._last_attempt + ttl
        self._usable_until = self._fresh_until + self.stale_limit
        self._next_attempt = self._monotonic()
        self.stats.last_error = None

    async def _get(self, url: str, headers: dict[str, str]) -> tuple[int, httpx.Headers, bytes]:
        """GET with a size cap; the body is read only for a 200."""
        if self._closed:
            raise JWKSFetchError("the JWKS cache is closed")
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.fetch_timeout, follow_redirects=False)
        request_headers = {"Accept": "application/json", "Accept-Encoding": "identity", **headers}
        async with self._http.stream("GET", url, headers=request_headers) as response:
            if response.status_code != 200:
                return response.status_code, response.headers, b""
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise JWKSFetchError(f"response of {declared} bytes exceeds {self.max_response_bytes}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise JWKSFetchError(f"response exceeds {self.max_response_bytes} bytes")
                chunks.append(chunk)
            return 200, response.headers, b"".join(chunks)


# ---------------------------------------------------------------- parsing


def cache_lifetime(headers: httpx.Headers, *, default: float, minimum: float, maximum: float) -> float:
    """Seconds a response may be used: ``max-age`` minus ``Age``, or ``default``; clamped to the bounds.

    ``no-cache`` and ``no-store`` count as ``minimum``, which callers keep small: it only stops per-request fetching.
    """
    directives: dict[str, str] = {}
    for value in headers.get_list("cache-control", split_commas=True):
        name, _, argument = value.strip().partition("=")
        directives[name.strip().lower()] = argument.strip().strip('"')
    lifetime = default
    if "no-store" in directives or "no-cache" in directives:
        lifetime = minimum
    elif directives.get("max-age", "").isdigit():
        age = headers.get("age", "")
        lifetime = int(directives["max-age"]) - (int(age) if age.isdigit() else 0)
    return float(min(max(lifetime, minimum), maximum))


def parse_jwks(body: bytes) -> dict[str, RSAKey]:
    """The usable verification keys of a JWKS document, by kid; raises if there are none."""
    document = _json_object(body, "JWKS")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise JWKSFetchError("JWKS has no 'keys' list")
    keys: dict[str, RSAKey] = {}
    material: dict[str, tuple[int, int]] = {}
    ambiguous: set[str] = set()
    for entry in entries[:MAX_KEYS]:
        parsed = public_rsa_key(entry)
        if parsed is None:
            continue
        kid, numbers, key = parsed
        if kid in material and material[kid] != numbers:
            ambiguous.add(kid)  # two different keys under one kid: trust neither
        material[kid] = numbers
        keys[kid] = key
    for kid in ambiguous:
        del keys[kid]
    if not keys:
        raise JWKSFetchError(f"JWKS has no usable RS256 key among {len(entries)} entries")
    return keys


def public_rsa_key(entry: object) -> tuple[str, tuple[int, int], RSAKey] | None:
    """(kid, (n, e), key) for a usable RS256 verification key; None for anything else."""
    if not isinstance(entry, dict) or entry.get("kty") != "RSA":
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        return None
    if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if not PRIVATE_MEMBERS.isdisjoint(entry):
        return None
    n, e = _b64url_uint(entry.get("n")), _b64url_uint(entry.get("e"))
    if n is None or e is None or not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
        return None
    try:
        public = RSAPublicNumbers(e, n).public_key()
    except (ValueError, TypeError):
        return None
    return kid, (n, e), RSAKey.import_key(public, {"kid": kid, "alg": "RS256", "use": "sig"})


def _b64url_uint(value: object) -> int | None:
    if not isinstance(value, str) or not _B64URL.fullmatch(value):
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None
    return int.from_bytes(raw, "big")


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise JWKSFetchError(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise JWKSFetchError(f"{what} is not a JSON object")
    return document
