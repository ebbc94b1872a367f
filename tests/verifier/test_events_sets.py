"""Forged and malformed SETs in the revocation feed: none is applied, each is counted under its reason, and a
valid SET in the same answer still is. Each forgery changes one thing in an otherwise valid SET that would
revoke the session ``target``; the test then checks that ``target``'s token is still accepted.

SETs are built with the tests' own JWT toolkit (tests/support/jwt.py), independent of joserfc.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from issuer.verifier import Revoked
from tests.support.clock import FakeClock
from tests.support.jwt import compact, hmac_signed, rsa_signed
from tests.support.verifier import (
    ACCOUNT_PURGED,
    CLIENT_ID,
    DELETE,
    FakeFeed,
    FakeIssuer,
    account_purged,
    feed_verifier_for,
    mint,
    private_key,
    public_jwk,
    session_revoked,
    set_header,
    until_revoked,
    user_subject,
    version_raised,
)

TARGET = "target"


@dataclass(frozen=True)
class Forgery:
    reason: str
    build: Callable[[FakeFeed, dict[str, Any]], str]  # (feed, the valid claims) -> the compact SET


def _resigned(**claim_changes: Any) -> Callable[[FakeFeed, dict[str, Any]], str]:
    """Validly signed by the issuer's key: only a claim is wrong."""

    def build(feed: FakeFeed, claims: dict[str, Any]) -> str:
        changed = {**claims}
        for name, value in claim_changes.items():
            if value is DELETE:
                changed.pop(name, None)
            else:
                changed[name] = value
        return feed.sign(changed)

    return build


def _header(**changes: Any) -> Callable[[FakeFeed, dict[str, Any]], str]:
    """Validly signed by the issuer's key over a changed header."""
    return lambda feed, claims: rsa_signed(set_header(feed.key, **changes), claims, feed.key)


def _public_pem(feed: FakeFeed) -> bytes:
    return feed.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _other_sub_id_issuer(feed: FakeFeed, claims: dict[str, Any]) -> str:
    sub_id = {**claims["sub_id"], "user": user_subject("user-1", issuer="https://evil.test")}
    return feed.sign({**claims, "sub_id": sub_id})


FORGERIES = {
    # Signatures and keys
    "wrong_key_with_the_issuers_kid": Forgery(
        "bad_signature", lambda feed, claims: rsa_signed(set_header(feed.key), claims, private_key(2))
    ),
    "attackers_own_key_and_kid": Forgery(
        "unknown_kid", lambda feed, claims: rsa_signed(set_header(private_key(2)), claims, private_key(2))
    ),
    "signed_by_a_key_that_left_the_jwks": Forgery(
        "unknown_kid", lambda feed, claims: rsa_signed(set_header(private_key(1)), claims, private_key(1))
    ),
    "alg_none": Forgery(
        "unsupported_alg", lambda feed, claims: compact({**set_header(feed.key), "alg": "none"}, claims)
    ),
    "hs256_keyed_with_the_public_key": Forgery(
        "unsupported_alg",
        lambda feed, claims: hmac_signed({**set_header(feed.key), "alg": "HS256"}, claims, _public_pem(feed)),
    ),
    "ps256_signature_labelled_rs256": Forgery(
        "bad_signature",
        lambda feed, claims: rsa_signed(
            set_header(feed.key),
            claims,
            feed.key,
            pad=padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        ),
    ),
    "signature_stripped": Forgery("bad_signature", lambda feed, claims: compact(set_header(feed.key), claims)),
    "no_kid": Forgery("unknown_kid", _header(kid=DELETE)),
    "jku_header": Forgery("refused_header", _header(jku="https://evil.test/jwks.json")),
    # joserfc already refuses to read a header whose jwk it does not accept: refused before any key is used.
    "embedded_jwk": Forgery("malformed", _header(jwk=public_jwk(private_key(2)))),
    "x5u_header": Forgery("refused_header", _header(x5u="https://evil.test/cert.pem")),
    "crit_header": Forgery("refused_header", _header(crit=["exp"])),
    # The token type: an access token (or a plain JWT) signed by the issuer is not a SET
    "typ_at_jwt": Forgery("wrong_typ", _header(typ="at+jwt")),
    "typ_jwt": Forgery("wrong_typ", _header(typ="JWT")),
    "no_typ": Forgery("wrong_typ", _header(typ=DELETE)),
    # Claims
    "wrong_aud": Forgery("wrong_audience", _resigned(aud="another-gateway")),
    "no_aud": Forgery("wrong_audience", _resigned(aud=DELETE)),
    "wrong_iss": Forgery("wrong_issuer", _resigned(iss="https://evil.test")),
    "subject_of_another_issuer": Forgery("wrong_issuer", _other_sub_id_issuer),
    "jti_not_the_key_it_came_under": Forgery("wrong_jti", _resigned(jti="another-jti")),
    "no_iat": Forgery("bad_event", _resigned(iat=DELETE)),
    "two_events": Forgery(
        "bad_event",
        lambda feed, claims: feed.sign(
            {**claims, "events": {**claims["events"], ACCOUNT_PURGED: {"event_timestamp": claims["iat"]}}}
        ),
    ),
    "no_events": Forgery("bad_event", _resigned(events={})),
    "unknown_event_type": Forgery(
        "unknown_event",
        lambda feed, claims: feed.sign(
            {**claims, "events": {"https://schemas.openid.net/secevent/caep/event-type/token-claims-change": {}}}
        ),
    ),
    "user_subject_without_token_version": Forgery(
        "bad_event", lambda feed, claims: feed.sign({**claims, "sub_id": user_subject("user-1")})
    ),
    "session_id_not_a_string": Forgery(
        "bad_event",
        lambda feed, claims: feed.sign(
            {**claims, "sub_id": {**claims["sub_id"], "session": {"format": "opaque", "id": 7}}}
        ),
    ),
    "payload_not_an_object": Forgery("malformed", lambda feed, claims: feed.sign([claims])),  # type: ignore[arg-type]
    "not_a_jws": Forgery("malformed", lambda feed, claims: "not.a-jws"),
    "not_a_string": Forgery("malformed", lambda feed, claims: 42),  # type: ignore[arg-type,return-value]
}


@pytest.mark.parametrize("name", FORGERIES)
async def test_a_forged_set_is_refused_counted_and_not_applied(
    name: str, http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    forgery = FORGERIES[name]
    claims = session_revoked("forged", clock.wall(), "user-1", TARGET)
    feed.add("forged", forgery.build(feed, claims))
    feed.add("genuine", feed.sign(session_revoked("genuine", clock.wall(), "user-1", "other")))
    verifier = feed_verifier_for(http, clock)
    async with verifier.lifespan():
        events = verifier.events
        assert events is not None
        assert events.synced
        assert dict(events.stats.refused_sets) == {forgery.reason: 1}
        assert events.stats.sets_applied == 1
        await verifier.verify(mint(clock, sid=TARGET))
        with pytest.raises(Revoked):
            await verifier.verify(mint(clock, sid="other"))
        assert events.cursor == f"{CLIENT_ID}.2"  # refused and skipped: the feed moves on


async def test_an_unknown_kid_fetches_the_jwks_once_before_it_is_refused(
    fake: FakeIssuer, http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock
) -> None:
    """The issuer may sign with a key it just activated (``keys rotate --now``, ``keys revoke``), and a fresh
    cache would not refetch for an unknown kid within its cooldown: a SET with an unknown kid costs one JWKS
    fetch per poll answer, and is applied when the new key is there."""
    new_key = private_key(1)
    verifier = feed_verifier_for(http, clock)
    async with verifier.lifespan():
        events = verifier.events
        assert events is not None
        fetches = len(fake.jwks_requests)
        fake.keys = [public_jwk(private_key(0)), public_jwk(new_key)]
        claims = session_revoked("e1", clock.wall(), "user-1", TARGET)
        await feed.publish(claims, feed.sign(claims, key=new_key))
        await until_revoked(verifier, mint(clock, sid=TARGET))
        assert len(fake.jwks_requests) == fetches + 1
        assert events.stats.sets_refused == 0


async def test_forged_sets_cannot_lower_a_version(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock) -> None:
    """Nothing un-revokes: a genuine version 5 stays, whatever forged or genuine lower versions follow."""
    now = clock.wall()
    feed.add("v5", feed.sign(version_raised("v5", now, "user-1", 5)))
    attacker = private_key(2)
    feed.add("v1-forged", rsa_signed(set_header(feed.key), version_raised("v1-forged", now + 1, "user-1", 1), attacker))
    feed.add("v1", feed.sign(version_raised("v1", now + 1, "user-1", 1)))
    purge = account_purged("purge-forged", now, "user-2")
    feed.add("purge-forged", rsa_signed(set_header(attacker), purge, attacker))
    verifier = feed_verifier_for(http, clock)
    async with verifier.lifespan():
        with pytest.raises(Revoked):
            await verifier.verify(mint(clock, tokenVersion=4))
        await verifier.verify(mint(clock, tokenVersion=5))
        await verifier.verify(mint(clock, sub="user-2"))


async def test_an_aud_list_naming_us_is_accepted(http: httpx.AsyncClient, feed: FakeFeed, clock: FakeClock) -> None:
    claims = session_revoked("e1", clock.wall(), "user-1", TARGET, aud=["someone", CLIENT_ID])
    feed.add("e1", feed.sign(claims))
    verifier = feed_verifier_for(http, clock)
    async with verifier.lifespan():
        with pytest.raises(Revoked):
            await verifier.verify(mint(clock, sid=TARGET))


def test_the_catalogue_covers_the_brief() -> None:
    assert {"unsupported_alg", "wrong_typ", "wrong_audience", "wrong_issuer", "bad_signature", "unknown_kid"} <= {
        forgery.reason for forgery in FORGERIES.values()
    }
