"""Helpers for the operations tests: throttling, faults, metrics, cleanup (not collected: no ``test_`` prefix)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.services import Services
from issuer.settings import Settings
from issuer.storage.schema import login_failures
from tests.support.clock import FakeClock
from tests.support.issuer import IssuerHarness, running_issuer


class FakeMonotonic:
    """The per-IP token bucket's clock, moved by the test."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def running_issuer_with_monotonic(
    settings: Settings, clock: FakeClock, monotonic: FakeMonotonic
) -> AsyncIterator[IssuerHarness]:
    """Like ``running_issuer``, but the per-IP limiter reads ``monotonic``."""
    async with running_issuer(settings, clock, monotonic=monotonic) as harness:
        yield harness


async def failure_row(engine: AsyncEngine, email: str) -> tuple[int, object] | None:
    """(failures, locked_until) of the login_failures row for ``email``, or None."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(login_failures.c.failures, login_failures.c.locked_until).where(login_failures.c.email == email)
            )
        ).one_or_none()
    return None if row is None else (row.failures, row.locked_until)


def sample(services: Services, name: str, labels: dict[str, str] | None = None) -> float:
    """A metric sample's current value from the app's own registry (0 when the series does not exist yet)."""
    value = services.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def retry_after(response: httpx.Response) -> int:
    """The Retry-After header as delta-seconds; fails on anything else (an HTTP date, a fraction)."""
    raw = response.headers.get("retry-after")
    assert raw is not None, f"no Retry-After on {response.status_code}: {response.headers}"
    assert raw.isdigit(), f"Retry-After is not integer seconds: {raw!r}"
    seconds = int(raw)
    assert seconds >= 1, raw
    return seconds
