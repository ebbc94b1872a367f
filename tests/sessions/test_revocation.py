"""A revoked or deleted family never yields a token again (contract section 4): not its current token, not a
replay of the token just rotated, and not a replay whose revocation commits while the replay is deciding."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from issuer.errors import InvalidGrant
from issuer.storage import sessions, users
from tests.support.families import (
    assert_single_chain,
    family_of,
    family_row,
    rotate_ok,
    start_session,
    token_count,
    token_row,
)
from tests.support.http import PASSWORD, assert_error, bearer, refresh_body
from tests.support.issuer import IssuerHarness
from tests.support.jwt import jwt_claims

# ---------------------------------------------------------------- every way a family is revoked


async def _revoke_by_logout_current(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    assert (await client.post("/auth/logout", json={"refresh_token": tokens["current"]})).status_code == 204


async def _revoke_by_logout_old(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    # Logging out with an already-rotated token still ends that session.
    assert (await client.post("/auth/logout", json={"refresh_token": tokens["old"]})).status_code == 204


async def _revoke_by_session_delete(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    sid = jwt_claims(tokens["access"])["sid"]
    response = await client.delete(f"/auth/sessions/{sid}", headers=bearer(tokens["access"]))
    assert response.status_code == 204, response.text


async def _revoke_by_logout_all(client: httpx.AsyncClient, tokens: dict[str, str]) -> None:
    response = await client.post("/auth/logout-all", headers=bearer(tokens["access"]))
    assert response.status_code == 204, response.text


@pytest.mark.parametrize(
    ("revoke", "reason"),
    [
        (_revoke_by_logout_current, "logout"),
        (_revoke_by_logout_old, "logout"),
        (_revoke_by_session_delete, "session_revoked"),
        (_revoke_by_logout_all, "logout_all"),
    ],
)
async def test_revoked_family_never_yields_a_token(
    issuer: IssuerHarness, client: httpx.AsyncClient, revoke: Callable[..., Any], reason: str
) -> None:
    engine, clock = issuer.engine, issuer.clock
    old = (await start_session(client))["refresh_token"]
    family_id = await family_of(engine, old)
    rotated = await rotate_ok(client, old)
    current = rotated["refresh_token"]

    await revoke(client, {"old": old, "current": current, "access": rotated["access_token"]})

    family = await family_row(engine, family_id)
    assert family.revoked_at is not None
    assert family.revoked_reason == reason
    clock.advance(1)
    # Not the current token, and not an in-window replay of the old one (whose successor is unused).
    assert_error(await refresh_body(client, current), 401, "invalid_grant")
    assert_error(await refresh_body(client, old), 401, "invalid_grant")
    with pytest.raises(InvalidGrant):
        await issuer.services.families.rotate(current, now=clock())
    # Nothing was consumed or minted after the revocation, and the reason was not overwritten.
    assert (await token_row(engine, current)).consumed_at is None  # type: ignore[union-attr]
    assert await token_count(engine, family_id) == 2
    assert (await family_row(engine, family_id)).revoked_reason == reason
    await assert_single_chain(engine, clock())


async def test_deleted_family_never_yields_a_token(issuer: IssuerHarness, client: httpx.AsyncClient) -> None:
    engine = issuer.engine
    tokens = await start_session(client)
    old = tokens["refresh_token"]
    rotated = await rotate_ok(client, old)
    family_id = await family_of(engine, old)
    response = await client.request(
        "DELETE", "/auth/account", json={"password": PASSWORD}, headers=bearer(rotated["access_token"])
    )
    assert response.status_code == 204, response.text
    assert await token_count(engine, family_id) == 0
    # The current token, and the one rotated moments ago (inside the grace window).
    assert_error(await refresh_body(client, rotated["refresh_token"]), 401, "invalid_grant")
    assert_error(await refresh_body(client, old), 401, "invalid_grant")


# ---------------------------------------------------------------- a revocation racing a grace replay

Interloper = Callable[[IssuerHarness, str, str], Awaitable[None]]


async def _logout_all(issuer: IssuerHarness, user_id: str, successor: str) -> None:
    await issuer.services.accounts.logout_all(user_id, now=issuer.clock())


async def _logout(issuer: IssuerHarness, user_id: str, successor: str) -> None:
    assert await issuer.services.families.revoke_by_token(successor, now=issuer.clock()) is not None


async def _revoke_session(issuer: IssuerHarness, user_id: str, successor: str) -> None:
    family_id = await family_of(issuer.engine, successor)
    await issuer.services.families.revoke_session(user_id, family_id, now=issuer.clock())


async def _delete_account(issuer: IssuerHarness, user_id: str, successor: str) -> None:
    await users.delete(issuer.services.db, user_id)


@pytest.mark.parametrize("interloper", [_logout_all, _logout, _revoke_session, _delete_account])
async def test_a_replay_racing_a_revocation_yields_nothing(
    issuer: IssuerHarness, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, interloper: Interloper
) -> None:
    """A replay that fails the one-statement rotation asks :func:`issuer.storage.sessions.inspect` why, then
    (no lock held) decides it is a benign replay and reads the user. A revocation that commits in between
    must win: with logout-all, a token carrying the new tokenVersion for a revoked family would survive the
    logout-all at every issuer endpoint until it expires."""
    first = await start_session(client)
    token, user_id = first["refresh_token"], jwt_claims(first["access_token"])["sub"]
    successor = (await rotate_ok(client, token))["refresh_token"]
    issuer.clock.advance(1)

    inspect = sessions.inspect
    raced: list[bool] = []

    async def then_revoke(*args: Any, **kwargs: Any) -> sessions.Presented | None:
        found = await inspect(*args, **kwargs)
        if not raced:  # once: right after the replay path has seen the family alive
            # The window under attack: without the revocation, this replay would be answered with the successor.
            assert found is not None
            assert not found.family_ended
            assert found.consumed_at is not None
            assert found.successor_unused
            raced.append(True)
            await interloper(issuer, user_id, successor)
        return found

    monkeypatch.setattr(sessions, "inspect", then_revoke)
    assert_error(await refresh_body(client, token), 401, "invalid_grant")
    assert raced == [True]
    monkeypatch.undo()
    assert_error(await refresh_body(client, successor), 401, "invalid_grant")
    assert_error(await refresh_body(client, token), 401, "invalid_grant")
    await assert_single_chain(issuer.engine, issuer.clock())
