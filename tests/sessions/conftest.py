"""What the session tests share: an issuer with changed settings, and the refresh metrics they watch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from issuer.settings import Settings
from tests.support.clock import FakeClock
from tests.support.issuer import IssuerHarness, running_issuer, with_settings
from tests.support.operations import sample

# REFRESH_REUSE_GRACE in the test settings (the default).
GRACE = 10

MakeIssuer = Callable[..., contextlib.AbstractAsyncContextManager[IssuerHarness]]


@pytest.fixture
def make_issuer(settings: Settings, clock: FakeClock) -> MakeIssuer:
    """``make_issuer(**changes)``: an issuer on the test settings with ``changes``, as an async context."""

    def make(**changes: Any) -> contextlib.AbstractAsyncContextManager[IssuerHarness]:
        return running_issuer(with_settings(settings, **changes), clock)

    return make


def reuse_count(issuer: IssuerHarness) -> float:
    """Families revoked because a consumed token came back (issuer_refresh_reuse_detections_total)."""
    return sample(issuer.services, "issuer_refresh_reuse_detections_total")


def db_error_count(issuer: IssuerHarness) -> float:
    """Requests that failed because the database failed (issuer_database_errors_total)."""
    return sample(issuer.services, "issuer_database_errors_total")
