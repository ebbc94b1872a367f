"""Per-client-IP rate limiting with token buckets.

:class:`IpRateLimiter` keeps buckets in this process's memory: right for refresh, where the limit protects
this process's CPU (refresh tokens are 256-bit, nothing to guess) and the path must stay one round trip.
:class:`SharedRateLimiter` keeps them in the database, so login and register are limited across replicas.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from issuer.storage import rate_buckets
from issuer.storage.database import Database

MAX_TRACKED_ADDRESSES = 100_000


def bucket_key(address: str) -> str:
    """IPv6 clients are limited per /64: one subscriber usually holds a whole /64, so per-address buckets
    would give an attacker endless fresh ones (and let them flush everyone else's)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    updated: float


def _seconds_until_token(tokens: float, per_second: float) -> float:
    """Whole seconds (at least 1) until a bucket holding ``tokens`` has one to give: the Retry-After value."""
    return max(1.0, math.ceil((1.0 - tokens) / per_second))


class IpRateLimiter:
    """``per_minute`` requests per address, with bursts up to the same number; 0 disables it."""

    def __init__(self, per_minute: int, monotonic: Callable[[], float]) -> None:
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._monotonic = monotonic
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    def acquire(self, address: str | None) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is available."""
        if not self.enabled or address is None:
            return 0.0
        bucket = self._refilled(bucket_key(address))
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return _seconds_until_token(bucket.tokens, self._rate)

    def _refilled(self, key: str) -> _Bucket:
        now = self._monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self._capacity, now)
            self._buckets[key] = bucket
            if len(self._buckets) > MAX_TRACKED_ADDRESSES:
                # Forget the least recently seen address: memory stays bounded under a spoofing flood.
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        return bucket


class SharedRateLimiter:
    """The same token bucket kept in the database, so the limit holds across replicas: one statement
    refills, checks and takes a token (:data:`issuer.storage.rate_buckets.TAKE`).

    Used where the limit protects accounts rather than this process's CPU (login, register).
    """

    def __init__(self, db: Database, per_minute: int, scope: str) -> None:
        self._db = db
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._scope = scope

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    async def acquire(self, address: str | None, now: datetime) -> float:
        """Take one token; 0 when allowed, else the seconds until one is available."""
        if not self.enabled or address is None:
            return 0.0
        at = now.timestamp()
        take = await rate_buckets.take(
            self._db, f"{self._scope}:{bucket_key(address)}"[:96], self._capacity, self._rate, at
        )
        if take.taken:
            return 0.0
        if take.tokens is None or take.updated_at is None:  # swept by the cleanup meanwhile: full again
            return 1.0
        tokens = min(self._capacity, take.tokens + (at - take.updated_at) * self._rate)
        return _seconds_until_token(tokens, self._rate)
