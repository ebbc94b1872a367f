"""Password login (``POST /auth/login``): the email normalized, the password exact; a wrong password and an
unknown email answer identically; an account deleted during the password check is an unknown one; raised
Argon2 parameters reach an account at its next successful login."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select

from issuer.settings import Argon2Params, Settings
from issuer.storage import users
from issuer.storage.schema import families
from issuer.storage.schema import users as users_table
from tests.support.clock import FakeClock
from tests.support.families import assert_token_response, login_response, row_count
from tests.support.http import PASSWORD, assert_error, login, register
from tests.support.issuer import running_issuer, with_settings
from tests.support.operations import sample


async def test_login_wrong_password_and_unknown_email_are_indistinguishable(client: httpx.AsyncClient) -> None:
    await register(client)
    wrong = await login_response(client, password="not the password")
    unknown = await login_response(client, email="nobody@example.com")
    assert_error(wrong, 401, "invalid_credentials")
    assert wrong.status_code == unknown.status_code
    assert wrong.content == unknown.content
    assert dict(wrong.headers) == dict(unknown.headers)
    assert "set-cookie" not in wrong.headers


@pytest.mark.parametrize("lockout", [0, 5])
async def test_account_deleted_during_the_password_check_is_401_not_503(
    settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, lockout: int
) -> None:
    """The account is read before the hash and the session written after it; a deletion in between is the
    client's race, not a fault: the login answers like an unknown email and writes nothing."""
    configured = with_settings(settings, login_lockout_threshold=lockout)
    async with running_issuer(configured, clock) as harness, harness.client() as client:
        user = await register(client)
        svc = harness.services
        check = svc.passwords.verify
        deleted: list[bool] = []

        async def check_then_delete(stored_hash: str | None, password: str) -> bool:
            ok = await check(stored_hash, password)
            await users.delete(svc.db, user["id"])
            deleted.append(ok)
            return ok

        monkeypatch.setattr(svc.passwords, "verify", check_then_delete)
        assert_error(await login_response(client), 401, "invalid_credentials")
        assert deleted == [True]  # the password was right: only the deletion stopped the login
        assert await row_count(harness.engine, families) == 0
        assert sample(svc, "issuer_database_errors_total") == 0


async def test_login_normalizes_the_email(client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await login_response(client, email="  ALICE@example.COM\t")
    assert_token_response(response, user, transport="body")


async def test_login_password_is_exact(client: httpx.AsyncClient) -> None:
    await register(client)
    for variant in (PASSWORD.upper(), PASSWORD + " ", " " + PASSWORD, PASSWORD[:-1]):
        assert_error(await login_response(client, password=variant), 401, "invalid_credentials")


async def test_raised_argon2_parameters_rehash_at_the_next_login(settings: Settings, clock: FakeClock) -> None:
    """Operators who raise ARGON2_* get every account upgraded at its next successful login, not never."""
    async with running_issuer(settings, clock) as old, old.client() as client:
        await register(client, email="rehash@example.com")
    stronger = with_settings(settings, argon2=Argon2Params(memory_cost_kib=2048, time_cost=2, parallelism=1))
    async with running_issuer(stronger, clock) as new, new.client() as client:
        engine = new.engine
        async with engine.connect() as conn:
            before = (await conn.execute(select(users_table.c.password_hash))).scalar_one()
        assert "m=1024,t=1" in before
        wrong = await login_response(client, email="rehash@example.com", password="wrong password")
        assert_error(wrong, 401, "invalid_credentials")
        async with engine.connect() as conn:
            assert (await conn.execute(select(users_table.c.password_hash))).scalar_one() == before  # not on failure
        await login(client, email="rehash@example.com")
        async with engine.connect() as conn:
            after = (await conn.execute(select(users_table.c.password_hash))).scalar_one()
        assert "m=2048,t=2" in after
        await login(client, email="rehash@example.com")  # the new hash verifies
