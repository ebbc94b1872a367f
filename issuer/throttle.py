"""Per-client-IP rate limiting: a token bucket per address, in this process's memory.

Each replica limits on its own (N replicas admit up to N times the rate); the per-account lock-out,
which is what stops password guessing, lives in the database and holds across replicas.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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
        address = bucket_key(address)
        now = self._monotonic()
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = _Bucket(self._capacity, now)
            self._buckets[address] = bucket
            if len(self._buckets) > MAX_TRACKED_ADDRESSES:
                # Forget the least recently seen address: memory stays bounded under a spoofing flood.
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
            bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return max(1.0, math.ceil((1.0 - bucket.tokens) / self._rate))
