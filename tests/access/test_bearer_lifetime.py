"""A token's lifetime at the issuer's Bearer endpoints and in the shipped verifier, on the FakeClock: exp and
iat hold to the second, with exactly CLOCK_LEEWAY of tolerance."""

from __future__ import annotations

import httpx
import pytest

from issuer.verifier import ExpiredToken, NotYetValid
from tests.access.conftest import Forge
from tests.support.http import assert_invalid_token, me


async def test_expired_after_ttl_plus_leeway(forge: Forge, client: httpx.AsyncClient) -> None:
    settings, clock = forge.settings, forge.clock
    exp = forge.claims["exp"]
    # Last second inside the leeway: still accepted.
    clock.advance(exp + settings.clock_leeway - 1 - forge.now)
    assert (await me(client, forge.access_token)).status_code == 200
    assert forge.verify(forge.access_token)["sub"] == forge.claims["sub"]
    clock.advance(2)
    assert forge.now > exp + settings.clock_leeway
    assert_invalid_token(await me(client, forge.access_token))
    assert forge.failures() == {"expired": 1}
    with pytest.raises(ExpiredToken):
        forge.verify(forge.access_token)


async def test_iat_within_leeway_is_accepted_and_beyond_is_not(forge: Forge, client: httpx.AsyncClient) -> None:
    leeway = forge.settings.clock_leeway
    inside = forge.sign(payload=forge.payload(iat=forge.now + leeway, exp=forge.now + leeway + 900))
    assert (await me(client, inside)).status_code == 200
    assert forge.verify(inside)["iat"] == forge.now + leeway
    beyond = forge.sign(payload=forge.payload(iat=forge.now + leeway + 1, exp=forge.now + leeway + 901))
    assert_invalid_token(await me(client, beyond))
    assert forge.failures() == {"not_yet_valid": 1}
    with pytest.raises(NotYetValid):
        forge.verify(beyond)
