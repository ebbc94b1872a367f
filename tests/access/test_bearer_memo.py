"""Attacks on BearerAuth's memo of verified signatures, through the issuer's own /auth/me.

The memo may only save the RSA operation for the very token string it checked, with the very key object
that checked it. Everything else (time claims, key revocation, the user's tokenVersion, the account's
existence) is decided afresh on every call. ``issuer.access.bearer.verify_signature`` is counted to tell a memo
hit (no RSA work) from a miss.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

import issuer.access.bearer as bearer_module
from issuer.access.bearer import BearerAuth
from issuer.access.tokens import mint_access_token
from issuer.access.user_lookup import UserLookup
from issuer.storage import users
from issuer.verifier.verify import verify_signature
from tests.support.clock import FakeClock
from tests.support.http import PASSWORD, assert_invalid_token, bearer, delete_account, login, me, register
from tests.support.issuer import IssuerHarness
from tests.support.jwt import b64url_json, jwt_claims, token_kid
from tests.support.keys import Cli


class RsaChecks:
    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def rsa_checks(monkeypatch: pytest.MonkeyPatch) -> RsaChecks:
    """Counts the RSA signature checks BearerAuth performs."""
    checks = RsaChecks()
    original = verify_signature

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        checks.count += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(bearer_module, "verify_signature", counting)
    return checks


async def memoized_token(client: httpx.AsyncClient, rsa_checks: RsaChecks) -> str:
    """A fresh login's access token, accepted twice: checked once with RSA, then answered from the memo."""
    await register(client)
    token = str((await login(client))["access_token"])
    before = rsa_checks.count
    for _ in range(2):
        response = await me(client, token)
        assert response.status_code == 200, response.text
    assert rsa_checks.count == before + 1
    return token


def at(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


# ---------------------------------------------------------------- hits and misses


async def test_a_memo_hit_does_no_rsa_work_and_a_miss_does(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    await register(client)
    first = (await login(client))["access_token"]
    second = (await login(client))["access_token"]
    assert rsa_checks.count == 0

    assert (await me(client, first)).status_code == 200
    assert rsa_checks.count == 1
    for _ in range(5):
        assert (await me(client, first)).status_code == 200
    assert rsa_checks.count == 1, "a memoized token was checked with RSA again"

    assert (await me(client, second)).status_code == 200
    assert rsa_checks.count == 2, "another token string must be checked with RSA"
    assert (await me(client, second)).status_code == 200
    assert (await me(client, first)).status_code == 200
    assert rsa_checks.count == 2


async def test_a_reloaded_key_set_checks_the_signature_again(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    """After a reload the key objects are new: an entry made with the old object is not trusted blindly,
    and the token is checked with RSA once against the new object, then served from the memo again."""
    token = await memoized_token(client, rsa_checks)
    await issuer.services.keys.rotate()  # publishes a key and reloads; the token's key stays published
    checks = rsa_checks.count
    assert (await me(client, token)).status_code == 200
    assert rsa_checks.count == checks + 1
    for _ in range(3):
        assert (await me(client, token)).status_code == 200
    assert rsa_checks.count == checks + 1, "after a reload the memo never hits for this token again"


# ---------------------------------------------------------------- (a) time claims are checked on every call


async def test_a_memoized_token_expires_exactly_when_an_unmemoized_one_does(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks, clock: FakeClock
) -> None:
    token = await memoized_token(client, rsa_checks)
    leeway = issuer.services.settings.clock_leeway
    exp = jwt_claims(token)["exp"]
    checks = rsa_checks.count

    clock.now = at(exp + leeway - 1)  # the last second inside the leeway
    assert (await me(client, token)).status_code == 200
    clock.now = at(exp + leeway)
    assert_invalid_token(await me(client, token))
    clock.advance(3600)
    assert_invalid_token(await me(client, token))
    assert rsa_checks.count == checks, "the memo was not used, so this proves nothing about it"


async def test_a_memoized_token_from_the_future_is_refused(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks, clock: FakeClock
) -> None:
    clock.advance(600)  # so that the signing key was published well before the token's iat
    token = await memoized_token(client, rsa_checks)
    leeway = issuer.services.settings.clock_leeway
    iat = jwt_claims(token)["iat"]
    checks = rsa_checks.count
    clock.now = at(iat - leeway)
    assert (await me(client, token)).status_code == 200
    clock.now = at(iat - leeway - 1)  # the clock went back: the token is issued in the future
    assert_invalid_token(await me(client, token))
    clock.now = at(iat)
    assert (await me(client, token)).status_code == 200
    assert rsa_checks.count == checks, "the memo was not used, so this proves nothing about it"


# ---------------------------------------------------------------- (b) a revoked key takes its entries with it


async def test_revoking_the_signing_key_kills_memoized_tokens(
    issuer: IssuerHarness, client: httpx.AsyncClient, cli: Cli, rsa_checks: RsaChecks
) -> None:
    token = await memoized_token(client, rsa_checks)
    kid = token_kid(token)
    result = await cli("keys", "revoke", kid)
    assert result.code == 0, result
    await issuer.services.keys.reload()  # what the replica does on its own within KEY_RELOAD_INTERVAL

    for _ in range(2):
        assert_invalid_token(await me(client, token))
    fresh = (await login(client))["access_token"]
    assert token_kid(fresh) != kid
    assert (await me(client, fresh)).status_code == 200


async def test_revoking_in_process_kills_memoized_tokens(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    token = await memoized_token(client, rsa_checks)
    await issuer.services.keys.revoke(token_kid(token))
    assert_invalid_token(await me(client, token))


# ---------------------------------------------------------------- (c) only the exact string hits


def one_character_changes(token: str) -> list[tuple[str, str]]:
    """(segment name, token) with one character replaced in the header, the payload or the signature.

    The last character of a segment is left alone: its low bits may be padding that decoders ignore.
    """
    parts = token.split(".")
    variants = []
    for index, name in enumerate(("header", "payload", "signature")):
        segment = parts[index]
        for position in sorted({0, 1, len(segment) // 3, len(segment) // 2, len(segment) - 2}):
            original = segment[position]
            replacement = "A" if original != "A" else "B"
            changed = segment[:position] + replacement + segment[position + 1 :]
            variants.append((name, ".".join([*parts[:index], changed, *parts[index + 1 :]])))
    return variants


async def test_a_token_one_character_away_from_a_memoized_one_is_refused(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    token = await memoized_token(client, rsa_checks)
    variants = one_character_changes(token)
    assert len({v for _, v in variants}) == len(variants)
    for name, variant in variants:
        assert variant != token
        checks = rsa_checks.count
        response = await me(client, variant)
        assert_invalid_token(response)
        if name != "header":  # a broken header fails before any key is used
            assert rsa_checks.count == checks + 1, (name, "a near-miss must be checked with RSA, not served")
    # Truncated or extended, too.
    for variant in (token[:-1], token + "A", token + ".", token.replace(".", "..", 1)):
        assert_invalid_token(await me(client, variant))
    # The near misses did not disturb the memo.
    checks = rsa_checks.count
    assert (await me(client, token)).status_code == 200
    assert rsa_checks.count == checks


async def test_a_forged_payload_with_a_memoized_signature_is_refused(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    token = await memoized_token(client, rsa_checks)
    header, _payload, signature = token.split(".")
    forged = b64url_json(jwt_claims(token) | {"role": "admin"})
    assert_invalid_token(await me(client, f"{header}.{forged}.{signature}"))
    assert (await me(client, token)).json()["role"] == "user"


# ---------------------------------------------------------------- (d), (e) the user is read on every call


async def test_logout_all_kills_a_memoized_token_at_once(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    token = await memoized_token(client, rsa_checks)
    checks = rsa_checks.count
    response = await client.post("/auth/logout-all", headers=bearer(token))
    assert response.status_code == 204, response.text
    for _ in range(3):
        assert_invalid_token(await me(client, token))
    assert rsa_checks.count == checks, "the signature was still memoized: the version check refused it"
    fresh = (await login(client))["access_token"]
    assert (await me(client, fresh)).json()["tokenVersion"] == 1


async def test_deleting_the_account_kills_a_memoized_token_at_once(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks
) -> None:
    token = await memoized_token(client, rsa_checks)
    old_id = jwt_claims(token)["sub"]
    response = await delete_account(client, token, PASSWORD)
    assert response.status_code == 204, response.text
    assert_invalid_token(await me(client, token))
    # A new account with the same email is a new user: the old token does not open it.
    again = await register(client)
    assert again["id"] != old_id
    assert_invalid_token(await me(client, token))


# ---------------------------------------------------------------- (f) the memo is bounded


async def test_the_memo_never_grows_beyond_its_size_and_forgets_the_oldest_first(
    issuer: IssuerHarness, client: httpx.AsyncClient, rsa_checks: RsaChecks, clock: FakeClock
) -> None:
    svc = issuer.services
    small = BearerAuth(
        UserLookup(lambda ids: users.by_ids(svc.db, ids)),
        svc.keys,
        svc.settings,
        svc.clock,
        svc.metrics,
        memo_size=4,
    )
    svc.bearer = small  # the routes read services.bearer on every request
    await register(client)
    template = jwt_claims((await login(client))["access_token"])
    key = svc.keys.signing_key(clock())
    assert key is not None
    tokens = [
        mint_access_token(
            key,
            issuer=svc.settings.issuer_url,
            audience=svc.settings.audience,
            ttl=svc.settings.access_token_ttl,
            now=clock(),
            user_id=template["sub"],
            email=template["email"],
            role=template["role"],
            token_version=template["tokenVersion"],
            session_id=template["sid"],
        )
        for _ in range(12)
    ]
    assert len(set(tokens)) == len(tokens)

    for count, token in enumerate(tokens, start=1):
        assert (await me(client, token)).status_code == 200
        assert len(small._memo) == min(count, 4)
    assert set(small._memo) == set(tokens[-4:])
    checks = rsa_checks.count
    for token in tokens[-4:]:
        assert (await me(client, token)).status_code == 200
    assert rsa_checks.count == checks, "the newest entries were kept"
    assert (await me(client, tokens[0])).status_code == 200
    assert rsa_checks.count == checks + 1, "the oldest entry was forgotten"
    assert len(small._memo) == 4
    assert tokens[0] in small._memo
    # Refused tokens are never remembered.
    clock.advance(svc.settings.access_token_ttl + svc.settings.clock_leeway)
    expired_memo = dict(small._memo)
    for token in tokens:
        assert_invalid_token(await me(client, token))
    assert small._memo == expired_memo
