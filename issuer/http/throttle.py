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

from sqlalchemy import case, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from issuer.storage import database as hotpath
from issuer.storage.database import HotPool
from issuer.storage.schema import rate_buckets, upsert_insert

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
        return _seconds_until_token(bucket.tokens, self._rate)


class SharedRateLimiter:
    """The same token bucket kept in the database, so the limit holds across replicas.

    Used where the limit protects accounts rather than this process's CPU (login, register). One upsert
    refills, checks and takes a token atomically; when the bucket is empty its WHERE matches nothing and
    the row is left as it was.
    """

    def __init__(self, engine: AsyncEngine, per_minute: int, scope: str, hot: HotPool | None = None) -> None:
        self._engine = engine
        self._capacity = float(per_minute)
        self._rate = per_minute / 60.0
        self._scope = scope
        self._hot = hot

    @property
    def enabled(self) -> bool:
        return self._capacity > 0

    async def acquire(self, address: str | None, now: datetime) -> float:
        """Take one token; 0 when allowed, else the seconds until one is available."""
        if not self.enabled or address is None:
            return 0.0
        key = f"{self._scope}:{bucket_key(address)}"[:96]
        at = now.timestamp()
        if self._hot is not None:
            # On PostgreSQL the same upsert is one statement on the hot-path pool (``hotpath``), without
            # a transaction around it; only a refusal reads the bucket afterwards.
            if await hotpath.take_rate_token(self._hot, key, self._capacity, self._rate, at):
                return 0.0
            async with self._engine.connect() as conn:
                return self._wait(await _bucket(conn, key), at)
        table = rate_buckets
        refilled = table.c.tokens + (at - table.c.updated_at) * self._rate
        available = case((refilled > self._capacity, self._capacity), else_=refilled)
        async with self._engine.begin() as conn:
            statement = (
                upsert_insert(conn, table)
                .values(bucket=key, tokens=self._capacity - 1.0, updated_at=at)
                .on_conflict_do_update(
                    index_elements=["bucket"],
                    set_={"tokens": available - 1.0, "updated_at": at},
                    where=available >= 1.0,
                )
                .returning(table.c.tokens)
            )
            if (await conn.execute(statement)).scalar_one_or_none() is not None:
                return 0.0
            return self._wait(await _bucket(conn, key), at)

    def _wait(self, bucket: tuple[float, float] | None, at: float) -> float:
        if bucket is None:  # swept by the cleanup since the refusal: it would be full again
            return 1.0
        tokens, updated = bucket
        return _seconds_until_token(min(self._capacity, tokens + (at - updated) * self._rate), self._rate)


async def _bucket(conn: AsyncConnection, key: str) -> tuple[float, float] | None:
    """A bucket's tokens and last use (epoch seconds)."""
    row = (
        await conn.execute(select(rate_buckets.c.tokens, rate_buckets.c.updated_at).where(rate_buckets.c.bucket == key))
    ).first()
    return None if row is None else (row[0], row[1])
