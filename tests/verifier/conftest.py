"""Fixtures of the verifier tests: a fake issuer serving the JWKS (and, with ``feed``, the revocation feed), an HTTP
client on it, a verifier on that client.

No database and no real issuer (except in test_end_to_end.py, which uses the suite's ``issuer`` fixture). Time is
the suite's ``clock`` fixture (tests/conftest.py): ``clock.wall()`` dates the tokens, ``clock.monotonic()`` ages the
cache, ``clock.advance()`` moves both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from issuer.verifier import AccessTokenVerifier
from tests.support.clock import FakeClock
from tests.support.verifier import FakeFeed, FakeIssuer, verifier_for
from tests.verifier._forgeries import Forge, forge_for


@pytest.fixture
def fake() -> FakeIssuer:
    return FakeIssuer()


@pytest.fixture
def feed(fake: FakeIssuer) -> FakeFeed:
    """The fake issuer's revocation feed (served at its poll URL and advertised in its metadata)."""
    fake.feed = FakeFeed()
    return fake.feed


@pytest.fixture
async def http(fake: FakeIssuer) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client() as client:
        yield client


@pytest.fixture
def verifier(http: httpx.AsyncClient, clock: FakeClock) -> AccessTokenVerifier:
    """The default verifier (leeway 5 s) on the fake issuer's JWKS, cold."""
    return verifier_for(http, clock)


@pytest.fixture
def forge(clock: FakeClock) -> Forge:
    return forge_for(clock)
