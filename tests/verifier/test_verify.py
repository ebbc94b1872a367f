"""The token checks of the shipped verifier, ``AccessTokenVerifier`` with its JWKS cache, against every forgery
in ``_forgeries.ATTACKS``. No issuer: the keys are local and the JWKS is served by a fake.

Every attack changes one thing in an otherwise valid token; ``test_the_baseline_is_accepted`` shows the
unchanged token passes, so each refusal is caused by that one change.
"""

from __future__ import annotations

import pytest

from issuer.verifier import (
    AccessTokenVerifier,
    InvalidClaims,
    MalformedToken,
    TokenError,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongType,
)
from tests.support.clock import FakeClock
from tests.support.verifier import AUDIENCE, DELETE, ISSUER, JWKS_URI, LEEWAY, FakeIssuer
from tests.verifier._forgeries import ATTACKS, Attack, Forge


async def test_the_baseline_is_accepted(forge: Forge, verifier: AccessTokenVerifier, fake: FakeIssuer) -> None:
    for token in (forge.token, forge.sign()):
        access = await verifier.verify(token)
        assert access.sub == "user-1"
        assert access.role == "user"
        assert access.claims == forge.claims
    # Accepted variants, so the refusals above are about the change and not about the spelling:
    assert await verifier.verify(forge.sign(forge.header(typ="application/at+jwt")))
    assert await verifier.verify(forge.sign(forge.header(typ="AT+JWT")))
    assert await verifier.verify(forge.sign(payload=forge.payload(aud=["other", AUDIENCE])))
    assert await verifier.verify(forge.sign(payload=forge.payload(exp=forge.now - LEEWAY + 1)))
    assert await verifier.verify(forge.sign(payload=forge.payload(nbf=forge.now + LEEWAY)))
    assert [str(r.url) for r in fake.requests] == [JWKS_URI]


@pytest.mark.parametrize(("attack", "expected"), ATTACKS)
async def test_attack_is_refused_by_the_verifier(
    forge: Forge, verifier: AccessTokenVerifier, fake: FakeIssuer, attack: Attack, expected: type[TokenError]
) -> None:
    await verifier.verify(forge.token)  # warm: the refusal is not a cold-cache artefact
    token = attack(forge)
    assert token != forge.token
    with pytest.raises(expected) as refused:
        await verifier.verify(token)
    assert type(refused.value) is expected
    assert refused.value.reason == expected.reason
    # Nothing the token says makes the verifier fetch anything but the configured JWKS (jku, x5u, kid paths).
    assert {str(r.url) for r in fake.requests} == {JWKS_URI}


ALGORITHM_AND_HEADER_ATTACKS = [
    p for p in ATTACKS if p.values[1] in (UnsupportedAlgorithm, WrongType, MalformedToken) and "payload" not in p.id
]


@pytest.mark.parametrize(("attack", "expected"), ALGORITHM_AND_HEADER_ATTACKS)
async def test_header_attacks_are_refused_before_any_key_is_fetched(
    forge: Forge, verifier: AccessTokenVerifier, fake: FakeIssuer, attack: Attack, expected: type[TokenError]
) -> None:
    """On a cold cache, a bad alg, typ or header costs no JWKS request: no key is touched before the allow-list."""
    with pytest.raises(expected):
        await verifier.verify(attack(forge))
    assert fake.requests == []
    assert verifier.jwks.kids == frozenset()


async def test_a_valid_token_on_a_cold_cache_does_fetch(
    forge: Forge, verifier: AccessTokenVerifier, fake: FakeIssuer
) -> None:
    """Control for the test above: the cold cache there was not simply unable to fetch."""
    assert (await verifier.verify(forge.token)).sub == "user-1"
    assert len(fake.requests) == 1


async def test_unknown_kid_is_refused_even_after_the_cooldown_refetch(
    forge: Forge, verifier: AccessTokenVerifier, fake: FakeIssuer, clock: FakeClock
) -> None:
    await verifier.verify(forge.token)
    clock.advance(60)
    with pytest.raises(UnknownKey):
        await verifier.verify(forge.sign(forge.header(kid="never-published")))
    assert verifier.jwks.stats.unknown_kid_refetches == 1
    assert len(fake.requests) == 2


def test_required_claims_cannot_drop_the_essentials(verifier: AccessTokenVerifier) -> None:
    for essential in ("iss", "aud", "sub", "exp"):
        with pytest.raises(ValueError, match=essential):
            AccessTokenVerifier(
                issuer=ISSUER,
                audience=AUDIENCE,
                jwks=verifier.jwks,
                required_claims=[c for c in ("iss", "aud", "sub", "exp", "iat") if c != essential],
            )


async def test_extra_required_claims_are_enforced(forge: Forge, verifier: AccessTokenVerifier) -> None:
    strict = AccessTokenVerifier(
        issuer=ISSUER,
        audience=AUDIENCE,
        jwks=verifier.jwks,
        clock=forge.clock.wall,
        required_claims=("iss", "aud", "sub", "exp", "iat", "jti", "sid", "tokenVersion"),
    )
    assert (await strict.verify(forge.token)).token_version == 0
    with pytest.raises(InvalidClaims, match="sid"):
        await strict.verify(forge.sign(payload=forge.payload(sid=DELETE)))
    # Control: the default verifier does not require sid.
    assert (await verifier.verify(forge.sign(payload=forge.payload(sid=DELETE)))).sid is None
