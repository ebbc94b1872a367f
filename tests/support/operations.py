"""Helpers for the operations tests: metrics, lock-out rows (not collected: no ``test_`` prefix).

The per-IP limiter's clock is the one ``FakeClock``: ``running_issuer(settings, clock, monotonic=clock.monotonic)``.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from issuer.services import Services
from issuer.storage.schema import login_failures

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


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


async def scrape(client: httpx.AsyncClient) -> Samples:
    """GET /metrics, parsed as Prometheus parses it: {(sample name, labels): value}."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One scraped sample (0 when the series does not exist)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    """Every value the label ``label`` takes in the samples called ``name``."""
    return {dict(key)[label] for (sample_name, key) in samples if sample_name == name and label in dict(key)}
