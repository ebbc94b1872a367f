"""Fixtures of the HTTP tests: issuers configured for browsers (ALLOWED_ORIGINS)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from issuer.settings import Settings
from tests.http._http import APP_ORIGIN
from tests.support.clock import FakeClock
from tests.support.issuer import IssuerHarness, running_issuer, with_settings


@pytest.fixture
async def browser_app(settings: Settings, clock: FakeClock) -> AsyncIterator[IssuerHarness]:
    """An issuer whose cookie endpoints serve the browser origin APP_ORIGIN (CORS with credentials)."""
    async with running_issuer(with_settings(settings, allowed_origins=(APP_ORIGIN,)), clock) as harness:
        yield harness


@pytest.fixture(params=[(), (APP_ORIGIN,)], ids=["no-cors", "cors"])
async def either_issuer(
    request: pytest.FixtureRequest, settings: Settings, clock: FakeClock
) -> AsyncIterator[IssuerHarness]:
    """The issuer without ALLOWED_ORIGINS (no CORS middleware), and with it."""
    async with running_issuer(with_settings(settings, allowed_origins=request.param), clock) as harness:
        yield harness
